"""PORPOISE: attention MIL for histology, SNN for genomics, gated bilinear fusion.

Chen, Lu, Williamson, Chen, Lipkova, Noor, Shaban, Shady, Williams, Joo & Mahmood,
"Pan-cancer integrative histology-genomic analysis via multimodal deep learning",
Cancer Cell 40(8), 2022; reference code github.com/mahmoodlab/PORPOISE (``PorpoiseMMF``
with ``fusion="bilinear"``, ``size_arg="small"``).

What is the official model's and what is adapted:
    * Histology: input Dropout(0.1) -> Linear(D, 512) + ReLU + Dropout -> gated attention
      (512 -> 256 hidden, dropout on both branches) -> weighted sum -> "rho" Linear(512, 256)
      + ReLU + Dropout. Same (``embed_dim`` = 512, ``bag_dim`` = 256).
    * Genomics: a self-normalising network of two 256-wide blocks. Same.
    * Fusion (:class:`~gimplib.models.baselines.pathomic.GatedBilinearFusion`,
      ``style="porpoise"``): each modality is gated by ``sigmoid(Linear(cat(h_path, h_omic)))``
      (official ``use_bilinear=0``) and reduced 8-fold (256 -> 32) before the Kronecker
      product; Linear to 256 + ReLU; skip connection of the raw unimodal embeddings (official
      ``skip=True``); Linear to 256 + ReLU. No dropout after these two layers. Same.
    * Head: PORPOISE predicts survival (discrete-time hazards, NLL loss); here the same
      ``Linear(256, C)`` outputs class logits trained with cross-entropy, because the task is
      LUAD vs LUSC classification. Adapted.
    * Genes: the paper uses mutation, copy-number and RNA-seq features; here the gene
      vector is whatever the cohort provides (RNA-seq expression).
    * Padding: padded patches get zero attention.

The defaults are ``PorpoiseMMF``'s constructor defaults. Its ``main.py`` command line has
other defaults (``--dropinput 0``, ``--skip``, ``--gate_path`` and ``--gate_omic`` off); pass
``dropinput=0.0, skip=False, gate_path=False, gate_omic=False`` to get those.
"""

from __future__ import annotations

from einops import einsum, rearrange
from torch import Tensor, nn

from gimplib.models.baselines._common import GatedAttention, SNNEncoder, check_inputs, masked_softmax, output
from gimplib.models.baselines.pathomic import GatedBilinearFusion
from gimplib.models.baselines.registry import register_system

__all__ = ["PORPOISE"]


# The gates shrink the 256-d embeddings by `scale` (8); at embed_dim 512 (the paper's scale) the
# sweep builds the official model, and a smaller demo keeps the gates 8+ wide.
@register_system("porpoise", block="fusion", cite="chen2022porpoise",
                 tiny=dict(embed_dim=16, omic_hidden=(16, 16), scale=2),  # bag width 8
                 widths=lambda embed_dim, **_: dict(embed_dim=embed_dim, scale=max(1, min(8, embed_dim // 64))))
class PORPOISE(nn.Module):
    """PORPOISE (AMIL + SNN + gated bilinear fusion) classifier.

    Args:
        in_dim: patch feature size D.
        num_classes: number of classes C.
        num_genes: length G of the gene vector.
        embed_dim: instance width after the first Linear (official "small": 512).
        bag_dim: attention hidden size, bag ("rho") width, genomic width and fused width
            (official: 256); None = ``embed_dim // 2``.
        omic_hidden: SNN widths (official: 256, 256); None = ``(bag_dim, bag_dim)``.
        scale: gated-embedding reduction before the Kronecker product (official: 8).
        dropout: dropout of the histology branch, the attention and the fusion (official: 0.25).
        dropinput: dropout on the input patch features (official: 0.1).
        gate_path: gate the histology embedding (official: on).
        gate_omic: gate the genomic embedding (official: on).
        use_bilinear: bilinear gates instead of a Linear on the concatenation (official: off).
        skip: concatenate the raw unimodal embeddings before the last fusion layer (official: on).
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        num_genes: int,
        embed_dim: int = 512,
        bag_dim: int | None = None,
        omic_hidden: tuple[int, ...] | None = None,
        scale: int = 8,
        dropout: float = 0.25,
        dropinput: float = 0.1,
        gate_path: bool = True,
        gate_omic: bool = True,
        use_bilinear: bool = False,
        skip: bool = True,
    ):
        super().__init__()
        self.in_dim, self.num_genes = in_dim, num_genes
        bag_dim = bag_dim if bag_dim is not None else embed_dim // 2
        omic_hidden = tuple(omic_hidden) if omic_hidden is not None else (bag_dim, bag_dim)
        self.input_dropout = nn.Dropout(dropinput)
        self.path_encoder = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.path_attention = GatedAttention(in_dim=embed_dim, hidden=bag_dim, dropout=dropout)
        self.path_rho = nn.Sequential(nn.Linear(embed_dim, bag_dim), nn.ReLU(), nn.Dropout(dropout))
        self.omic_encoder = SNNEncoder(in_dim=num_genes, hidden=omic_hidden, dropout=dropout)
        self.fusion = GatedBilinearFusion(
            dim1=bag_dim, dim2=self.omic_encoder.out_dim, scale1=scale, scale2=scale, hidden=bag_dim, fused_dim=bag_dim,
            dropout=dropout, gate1=gate_path, gate2=gate_omic, use_bilinear=use_bilinear, skip=skip, style="porpoise",
        )
        self.classifier = nn.Linear(bag_dim, num_classes)

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n), genes (b, G) -> dict(logits (b, C), loss_aux 0, attn (b, n))."""
        mask = check_inputs("PORPOISE", feats, mask, genes, in_dim=self.in_dim, needs_genes=True, num_genes=self.num_genes)
        # histology: gated-attention MIL
        h = self.path_encoder(self.input_dropout(feats))
        attn = masked_softmax(rearrange(self.path_attention(h), "b n 1 -> b n"), mask, dim=-1)
        path = self.path_rho(einsum(attn, h, "b n, b n d -> b d"))
        # genomics, then gated fusion
        fused = self.fusion(path, self.omic_encoder(genes))
        return output(self.classifier(fused), attn=attn)
