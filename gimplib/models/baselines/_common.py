"""Building blocks shared by the baselines: input checks, masked softmax, gated attention, SNN.

Every baseline classifier follows one contract::

    forward(feats (b, n, D), mask (b, n) bool | None = None, genes (b, G) | None = None,
            y (b,) long | None = None) -> dict(logits (b, C), loss_aux scalar, attn (b, n) | None)

``mask`` is True at real patches and False at padding; padded positions never change the
output. ``loss_aux`` is the system's own auxiliary objective (0 when it has none, or when it
needs ``y`` and none was given); the training engine minimises ``CE(logits, y) + loss_aux``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gimplib.utils import exists

__all__ = [
    "GatedAttention",
    "ce_or_zero",
    "check_inputs",
    "masked_mean",
    "masked_softmax",
    "output",
    "snn_block",
    "SNNEncoder",
    "zero_loss",
]


def check_inputs(
    name: str,
    feats: Tensor,
    mask: Tensor | None,
    genes: Tensor | None = None,
    *,
    in_dim: int | None = None,
    needs_genes: bool = False,
    num_genes: int | None = None,
) -> Tensor:
    """Validate the common inputs and return a boolean mask (all True when ``mask`` is None).

    Raises:
        ValueError: naming the system and the expected shape when an input is malformed.
    """
    if feats.ndim != 3:
        raise ValueError(f"{name}: feats must be (b, n, D); got shape {tuple(feats.shape)}")
    b, n, d = feats.shape
    if exists(in_dim) and d != in_dim:
        raise ValueError(f"{name}: feats have {d} features per patch; the model was built with in_dim={in_dim}")
    if n == 0:
        raise ValueError(f"{name}: empty bag (n = 0 patches)")
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=feats.device)
    else:
        if mask.shape != (b, n):
            raise ValueError(f"{name}: mask must be (b, n) = {(b, n)}; got {tuple(mask.shape)}")
        mask = mask.bool()
        if not bool(mask.any(dim=1).all()):
            bad = (~mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"{name}: bag(s) {bad} in the batch have no valid patch (mask all False)")
    if needs_genes:
        if genes is None:
            raise ValueError(f"{name} needs genes (b, G); got None")
        if genes.ndim != 2 or genes.shape[0] != b:
            raise ValueError(f"{name}: genes must be (b, G) with b = {b}; got {tuple(genes.shape)}")
        if exists(num_genes) and genes.shape[1] != num_genes:
            raise ValueError(f"{name}: genes have {genes.shape[1]} columns; the model was built with num_genes={num_genes}")
    return mask


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``scores`` over ``dim`` with masked-out (False) entries given zero weight."""
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=dim)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (b, n, d) over its valid rows ``mask`` (b, n) -> (b, d)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def zero_loss(ref: Tensor) -> Tensor:
    """A scalar 0 on ``ref``'s device and dtype (for systems without an auxiliary loss)."""
    return ref.new_zeros(())


def output(logits: Tensor, loss_aux: Tensor | None = None, attn: Tensor | None = None, **extra) -> dict:
    """The dict every baseline classifier returns."""
    return dict(logits=logits, loss_aux=loss_aux if exists(loss_aux) else zero_loss(logits), attn=attn, **extra)


class GatedAttention(nn.Module):
    """Gated attention scores of Ilse et al. (2018), eq. 9: ``w^T (tanh(V h) * sigmoid(U h))``.

    Args:
        in_dim: size of each instance embedding h.
        hidden: size of the V and U projections.
        num_branches: number of attention heads (CLAM-MB uses one per class).
        dropout: dropout on the tanh and sigmoid branches (CLAM's choice; 0 in Ilse et al.).
    """

    def __init__(self, *, in_dim: int, hidden: int = 128, num_branches: int = 1, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, num_branches)

    def forward(self, h: Tensor) -> Tensor:
        """h (b, n, in_dim) -> raw scores (b, n, num_branches) (softmax is the caller's job)."""
        return self.w(self.V(h) * self.U(h))


def snn_block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """One self-normalising block (Klambauer et al. 2017): Linear, ELU, AlphaDropout."""
    linear = nn.Linear(in_dim, out_dim)
    # LeCun-normal initialisation keeps activations near zero mean / unit variance.
    nn.init.normal_(linear.weight, std=1.0 / math.sqrt(in_dim))
    nn.init.zeros_(linear.bias)
    return nn.Sequential(linear, nn.ELU(), nn.AlphaDropout(dropout))


class SNNEncoder(nn.Module):
    """A stack of self-normalising blocks, the genomic branch of PORPOISE, Pathomic Fusion and MCAT.

    Args:
        in_dim: number of input genes.
        hidden: widths of the blocks; the output size is ``hidden[-1]``.
        dropout: AlphaDropout rate.
    """

    def __init__(self, *, in_dim: int, hidden: tuple[int, ...] = (256, 256), dropout: float = 0.25):
        super().__init__()
        dims = (in_dim, *hidden)
        self.net = nn.Sequential(*[snn_block(a, b, dropout) for a, b in zip(dims[:-1], dims[1:])])
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in_dim) -> (..., hidden[-1])."""
        return self.net(x)


def ce_or_zero(logits: Tensor, y: Tensor | None) -> Tensor:
    """Cross-entropy when labels are given, else a scalar 0 (helper for auxiliary losses)."""
    if y is None:
        return zero_loss(logits)
    return F.cross_entropy(logits, y)
