"""GroupMSA: the group multi-head self-attention gene encoder of GiMP (paper Sect. 2.1).

An expression vector of ``g`` genes is cut into fragments of ``fragment_size`` genes, each
fragment is projected to ``embed_dim``, and the fragments are split into ``num_groups``
groups. Every group gets a learnable group token and runs self-attention inside the group
(all groups of all samples in one batched call); the group tokens and a CLS token then run
self-attention across groups. The CLS output is the gene embedding ``CLS_ge``; the CLS
attention over the group tokens gives gene-group attributions.

Choices the paper leaves open (all constructor arguments):

* ``fragment_size = 256`` genes: 60,480 genes give 237 fragments. The last fragment is
  zero-padded; a zero input contributes nothing through the linear projection, so the
  padded genes are masked exactly (gene tables are standardised, so 0 is also the mean).
* ``num_groups = 16``: fragments are split into contiguous blocks in the gene order of the
  table, ``ceil(num_fragments / num_groups)`` fragments per group; the empty slots of the
  last group(s) are masked out of the attention as keys. With very few genes some groups
  can be empty; their group token then only attends to itself (a learned constant) and
  :meth:`GroupMSA.group_gene_ranges` reports an empty range for it.
* A learnable embedding per fragment position is added after the projection: the
  projection is shared by all fragments, so without it two fragments with equal values
  would be indistinguishable.
* ``depth = 1`` pre-norm transformer block (attention + MLP) inside groups and
  ``depth = 1`` across groups; ``embed_dim = 256``, ``num_heads = 4``, ``dropout = 0.1``.
* The returned group attention is the CLS row of the last inter-group block, averaged over
  heads, with the CLS-to-itself entry dropped (so it sums to slightly less than 1).

Memory stays small at 60,480 genes: each intra-group sequence is ``1 + 15`` tokens long.
"""

from __future__ import annotations

from math import ceil

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from gimplib.utils import exists

__all__ = ["GroupMSA", "TransformerBlock"]


class TransformerBlock(nn.Module):
    """Pre-norm transformer block (multi-head self-attention + MLP) on short sequences.

    Args:
        dim: token width.
        num_heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        dropout: dropout on the attention weights and on both residual branches.
    """

    def __init__(self, *, dim: int, num_heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.1) -> None:
        super().__init__()
        assert dim % num_heads == 0, f"dim {dim} must be divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args:
            x: (b, n, dim) tokens.
            key_mask: (b, n) bool, False for keys nobody may attend to (padding).

        Returns:
            (b, n, dim) tokens and the (b, heads, n, n) attention weights.
        """
        assert x.ndim == 3, f"expected (b, n, dim), got shape {tuple(x.shape)}"
        q, k, v = rearrange(self.to_qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        if exists(key_mask):
            sim = sim.masked_fill(~rearrange(key_mask, "b j -> b 1 1 j"), torch.finfo(sim.dtype).min)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b h i j, b h j d -> b h i d", self.attn_drop(attn), v)
        x = x + self.drop(self.to_out(rearrange(out, "b h n d -> b n (h d)")))
        x = x + self.drop(self.mlp(self.norm2(x)))
        return x, attn


class GroupMSA(nn.Module):
    """Group multi-head self-attention gene encoder (GiMP Sect. 2.1).

    Args:
        num_genes: genes per expression vector (any count; about 1,000 to 60,483 tested).
        fragment_size: genes per fragment (the last fragment is zero-padded).
        num_groups: number of fragment groups, each with its own learnable group token.
        embed_dim: width of fragment embeddings and of the output ``CLS_ge``.
        num_heads: attention heads in every block.
        dropout: dropout in the blocks (inactive in eval mode).
        num_classes: when given, a linear head for supervised pretraining (:meth:`classify`).
        intra_depth: transformer blocks inside each group.
        inter_depth: transformer blocks across group tokens + CLS.
        mlp_ratio: MLP width of the blocks relative to ``embed_dim``.
        fragment_proj: ``"per_fragment"`` gives every fragment its own ``fragment_size x
            embed_dim`` projection, so every gene has its own weights; ``"shared"`` uses one
            projection for all fragments (genes at the same offset of different fragments
            then share weights and are told apart only by the fragment position embedding).
        gene_dropout: during training, zero this share of the input genes (regularisation).
    """

    def __init__(
        self,
        *,
        num_genes: int,
        fragment_size: int = 256,
        num_groups: int = 16,
        embed_dim: int = 256,
        num_heads: int = 4,
        dropout: float = 0.1,
        num_classes: int | None = None,
        intra_depth: int = 1,
        inter_depth: int = 1,
        mlp_ratio: float = 2.0,
        fragment_proj: str = "shared",
        gene_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_genes < 1 or fragment_size < 1 or num_groups < 1:
            raise ValueError(
                f"num_genes, fragment_size and num_groups must be positive, got {num_genes}, {fragment_size}, {num_groups}"
            )
        if fragment_proj not in ("per_fragment", "shared"):
            raise ValueError(f"fragment_proj must be 'per_fragment' or 'shared', not {fragment_proj!r}")
        if not 0.0 <= gene_dropout < 1.0:
            raise ValueError(f"gene_dropout must be in [0, 1), not {gene_dropout!r}")
        if inter_depth < 1:
            raise ValueError("inter_depth must be >= 1 (the CLS token is read from the inter-group blocks)")
        self.num_genes = num_genes
        self.fragment_size = fragment_size
        self.num_groups = num_groups
        self.embed_dim = embed_dim
        self.num_fragments = ceil(num_genes / fragment_size)
        self.group_size = ceil(self.num_fragments / num_groups)  # fragments per group

        self.fragment_proj = fragment_proj
        if fragment_proj == "shared":
            self.to_fragment = nn.Linear(fragment_size, embed_dim)
        else:  # one (fragment_size, embed_dim) matrix per fragment, nn.Linear's initialisation
            bound = fragment_size**-0.5
            self.fragment_weight = nn.Parameter(torch.empty(self.num_fragments, fragment_size, embed_dim).uniform_(-bound, bound))
            self.fragment_bias = nn.Parameter(torch.empty(self.num_fragments, embed_dim).uniform_(-bound, bound))
        self.gene_dropout = nn.Dropout(gene_dropout)
        self.fragment_pos = nn.Parameter(torch.randn(self.num_fragments, embed_dim) * 0.02)
        self.group_tokens = nn.Parameter(torch.randn(num_groups, embed_dim) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(embed_dim) * 0.02)
        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, dropout=dropout)
        self.intra = nn.ModuleList([TransformerBlock(**block) for _ in range(intra_depth)])
        self.inter = nn.ModuleList([TransformerBlock(**block) for _ in range(inter_depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if exists(num_classes) else None

        # key mask of the (num_groups, 1 + group_size) intra-group sequences: group token + real fragments
        slots = torch.arange(num_groups * self.group_size) < self.num_fragments
        slots = rearrange(slots, "(g k) -> g k", g=num_groups)
        self.register_buffer("slot_mask", torch.cat([torch.ones(num_groups, 1, dtype=torch.bool), slots], 1), persistent=False)

    def group_gene_ranges(self) -> list[tuple[int, int]]:
        """``[start, stop)`` gene column indices covered by each group (empty when start == stop)."""
        genes_per_group = self.group_size * self.fragment_size
        return [
            (min(i * genes_per_group, self.num_genes), min((i + 1) * genes_per_group, self.num_genes))
            for i in range(self.num_groups)
        ]

    def forward(self, genes: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Encode expression vectors.

        Args:
            genes: (b, num_genes) expression values (transformed/standardised).
            return_attn: also return the CLS attention over groups.

        Returns:
            ``cls`` (b, embed_dim), and with ``return_attn`` also (b, num_groups) attention.
        """
        assert genes.ndim == 2, f"genes must be (b, g), got shape {tuple(genes.shape)}"
        assert genes.shape[1] == self.num_genes, (
            f"GroupMSA was built for {self.num_genes} genes, got {genes.shape[1]}"
        )
        b = genes.shape[0]

        # fragments: zero-pad the last one, project, add fragment positions
        genes = F.pad(genes, (0, self.num_fragments * self.fragment_size - self.num_genes))
        genes = rearrange(self.gene_dropout(genes), "b (f s) -> b f s", s=self.fragment_size)
        if self.fragment_proj == "shared":
            x = self.to_fragment(genes)
        else:
            x = torch.einsum("b f s, f s d -> b f d", genes, self.fragment_weight) + self.fragment_bias
        x = x + self.fragment_pos

        # groups: pad empty slots, prepend a group token to each group
        x = F.pad(x, (0, 0, 0, self.num_groups * self.group_size - self.num_fragments))
        x = rearrange(x, "b (g k) d -> b g k d", g=self.num_groups)
        tokens = repeat(self.group_tokens, "g d -> b g 1 d", b=b)
        x = rearrange(torch.cat([tokens, x], dim=2), "b g k d -> (b g) k d")
        key_mask = repeat(self.slot_mask, "g k -> (b g) k", b=b)

        # intra-group attention: all groups of all samples in one batched call
        for block in self.intra:
            x, _ = block(x, key_mask)
        group_tokens = rearrange(x[:, 0], "(b g) d -> b g d", b=b)

        # inter-group attention over CLS + group tokens
        x = torch.cat([repeat(self.cls_token, "d -> b 1 d", b=b), group_tokens], dim=1)
        for block in self.inter:
            x, attn = block(x)
        cls = self.norm(x[:, 0])
        if return_attn:
            return cls, attn[:, :, 0, 1:].mean(dim=1)
        return cls

    def classify(self, genes: Tensor) -> Tensor:
        """(b, num_genes) -> (b, num_classes) logits of the supervised-pretraining head."""
        if self.head is None:
            raise RuntimeError("this GroupMSA has no classification head; build it with num_classes=...")
        return self.head(self.forward(genes))
