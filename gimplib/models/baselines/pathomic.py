"""Pathomic Fusion: gated Kronecker-product fusion of histology and genomic embeddings.

Chen, Lu, Wang, Williamson, Rodig, Lindeman & Mahmood, "Pathomic Fusion: An Integrated
Framework for Fusing Histopathology and Genomic Features for Cancer Diagnosis and
Prognosis", IEEE Transactions on Medical Imaging 41(4), 2022 (arXiv 2019).

What is the paper's and what is adapted:
    * Genomic branch: a self-normalising network (SNN: Linear + ELU + AlphaDropout blocks)
      on the gene vector, ending in a 32-d embedding. Kept (widths are parameters).
    * Fusion (:class:`GatedBilinearFusion`): each modality is gated by attention scores that
      a bilinear layer computes from *both* modalities, a 1 is appended to each gated
      embedding and their Kronecker (outer) product keeps the unimodal terms and every
      pairwise interaction; two fully connected layers, with a skip connection of the
      unimodal inputs, give the fused embedding (64-d). Kept.
    * Histology branch: the paper embeds 512 x 512 region-of-interest images with a CNN
      (and cell graphs with a GCN). We only have 1024-d patch features of a whole slide, so
      the histology embedding is a multiple-instance *bag* embedding: patches -> Linear +
      ReLU -> gated-attention pooling (Ilse et al. 2018) -> 32-d. The graph branch is not
      used (no cell graphs). This is our adaptation, not the paper's.
    * Head: a linear classifier on the fused embedding (the paper's grading task is also a
      classification), trained with cross-entropy by the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from gimplib.models.baselines._common import GatedAttention, SNNEncoder, check_inputs, masked_softmax, output

__all__ = ["GatedBilinearFusion", "PathomicFusion"]


class _GatedUnimodal(nn.Module):
    """Gate one modality's embedding with scores computed from both modalities."""

    def __init__(self, *, dim_self: int, dim_a: int, dim_b: int, out_dim: int, dropout: float, gated: bool):
        super().__init__()
        self.gated = gated
        self.proj = nn.Sequential(nn.Linear(dim_self, out_dim), nn.ReLU())
        self.gate = nn.Bilinear(dim_a, dim_b, out_dim) if gated else None
        self.out = nn.Sequential(nn.Linear(out_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x_self: Tensor, a: Tensor, b: Tensor) -> Tensor:
        h = self.proj(x_self)
        if self.gated:
            # F.bilinear has no autocast rule: run it in the activations' dtype
            w, bias = self.gate.weight.to(h.dtype), self.gate.bias.to(h.dtype)
            h = torch.sigmoid(F.bilinear(a.to(h.dtype), b.to(h.dtype), w, bias)) * h
        return self.out(h)


class GatedBilinearFusion(nn.Module):
    """Gated attention + Kronecker-product fusion of two embeddings (Pathomic Fusion, Sec. II-C).

    Args:
        dim1: size of the first (histology) embedding.
        dim2: size of the second (genomic) embedding.
        scale1: the gated first embedding has ``dim1 // scale1`` features (PORPOISE uses 8).
        scale2: likewise for the second.
        fused_dim: size of the fused output.
        hidden: width of the layer right after the Kronecker product.
        dropout: dropout after the gates, the product and each layer.
        gate1: gate the first modality.
        gate2: gate the second modality.
        skip: concatenate the raw unimodal inputs before the last layer.
    """

    def __init__(
        self,
        *,
        dim1: int,
        dim2: int,
        scale1: int = 1,
        scale2: int = 1,
        fused_dim: int = 64,
        hidden: int = 256,
        dropout: float = 0.25,
        gate1: bool = True,
        gate2: bool = True,
        skip: bool = True,
    ):
        super().__init__()
        d1, d2 = dim1 // scale1, dim2 // scale2
        self.skip = skip
        self.unimodal1 = _GatedUnimodal(dim_self=dim1, dim_a=dim1, dim_b=dim2, out_dim=d1, dropout=dropout, gated=gate1)
        self.unimodal2 = _GatedUnimodal(dim_self=dim2, dim_a=dim1, dim_b=dim2, out_dim=d2, dropout=dropout, gated=gate2)
        self.post_dropout = nn.Dropout(dropout)
        self.encoder1 = nn.Sequential(nn.Linear((d1 + 1) * (d2 + 1), hidden), nn.ReLU(), nn.Dropout(dropout))
        skip_dim = dim1 + dim2 if skip else 0
        self.encoder2 = nn.Sequential(nn.Linear(hidden + skip_dim, fused_dim), nn.ReLU(), nn.Dropout(dropout))
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
            out = torch.cat([out, x1, x2], dim=-1)
        return self.encoder2(out)


class PathomicFusion(nn.Module):
    """Pathomic Fusion classifier: attention-MIL histology embedding + SNN genomics, gated Kronecker fusion.

    Args:
        in_dim: patch feature size D.
        num_classes: number of classes C.
        num_genes: length G of the gene vector.
        path_dim: histology embedding size (paper: 32).
        omic_hidden: SNN widths; the last is the genomic embedding size (paper: 64, 48, 32, 32).
        fused_dim: fused embedding size (paper: 64).
        attn_dim: hidden size of the gated attention pooling.
        dropout: dropout everywhere (paper: 0.25).
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
    ):
        super().__init__()
        self.in_dim, self.num_genes = in_dim, num_genes
        self.path_encoder = nn.Sequential(nn.Linear(in_dim, path_dim), nn.ReLU(), nn.Dropout(dropout))
        self.path_attention = GatedAttention(in_dim=path_dim, hidden=attn_dim)
        self.omic_encoder = SNNEncoder(in_dim=num_genes, hidden=tuple(omic_hidden), dropout=dropout)
        self.fusion = GatedBilinearFusion(dim1=path_dim, dim2=self.omic_encoder.out_dim, fused_dim=fused_dim, dropout=dropout)
        self.classifier = nn.Linear(fused_dim, num_classes)

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n), genes (b, G) -> dict(logits (b, C), loss_aux 0, attn (b, n))."""
        mask = check_inputs("PathomicFusion", feats, mask, genes, in_dim=self.in_dim, needs_genes=True, num_genes=self.num_genes)
        # histology: attention-pooled bag embedding
        h = self.path_encoder(feats)
        attn = masked_softmax(rearrange(self.path_attention(h), "b n 1 -> b n"), mask, dim=-1)
        path = einsum(attn, h, "b n, b n d -> b d")
        # genomics, then gated Kronecker fusion
        fused = self.fusion(path, self.omic_encoder(genes))
        return output(self.classifier(fused), attn=attn)
