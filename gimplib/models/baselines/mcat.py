"""MCAT: multimodal co-attention transformer with genomic-guided co-attention.

Chen, Lu, Weng, Chen, Williamson, Manz, Shady & Mahmood, "Multimodal Co-Attention
Transformer for Survival Prediction in Gigapixel Whole Slide Images", ICCV 2021; reference
code github.com/mahmoodlab/MCAT (``MCAT_Surv``, ``fusion="concat"``).

What is the paper's and what is adapted:
    * Genomic tokens: the paper groups genes into 6 curated functional sets (tumour
      suppressors, oncogenes, protein kinases, cell differentiation, transcription, cytokines
      and growth) and embeds each set with its own SNN into one token. We have no curated
      signature lists for an arbitrary gene table, so the G genes (in table order) are split
      into ``num_groups`` contiguous groups of near-equal size, each with its own SNN. This
      is our adaptation; pass a gene order that puts related genes together if you have one,
      or the signatures' sizes as ``group_sizes`` (the official ``omic_sizes``).
    * Genomic-guided co-attention: the genomic tokens are the queries and the patch
      embeddings the keys/values of a single-head attention, giving one WSI token per gene
      group. Kept; padded patches are excluded through the key padding mask.
    * Two small transformer encoders (2 layers, 8 heads, FFN 512) over the G co-attended WSI
      tokens and over the G genomic tokens, each followed by gated-attention pooling and a
      Linear + ReLU + Dropout layer; the two are fused by concatenation and an MLP. Kept
      (the paper's default "concat" fusion).
    * Head: MCAT predicts survival (discrete hazards); here a linear layer on the fused
      embedding outputs ``num_classes`` logits trained with cross-entropy (LUAD vs LUSC).
    * Outputs: ``coattn`` is the raw co-attention (the scaled query-key products before the
      softmax, -inf at padding) (b, G, n), as the reference code returns it; ``attn`` is
      our heatmap view, the softmaxed co-attention averaged over the gene groups (b, n).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from gimplib.models.baselines._common import GatedAttention, SNNEncoder, check_inputs, output
from gimplib.models.baselines.registry import register_system

__all__ = ["MCAT", "contiguous_groups"]


def contiguous_groups(num_genes: int, num_groups: int) -> list[int]:
    """Sizes of ``num_groups`` contiguous gene groups covering ``num_genes`` (first ones one larger)."""
    if not 1 <= num_groups <= num_genes:
        raise ValueError(f"MCAT: num_groups must be in [1, num_genes={num_genes}]; got {num_groups}")
    base, extra = divmod(num_genes, num_groups)
    return [base + (i < extra) for i in range(num_groups)]


class _CoAttention(nn.Module):
    """Single-head attention of the genomic tokens (queries) over the patches (keys, values).

    The parameters are named as in ``nn.MultiheadAttention`` (so official checkpoints load);
    the forward also returns the raw scores, which ``nn.MultiheadAttention`` does not.
    """

    def __init__(self, *, dim: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """query (b, g, d), keys (b, n, d), mask (b, n) -> (out (b, g, d), raw scores (b, g, n))."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = F.linear(query, wq, bq) * query.shape[-1] ** -0.5
        k, v = F.linear(keys, wk, bk), F.linear(keys, wv, bv)
        raw = einsum(q, k, "b g d, b n d -> b g n").masked_fill(~mask[:, None, :], float("-inf"))
        out = einsum(raw.softmax(dim=-1), v, "b g n, b n d -> b g d")
        return self.out_proj(out), raw


class _TokenPool(nn.Module):
    """Transformer over G tokens, gated-attention pooling, Linear + ReLU + Dropout."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=ff_dim, dropout=dropout, activation="relu", batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.attention = GatedAttention(in_dim=dim, hidden=dim, dropout=dropout)
        self.rho = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.transformer(tokens)
        a = rearrange(self.attention(h), "b g 1 -> b g").softmax(dim=-1)
        return self.rho(einsum(a, h, "b g, b g d -> b d"))


# The official width is 256 at d = 512; at least 32, so that a small demo's heads keep 8
# dimensions (at 16 wide, 4 heads, it predicted one class on every demo seed).
@register_system("mcat", block="fusion", cite="chen2021mcat", tiny=dict(embed_dim=16, num_heads=2, num_groups=3),
                 widths=lambda embed_dim, num_heads, **_: dict(embed_dim=max(32, embed_dim // 2), num_heads=num_heads))
class MCAT(nn.Module):
    """MCAT classifier.

    Args:
        in_dim: patch feature size D.
        num_classes: number of classes C.
        num_genes: length G of the gene vector.
        num_groups: number of gene groups (genomic tokens); paper: 6 signatures.
        group_sizes: the size of each gene group, in gene order (official ``omic_sizes``);
            overrides ``num_groups``; must sum to ``num_genes``.
        embed_dim: token width (paper: 256).
        depth: layers of each token transformer (paper: 2).
        num_heads: heads of each token transformer (paper: 8).
        dropout: dropout everywhere (paper: 0.25).
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        num_genes: int,
        num_groups: int = 6,
        group_sizes: tuple[int, ...] | None = None,
        embed_dim: int = 256,
        depth: int = 2,
        num_heads: int = 8,
        dropout: float = 0.25,
    ):
        super().__init__()
        self.in_dim, self.num_genes = in_dim, num_genes
        if group_sizes is not None:
            if sum(group_sizes) != num_genes or min(group_sizes) < 1:
                raise ValueError(f"MCAT: group_sizes {tuple(group_sizes)} must be positive and sum to num_genes={num_genes}")
            self.group_sizes = [int(g) for g in group_sizes]
        else:
            self.group_sizes = contiguous_groups(num_genes, num_groups)
        self.path_encoder = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.gene_encoders = nn.ModuleList(
            [SNNEncoder(in_dim=size, hidden=(embed_dim, embed_dim), dropout=dropout) for size in self.group_sizes]
        )
        self.coattn = _CoAttention(dim=embed_dim)
        self.path_pool = _TokenPool(dim=embed_dim, depth=depth, num_heads=num_heads, ff_dim=2 * embed_dim, dropout=dropout)
        self.omic_pool = _TokenPool(dim=embed_dim, depth=depth, num_heads=num_heads, ff_dim=2 * embed_dim, dropout=dropout)
        self.fusion = nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim), nn.ReLU())
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n), genes (b, G) -> dict(logits (b, C), loss_aux 0, attn (b, n), coattn (b, g, n))."""
        mask = check_inputs("MCAT", feats, mask, genes, in_dim=self.in_dim, needs_genes=True, num_genes=self.num_genes)
        # patch embeddings and one genomic token per gene group
        h = self.path_encoder(feats)
        chunks = torch.split(genes, self.group_sizes, dim=-1)
        omic = torch.stack([enc(chunk) for enc, chunk in zip(self.gene_encoders, chunks)], dim=1)
        # genomic-guided co-attention: each gene group gathers its WSI token
        path, coattn = self.coattn(omic, h, mask)
        # transformer + attention pooling per modality, then concat fusion
        fused = self.fusion(torch.cat([self.path_pool(path), self.omic_pool(omic)], dim=-1))
        return output(self.classifier(fused), attn=coattn.softmax(dim=-1).mean(dim=1), coattn=coattn)
