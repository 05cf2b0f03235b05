"""PORPOISE: attention MIL for histology, SNN for genomics, gated bilinear fusion.

Chen, Lu, Williamson, Chen, Lipkova, Noor, Shaban, Shady, Williams, Joo & Mahmood,
"Pan-cancer integrative histology-genomic analysis via multimodal deep learning",
Cancer Cell 40(8), 2022.

What is the paper's and what is adapted:
    * Histology: patch features -> Linear + ReLU + Dropout (256) -> gated attention pooling
      -> Linear + ReLU + Dropout (the "rho" layer). Kept.
    * Genomics: a self-normalising network of two 256-wide blocks. Kept.
    * Fusion: the gated bilinear (Kronecker-product) fusion of Pathomic Fusion, with each
      modality gated and reduced 8-fold (256 -> 32) before the outer product, fused to 256.
      Kept (shared implementation :class:`~gimplib.models.baselines.pathomic.GatedBilinearFusion`).
    * Head: PORPOISE predicts survival (discrete-time hazards, NLL loss); here the same
      linear layer on the fused embedding outputs ``num_classes`` logits trained with
      cross-entropy, because the task is LUAD vs LUSC classification.
    * Genes: the paper uses mutation, copy-number and RNA-seq features; here the gene
      vector is whatever the cohort provides (RNA-seq expression).
"""

from __future__ import annotations

from einops import einsum, rearrange
from torch import Tensor, nn

from gimplib.models.baselines._common import GatedAttention, SNNEncoder, check_inputs, masked_softmax, output
from gimplib.models.baselines.pathomic import GatedBilinearFusion

__all__ = ["PORPOISE"]


class PORPOISE(nn.Module):
    """PORPOISE (AMIL + SNN + bilinear fusion) classifier.

    Args:
        in_dim: patch feature size D.
        num_classes: number of classes C.
        num_genes: length G of the gene vector.
        embed_dim: width of both unimodal embeddings and of the fused one (paper: 256).
        omic_hidden: SNN widths (paper: 256, 256); the last is the genomic embedding size.
        scale: gated-embedding reduction before the Kronecker product (paper: 8).
        dropout: dropout everywhere (paper: 0.25).
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        num_genes: int,
        embed_dim: int = 256,
        omic_hidden: tuple[int, ...] = (256, 256),
        scale: int = 8,
        dropout: float = 0.25,
    ):
        super().__init__()
        self.in_dim, self.num_genes = in_dim, num_genes
        self.path_encoder = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.path_attention = GatedAttention(in_dim=embed_dim, hidden=embed_dim, dropout=dropout)
        self.path_rho = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.omic_encoder = SNNEncoder(in_dim=num_genes, hidden=tuple(omic_hidden), dropout=dropout)
        self.fusion = GatedBilinearFusion(
            dim1=embed_dim,
            dim2=self.omic_encoder.out_dim,
            scale1=scale,
            scale2=scale,
            fused_dim=embed_dim,
            dropout=dropout,
        )
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n), genes (b, G) -> dict(logits (b, C), loss_aux 0, attn (b, n))."""
        mask = check_inputs("PORPOISE", feats, mask, genes, in_dim=self.in_dim, needs_genes=True, num_genes=self.num_genes)
        # histology: gated-attention MIL
        h = self.path_encoder(feats)
        attn = masked_softmax(rearrange(self.path_attention(h), "b n 1 -> b n"), mask, dim=-1)
        path = self.path_rho(einsum(attn, h, "b n, b n d -> b d"))
        # genomics, then gated bilinear fusion
        fused = self.fusion(path, self.omic_encoder(genes))
        return output(self.classifier(fused), attn=attn)
