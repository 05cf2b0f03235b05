"""Losses of GiMP and of the compared systems.

* :func:`triplet_loss` -- the gene-induced triplet loss of the paper (Eq. 4): squared
  Euclidean distances between embeddings (for GiMP, ``concat(CLS_img, CLS_ge)``) and a
  margin, with triplets mined from the labels of a mini-batch.
* :func:`masked_l1` -- the masked patch modelling reconstruction loss (Eq. 3).
* :func:`info_nce` -- the symmetric contrastive loss used by the CLIP/BioViL/MGCA-style
  baselines.

Every loss returns a scalar tensor that stays connected to its inputs, also when there is
nothing to average over (no valid triplet, no masked position): the value is then exactly
zero and the gradient is zero, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce", "masked_l1", "pairwise_distances", "triplet_loss"]


def _zero_like_graph(x: Tensor) -> Tensor:
    """An exact 0 that keeps ``x`` in the autograd graph (so ``backward`` never fails)."""
    return x.sum() * 0.0 + 0.0  # "+ 0.0" turns a -0.0 (negative sum) into +0.0 for the logs


def pairwise_distances(emb: Tensor, *, squared: bool = True, eps: float = 1e-12) -> Tensor:
    """All pairwise Euclidean distances of a batch of embeddings.

    Args:
        emb: (b, e) embeddings.
        squared: return squared distances (the paper's choice) instead of distances.
        eps: floor under the square root, so the gradient of ``d(x, x) = 0`` is finite.

    Returns:
        (b, b) distances; the diagonal is exactly 0.
    """
    assert emb.ndim == 2, f"emb must be (b, e), got shape {tuple(emb.shape)}"
    # (a - b)^2 summed directly: exact zeros on the diagonal and no negative values,
    # unlike the |a|^2 + |b|^2 - 2ab expansion. Batches are small (tens), so the
    # (b, b, e) difference tensor is cheap.
    diff = emb[:, None, :] - emb[None, :, :]
    dist = diff.pow(2).sum(-1)
    if squared:
        return dist
    return torch.sqrt(dist.clamp_min(eps)) * (dist > 0)


def triplet_loss(
    emb: Tensor,
    y: Tensor,
    *,
    margin: float = 0.8,
    mining: str = "all",
    squared: bool = True,
    reduction: str = "active",
) -> Tensor:
    """Triplet margin loss with triplets mined from the labels of a mini-batch (Eq. 4).

    ``loss(a, p, n) = max(0, d(a, p) - d(a, n) + margin)`` for an anchor ``a``, a positive
    ``p`` (same label, ``p != a``) and a negative ``n`` (other label).

    Mining (the paper does not say; both are offered):

    * ``"all"`` (default, batch-all): every valid triplet of the batch.
    * ``"hard"`` (batch-hard, Hermans et al. 2017): per anchor, its farthest positive and
      its closest negative; anchors without a positive or a negative are skipped.

    Reduction over the triplets of batch-all (again the paper is silent):

    * ``"active"`` (default): mean over the triplets whose loss is positive, as recommended
      for batch-all by Hermans et al. and as pytorch-metric-learning does by default. Easy
      triplets (already satisfied) then do not dilute the gradient as training proceeds.
    * ``"valid"``: mean over all valid triplets (a smoother, shrinking loss).

    Batch-hard always averages over the anchors that have a triplet.

    Args:
        emb: (b, e) embeddings (GiMP: ``concat(CLS_img, CLS_ge)``).
        y: (b,) integer labels.
        margin: the margin (0.8 in the paper).
        mining: ``"all"`` or ``"hard"``.
        squared: squared Euclidean distances (the paper) or plain distances.
        reduction: ``"active"`` or ``"valid"`` (batch-all only).

    Returns:
        Scalar loss. Exactly 0, with a (zero) gradient path to ``emb``, when the batch has
        no valid triplet (fewer than two samples of a class, or a single class), or when
        ``reduction="active"`` and no triplet is active.
    """
    assert emb.ndim == 2, f"emb must be (b, e), got shape {tuple(emb.shape)}"
    assert y.ndim == 1 and y.shape[0] == emb.shape[0], (
        f"y must be (b,) with b = {emb.shape[0]}, got shape {tuple(y.shape)}"
    )
    if mining not in ("all", "hard"):
        raise ValueError(f"mining must be 'all' or 'hard', got {mining!r}")
    if reduction not in ("active", "valid"):
        raise ValueError(f"reduction must be 'active' or 'valid', got {reduction!r}")

    dist = pairwise_distances(emb, squared=squared)
    same = y[:, None] == y[None, :]
    not_self = ~torch.eye(len(y), dtype=torch.bool, device=y.device)
    positive = same & not_self  # (a, p)
    negative = ~same  # (a, n)

    if mining == "hard":
        has_triplet = positive.any(1) & negative.any(1)
        if not has_triplet.any():
            return _zero_like_graph(emb)
        hardest_pos = dist.masked_fill(~positive, float("-inf")).amax(1)
        hardest_neg = dist.masked_fill(~negative, float("inf")).amin(1)
        losses = F.relu(hardest_pos - hardest_neg + margin)[has_triplet]
        return losses.mean()

    # batch-all: (a, p, n) cube of candidate losses and of validity
    valid = positive[:, :, None] & negative[:, None, :]
    if not valid.any():
        return _zero_like_graph(emb)
    losses = F.relu(dist[:, :, None] - dist[:, None, :] + margin)[valid]
    if reduction == "valid":
        return losses.mean()
    active = losses > 0
    if not active.any():
        return _zero_like_graph(emb)
    return losses[active].mean()


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor, *, reduction: str = "mean") -> Tensor:
    """L1 reconstruction loss on the masked positions only (Eq. 3).

    The paper's Eq. 3 is, per window, ``sum_j 1[j masked] * ||h_j - h^_j||_1``: a *sum* over
    the masked positions of L1 norms over the feature dimensions. Two reductions:

    * ``"sum"``: Eq. 3 exactly for each window, averaged over the windows of the batch
      (the paper does not say how windows are batched; averaging keeps the loss of a
      window independent of the batch size), i.e. ``sum |.| / b``. Its scale is
      ``n_masked_per_window * D`` times that of ``"mean"`` (about 131,000 for
      ``L = 256``, ``D = 1024``; 3.1 million at the paper's ``L = 6000``).
    * ``"mean"`` (default, ours): the mean of ``|pred - target|`` over the masked positions
      of the whole batch and over the feature dimensions, ``sum |.| / (n_masked * D)``, the
      MAE/SimMIM convention; an L1 per feature, comparable across window lengths and
      widths. Samples with more masked positions weigh more.

    Args:
        pred: (b, n, D) reconstructions.
        target: (b, n, D) original features.
        mask: (b, n) bool, True where a position was masked (and must be reconstructed).
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        Scalar loss; exactly 0 (with a zero gradient path) when nothing is masked.
    """
    assert pred.shape == target.shape and pred.ndim == 3, (
        f"pred and target must both be (b, n, D), got {tuple(pred.shape)} and {tuple(target.shape)}"
    )
    assert mask.shape == pred.shape[:2] and mask.dtype == torch.bool, (
        f"mask must be bool (b, n) = {tuple(pred.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
    )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    n_masked = mask.sum()
    if n_masked == 0:
        return _zero_like_graph(pred)
    err = (pred - target).abs().sum(-1)  # (b, n): L1 norm per position
    total = (err * mask).sum()
    if reduction == "sum":
        return total / pred.shape[0]
    return total / (n_masked * pred.shape[-1])


def info_nce(a: Tensor, b: Tensor, *, temperature: float = 0.07, symmetric: bool = True) -> Tensor:
    """InfoNCE (CLIP-style) loss between paired embeddings; pair ``i`` is ``(a[i], b[i])``.

    Embeddings are L2-normalised, logits are cosine similarities over ``temperature`` and
    the positives are on the diagonal.

    Args:
        a: (b, e) embeddings of the first modality.
        b: (b, e) embeddings of the second modality.
        temperature: softmax temperature.
        symmetric: average the a->b and b->a cross-entropies (CLIP) instead of a->b only.

    Returns:
        Scalar loss.
    """
    assert a.ndim == 2 and a.shape == b.shape, (
        f"a and b must both be (b, e), got {tuple(a.shape)} and {tuple(b.shape)}"
    )
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss
