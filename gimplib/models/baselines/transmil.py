"""TransMIL: transformer-based correlated multiple-instance learning.

Shao, Bian, Chen, Wang, Zhang, Ji & Zhang, "TransMIL: Transformer based Correlated Multiple
Instance Learning for Whole Slide Image Classification", NeurIPS 2021; reference code
github.com/szc19990412/TransMIL (``models/TransMIL.py``).

What is the paper's and what is adapted:
    * Patch features -> Linear + ReLU to ``embed_dim``; the sequence is made square by
      appending copies of its first ``ceil(sqrt N)^2 - N`` tokens and a class token
      (initialised from a standard normal, as the reference code) is prepended. Same.
      (The copy never runs out of tokens: ``ceil(sqrt N)^2 - N <= N`` for every N >= 1.)
    * Two Nystrom self-attention layers (pre-norm, residual, no MLP), with the PPEG module
      between them: the patch tokens are laid out on the ``H x H`` grid and summed with three
      depthwise convolutions (7, 5, 3) and the identity; the class token is passed through.
      Kept; the attention comes from the ``nystrom-attention`` package (landmarks =
      embed_dim // 2, heads = 8, 6 pseudo-inverse iterations, as in the paper).
    * LayerNorm on the class token and a linear classifier. Kept.
    * Padding: the square layout and the Nystrom landmarks depend on the sequence length, so
      a padded bag cannot be run as part of a padded batch without changing its output. Bags
      with padding are therefore run one by one on their valid patches only (exact); a batch
      without padding runs in one go.
    * ``attn`` is not returned (the Nystrom attention map is N x N); it is None.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from nystrom_attention import NystromAttention
from torch import Tensor, nn

from gimplib.models.baselines._common import check_inputs, output
from gimplib.models.baselines.registry import register_system

__all__ = ["PPEG", "TransMIL"]


class PPEG(nn.Module):
    """Pyramid position encoding generator: identity + depthwise convs 7x7, 5x5, 3x3 on the token grid.

    Args:
        dim: token width (each conv is depthwise, groups = dim).
    """

    def __init__(self, *, dim: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3)])

    def forward(self, x: Tensor, side: int) -> Tensor:
        """x (b, 1 + side*side, dim) with the class token first -> same shape."""
        cls, tokens = x[:, :1], x[:, 1:]
        grid = rearrange(tokens, "b (h w) d -> b d h w", h=side, w=side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, rearrange(grid, "b d h w -> b (h w) d")], dim=1)


class _TransLayer(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, num_landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim=dim,
            dim_head=dim // num_heads,
            heads=num_heads,
            num_landmarks=num_landmarks,
            pinv_iterations=6,
            residual=True,
            dropout=dropout,
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.norm(x))


@register_system("transmil", block="pathology", cite="shao2021transmil",
                 tiny=dict(embed_dim=16, num_heads=2, num_landmarks=4),
                 widths=lambda embed_dim, num_heads, num_landmarks, **_: dict(
                     embed_dim=embed_dim, num_heads=num_heads, num_landmarks=num_landmarks))
class TransMIL(nn.Module):
    """TransMIL classifier.

    Args:
        in_dim: patch feature size D.
        num_classes: number of bag classes C.
        embed_dim: token width (paper: 512).
        num_heads: attention heads (paper: 8).
        num_landmarks: Nystrom landmarks (paper: embed_dim // 2); None = embed_dim // 2.
        dropout: dropout after the attention output projection (paper: 0.1).
    """

    def __init__(
        self,
        *,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        num_heads: int = 8,
        num_landmarks: int | None = None,
        dropout: float = 0.1,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"TransMIL: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.in_dim = in_dim
        landmarks = num_landmarks if num_landmarks is not None else embed_dim // 2
        self.encoder = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.layer1 = _TransLayer(dim=embed_dim, num_heads=num_heads, num_landmarks=landmarks, dropout=dropout)
        self.ppeg = PPEG(dim=embed_dim)
        self.layer2 = _TransLayer(dim=embed_dim, num_heads=num_heads, num_landmarks=landmarks, dropout=dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def _encode(self, feats: Tensor) -> Tensor:
        """feats (b, n, D), all valid -> class-token embedding (b, embed_dim)."""
        h = self.encoder(feats)
        n = h.shape[1]
        # square the sequence: its first tokens are repeated at the end
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        # attention, position encoding on the grid, attention
        h = self.layer2(self.ppeg(self.layer1(h), side))
        return self.norm(h[:, 0])

    def forward(self, feats: Tensor, mask: Tensor | None = None, genes: Tensor | None = None, y: Tensor | None = None) -> dict:
        """feats (b, n, D), mask (b, n) -> dict(logits (b, C), loss_aux 0, attn None)."""
        mask = check_inputs("TransMIL", feats, mask, in_dim=self.in_dim)
        if bool(mask.all()):
            cls = self._encode(feats)
        else:
            cls = torch.cat([self._encode(f[m][None]) for f, m in zip(feats, mask)], dim=0)
        return output(self.classifier(cls))
