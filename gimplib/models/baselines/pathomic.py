"""Pathomic Fusion: gated Kronecker-product fusion of histology and genomic embeddings.

Chen, Lu, Wang, Williamson, Rodig, Lindeman & Mahmood, "Pathomic Fusion: An Integrated
Framework for Fusing Histopathology and Genomic Features for Cancer Diagnosis and
Prognosis", IEEE Transactions on Medical Imaging 41(4), 2022; reference code
github.com/mahmoodlab/PathomicFusion (``PathomicNet``, ``BilinearFusion``, ``MaxNet``).

What is the official model's and what is adapted:
    * Genomic branch: the official ``MaxNet`` SNN (Linear + ELU + AlphaDropout blocks of
      widths 64, 48, 32, 32). Same.
    * Fusion (:class:`GatedBilinearFusion`, ``style="pathomic"``): each modality is gated by
      a bilinear layer of *both* embeddings (``use_bilinear=1``), a 1 is appended to each
      gated embedding, their Kronecker product goes through dropout and a Linear + ReLU +
      Dropout to ``fused_dim`` (official ``mmhid`` = 64) and a second one of the same width.
      The skip connection (off by default, as in the released options) concatenates the
      gated embeddings with their appended 1s; an ungated modality enters the output layer
      directly, without the projection. Same.
    * Histology branch: the official one embeds 512 x 512 region images with a VGG19 (and
      cell graphs with a GCN). We only have patch features of a whole slide, so the
      histology embedding is an attention-MIL *bag* embedding: patches -> Linear + ReLU +
      Dropout (``path_dim`` = 32, the official VGG output width) -> gated-attention pooling.
      This is our adaptation; it is not part of an official checkpoint
      (:func:`gimplib.models.baselines.official.from_official` loads the genomic branch,
      the fusion and the head, and :meth:`PathomicFusion.fuse` runs them on given embeddings).
    * Head: a linear classifier on the fused embedding, trained with cross-entropy (the
      official grading head is the same Linear with a log-softmax; its survival head is not used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from gimplib.models.baselines._common import GatedAttention, SNNEncoder, check_inputs, masked_softmax, output
from gimplib.models.baselines.registry import register_system

__all__ = ["GatedBilinearFusion", "PathomicFusion"]

_STYLES = ("pathomic", "porpoise")


class _GatedUnimodal(nn.Module):
    """One modality's gated embedding: ``out(sigmoid(gate(x1, x2)) * proj(x_self))``."""

    def __init__(
        self, *, dim_self: int, dim1: int, dim2: int, out_dim: int, dropout: float, gated: bool, use_bilinear: bool,
        project_ungated: bool,
    ):
        super().__init__()
        self.gated, self.use_bilinear = gated, use_bilinear
        self.proj = nn.Sequential(nn.Linear(dim_self, out_dim), nn.ReLU()) if gated or project_ungated else None
        if not gated:
            self.gate = None
        elif use_bilinear:
            self.gate = nn.Bilinear(dim1, dim2, out_dim)
        else:
            self.gate = nn.Linear(dim1 + dim2, out_dim)
        self.out = nn.Sequential(nn.Linear(out_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x_self: Tensor, x1: Tensor, x2: Tensor) -> Tensor:
        h = self.proj(x_self) if self.proj is not None else x_self
        if self.gated:
            if self.use_bilinear:
                # F.bilinear has no autocast rule: run it in the activations' dtype
                w, bias = self.gate.weight.to(h.dtype), self.gate.bias.to(h.dtype)
                z = F.bilinear(x1.to(h.dtype), x2.to(h.dtype), w, bias)
            else:
                z = self.gate(torch.cat([x1, x2], dim=-1))
            h = torch.sigmoid(z) * h
        return self.out(h)


class GatedBilinearFusion(nn.Module):
    """Gated attention + Kronecker-product fusion of two embeddings, as in the official code.

    Two official variants share this module; ``style`` picks the one whose details differ:

    ============================  ==================================  ===============================
    detail                        ``"pathomic"`` (PathomicFusion)      ``"porpoise"`` (PORPOISE)
    ============================  ==================================  ===============================
    ungated modality              enters ``out`` directly              goes through ``proj`` first
    skip connection concatenates  the gated outputs with their 1s      the raw inputs ``x1``, ``x2``
    encoder1 / encoder2           Linear + ReLU + Dropout              Linear + ReLU (no dropout)
    ============================  ==================================  ===============================

    Args:
        dim1: size of the first (histology) embedding.
        dim2: size of the second (genomic) embedding.
        scale1: the gated first embedding has ``dim1 // scale1`` features (PORPOISE: 8).
        scale2: likewise for the second.
        hidden: width of encoder1, right after the Kronecker product (Pathomic: ``fused_dim``;
            PORPOISE: 256).
        fused_dim: width of the output (official ``mmhid``: Pathomic 64, PORPOISE 256).
        dropout: dropout after the gated outputs, on the product and (Pathomic) after the encoders.
        gate1: gate the first modality.
        gate2: gate the second modality.
        use_bilinear: compute the gates with a bilinear layer of (x1, x2) (Pathomic's
            default); else with a Linear on their concatenation (PORPOISE's default).
        skip: concatenate the skip features (see the table) before encoder2.
        style: ``"pathomic"`` or ``"porpoise"`` (see the table).
    """

    def __init__(
        self,
        *,
        dim1: int,
        dim2: int,
        scale1: int = 1,
        scale2: int = 1,
        hidden: int | None = None,
        fused_dim: int = 64,
        dropout: float = 0.25,
        gate1: bool = True,
        gate2: bool = True,
        use_bilinear: bool = True,
        skip: bool = False,
        style: str = "pathomic",
    ):
        super().__init__()
        if style not in _STYLES:
            raise ValueError(f"GatedBilinearFusion: style must be one of {_STYLES}; got {style!r}")
        d1, d2 = dim1 // scale1, dim2 // scale2
        porpoise = style == "porpoise"
        for gated, dim, d, i in ((gate1, dim1, d1, 1), (gate2, dim2, d2, 2)):
            if not gated and not porpoise and d != dim:
                raise ValueError(f"GatedBilinearFusion: an ungated modality enters the output layer directly in "
                                 f"the Pathomic style, so scale{i} must be 1; got dim{i}={dim}, scale{i}={dim // d}")
        self.skip, self.style = skip, style
        self.unimodal1 = _GatedUnimodal(dim_self=dim1, dim1=dim1, dim2=dim2, out_dim=d1, dropout=dropout, gated=gate1,
                                        use_bilinear=use_bilinear, project_ungated=porpoise)
        self.unimodal2 = _GatedUnimodal(dim_self=dim2, dim1=dim1, dim2=dim2, out_dim=d2, dropout=dropout, gated=gate2,
                                        use_bilinear=use_bilinear, project_ungated=porpoise)
        self.post_dropout = nn.Dropout(dropout)
        hidden = hidden if hidden is not None else fused_dim
        tail = [] if porpoise else [nn.Dropout(dropout)]
        self.encoder1 = nn.Sequential(nn.Linear((d1 + 1) * (d2 + 1), hidden), nn.ReLU(), *tail)
        skip_dim = (dim1 + dim2 if porpoise else d1 + d2 + 2) if skip else 0
        self.encoder2 = nn.Sequential(nn.Linear(hidden + skip_dim, fused_dim), nn.ReLU(), *tail)
        self.out_dim = fused_dim

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        """x1 (b, dim1), x2 (b, dim2) -> fused (b, fused_dim)."""
        o1 = self.unimodal1(x1, x1, x2)
        o2 = self.unimodal2(x2, x1, x2)
        # appending 1 keeps the unimodal features inside the outer product
        o1 = torch.cat([o1, o1.new_ones(o1.shape[0], 1)], dim=-1)
        o2 = torch.cat([o2, o2.new_ones(o2.shape[0], 1)], dim=-1)
        kron = rearrange(einsum(o1, o2, "b i, b j -> b i j"), "b i j -> b (i j)")
        out = self.encoder1(self.post_dropout(kron))
        if self.skip:
            extra = (x1, x2) if self.style == "porpoise" else (o1, o2)
            out = torch.cat([out, *(e.to(out.dtype) for e in extra)], dim=-1)
        return self.encoder2(out)


@register_system("pathomic", block="fusion", cite="chen2020pathomic",
                 tiny=dict(path_dim=8, omic_hidden=(8, 8), fused_dim=8, attn_dim=8))
class PathomicFusion(nn.Module):
    """Pathomic Fusion classifier: attention-MIL histology embedding + SNN genomics, gated Kronecker fusion.

    The defaults are the official options (``mmhid`` 64, gates on, bilinear gates, no skip,
    scales 1, dropout 0.25).

    Args:
        in_dim: patch feature size D.
        num_classes: number of classes C.
        num_genes: length G of the gene vector.
        path_dim: histology embedding size (official: 32).
        omic_hidden: SNN widths; the last is the genomic embedding size (official: 64, 48, 32, 32).
        fused_dim: fused embedding size (official ``mmhid``: 64).
        attn_dim: hidden size of the gated attention pooling (our adaptation).
        dropout: dropout everywhere (official: 0.25).
        gate_path: gate the histology embedding (official ``path_gate``: on).
        gate_omic: gate the genomic embedding (official ``omic_gate``: on).
        scale_path: official ``path_scale`` (1).
        scale_omic: official ``omic_scale`` (1).
        use_bilinear: bilinear gates (official: on).
        skip: official ``skip`` (off).
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        num_genes: int,
        path_dim: int = 32,
        omic_hidden: tuple[int, ...] = (64, 48, 32, 32),
        fused_dim: int = 64,
        attn_dim: int = 32,
        dropout: float = 0.25,
        gate_path: bool = True,
        gate_omic: bool = True,
        scale_path: int = 1,
        scale_omic: int = 1,
        use_bilinear: bool = True,
        skip: bool = False,
    ):
        super().__init__()
        self.in_dim, self.num_genes = in_dim, num_genes
        self.path_encoder = nn.Sequential(nn.Linear(in_dim, path_dim), nn.ReLU(), nn.Dropout(dropout))
        self.path_attention = GatedAttention(in_dim=path_dim, hidden=attn_dim)
        self.omic_encoder = SNNEncoder(in_dim=num_genes, hidden=tuple(omic_hidden), dropout=dropout)
        self.fusion = GatedBilinearFusion(
            dim1=path_dim, dim2=self.omic_encoder.out_dim, scale1=scale_path, scale2=scale_omic, fused_dim=fused_dim,
            dropout=dropout, gate1=gate_path, gate2=gate_omic, use_bilinear=use_bilinear, skip=skip, style="pathomic",
        )
        self.classifier = nn.Linear(fused_dim, num_classes)

    def fuse(self, path: Tensor, genes: Tensor) -> dict:
        """The official ``PathomicNet`` on a given histology embedding.

        Args:
            path: histology embeddings (b, path_dim) (the official VGG19 output, or our bag embedding).
            genes: gene vectors (b, G).

        Returns:
            dict(logits (b, C), fused (b, fused_dim)).
        """
        fused = self.fusion(path, self.omic_encoder(genes))
        return dict(logits=self.classifier(fused), fused=fused)

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n), genes (b, G) -> dict(logits (b, C), loss_aux 0, attn (b, n))."""
        mask = check_inputs("PathomicFusion", feats, mask, genes, in_dim=self.in_dim, needs_genes=True, num_genes=self.num_genes)
        # histology: attention-pooled bag embedding
        h = self.path_encoder(feats)
        attn = masked_softmax(rearrange(self.path_attention(h), "b n 1 -> b n"), mask, dim=-1)
        path = einsum(attn, h, "b n, b n d -> b d")
        # genomics, then gated Kronecker fusion
        return output(self.fuse(path, genes)["logits"], attn=attn)
