"""Classification metrics with percentile-bootstrap 95% confidence intervals.

The figures the paper reports (accuracy, AUC, F1) plus balanced accuracy and the confusion
matrix, computed from predicted class probabilities. ROC AUC is the Mann-Whitney statistic
(ties counted as one half), one-vs-rest and macro-averaged for more than two classes; it is
written out here rather than taken from scikit-learn so that a thousand bootstrap
resamples stay cheap and a resample that misses a class gives NaN instead of an exception.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import beta, rankdata

__all__ = ["classification_metrics", "attention_tumour_auc", "attention_tumour_aucs", "binary_auc", "clopper_pearson",
           "mean_sd", "CI_METRICS"]

#: metrics that get a bootstrap interval (``<name>_ci_low``, ``<name>_ci_high``)
CI_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1")


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a binary problem: P(score of a positive > score of a negative).

    Args:
        y: (n,) labels in {0, 1} (or bool).
        score: (n,) scores; higher means "more positive".

    Returns:
        The AUC, NaN when ``y`` holds only one class.
    """
    y = np.asarray(y).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # ties get their average rank: a tie counts one half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _point_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    num_classes = prob.shape[1]
    pred = prob.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y, pred), 1)

    tp = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1).astype(float)  # true count per class
    predicted = confusion.sum(axis=0).astype(float)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    denom = precision + recall
    f1_per_class = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)

    if num_classes == 2:
        auc = binary_auc(y == 1, prob[:, 1])
        f1 = float(f1_per_class[1])  # the positive class (index 1, e.g. LUSC)
    else:
        aucs = [binary_auc(y == c, prob[:, c]) for c in range(num_classes)]
        auc = float(np.mean(aucs))  # NaN when some class is absent, as macro OvR is then undefined
        f1 = float(f1_per_class.mean())
    return {
        "accuracy": float(tp.sum() / len(y)),
        "balanced_accuracy": float(recall[present].mean()),
        "auc": auc,
        "f1": f1,
        "confusion": confusion,
    }


def classification_metrics(
    y_true: np.ndarray | list[int],
    prob: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, ROC AUC, F1 and the confusion matrix, with bootstrap CIs.

    Args:
        y_true: (n,) integer class indices in ``[0, C)``.
        prob: (n, C) class probabilities (rows need not sum to one: only their order within
            a row and, for AUC, within a column matters), or (n,) probabilities of class 1
            for a binary problem.
        n_boot: bootstrap resamples of the cases (0 disables the intervals).
        seed: seed of the resampling.
        alpha: 1 - coverage of the percentile intervals (0.05 gives 95% intervals).

    Returns:
        A flat dict: ``accuracy``, ``balanced_accuracy``, ``auc`` (binary; macro one-vs-rest
        for C > 2; NaN when y_true holds one class), ``f1`` (binary: class 1; C > 2: macro),
        ``confusion`` (C x C nested list, rows = true class, columns = predicted), ``n``, and
        for each of the four figures ``<name>_ci_low`` / ``<name>_ci_high`` (resamples in which
        a figure is undefined are left out of its interval).
    """
    y = np.asarray(y_true)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim == 1:
        prob = np.stack([1.0 - prob, prob], axis=1)
    if prob.ndim != 2 or y.ndim != 1 or len(y) != len(prob):
        raise ValueError(
            f"classification_metrics expects y_true (n,) and prob (n, C); got {y.shape} and {prob.shape}"
        )
    if len(y) == 0:
        raise ValueError("classification_metrics got no cases")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    num_classes = prob.shape[1]
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"y_true holds class {y.max()} but prob has only {num_classes} columns")
    if not np.all(np.isfinite(prob)):
        raise ValueError("prob holds NaN or inf")

    out = _point_metrics(y, prob)
    out["confusion"] = out["confusion"].tolist()
    out["n"] = int(len(y))
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        samples = {name: [] for name in CI_METRICS}
        for _ in range(n_boot):
            idx = rng.integers(0, len(y), size=len(y))
            boot = _point_metrics(y[idx], prob[idx])
            for name in CI_METRICS:
                samples[name].append(boot[name])
        for name in CI_METRICS:
            values = np.asarray(samples[name], dtype=float)
            values = values[np.isfinite(values)]
            if values.size:
                low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
            else:
                low = high = float("nan")
            out[f"{name}_ci_low"] = float(low)
            out[f"{name}_ci_high"] = float(high)
    return out


def mean_sd(values: np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def clopper_pearson(k: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial interval for ``k`` successes in ``n`` trials.

    The interval a percentile bootstrap cannot give when every case is right (or wrong):
    resampling 32 of 32 correct patients always gives 1.0, so the bootstrap says
    [1.000, 1.000], while 32/32 is compatible with a true accuracy of 0.89 (exact 95 %
    interval [0.891, 1.000]). Its coverage is at least ``1 - alpha`` for every true rate.

    Args:
        k: successes (e.g. correctly classified patients), ``0 <= k <= n``.
        n: trials (test patients), ``n >= 1``.
        alpha: 1 - coverage (0.05 gives a 95 % interval).

    Returns:
        ``(low, high)``: ``low = Beta(alpha/2; k, n-k+1)`` quantile (0 when ``k = 0``),
        ``high = Beta(1-alpha/2; k+1, n-k)`` quantile (1 when ``k = n``).

    Raises:
        ValueError: ``n < 1``, ``k`` outside ``[0, n]``, a non-integer count, or ``alpha``
            outside (0, 1).
    """
    if not (float(k).is_integer() and float(n).is_integer()):
        raise ValueError(f"clopper_pearson needs whole counts, got k={k}, n={n}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def attention_tumour_auc(attn: np.ndarray, tumour: np.ndarray, *, slide: str = "slide") -> float:
    """How well a slide's attention picks out its tumour patches: ROC AUC of attention vs truth.

    1.0 when every tumour patch gets more attention than every other patch, 0.5 for
    attention unrelated to the tumour. Only a synthetic cohort knows the truth
    (:func:`gimplib.data.synthetic.tumour_masks`).

    Args:
        attn: (n,) attention score per patch (any scale; only the order matters).
        tumour: (n,) bool, True for tumour patches, same order as ``attn``.
        slide: the slide's name, for error messages.

    Returns:
        The AUC, NaN when the slide is all tumour or has none.

    Raises:
        ValueError: shapes differ or are not 1-d, or ``attn`` holds NaN / inf.
    """
    attn = np.asarray(attn, dtype=float)
    tumour = np.asarray(tumour)
    if attn.ndim != 1 or tumour.shape != attn.shape:
        raise ValueError(f"{slide}: attention {attn.shape} and tumour mask {tumour.shape} must be the same (n,)")
    if not np.all(np.isfinite(attn)):
        raise ValueError(f"{slide}: attention holds NaN or inf")
    return binary_auc(tumour.astype(bool), attn)


def attention_tumour_aucs(attention: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """:func:`attention_tumour_auc` for every slide of ``attention``.

    Args:
        attention: ``{slide_id: (n,) attention}`` (a case's bag is its slides concatenated
            in the cohort's order: split it by the slides' patch counts first).
        masks: ``{slide_id: (n,) bool}`` from :func:`gimplib.data.synthetic.tumour_masks`.

    Returns:
        One record per slide: ``slide_id``, ``n_patches``, ``tumour_fraction``, ``auc``
        (``pd.DataFrame(records)`` gives the table).

    Raises:
        KeyError: a slide of ``attention`` has no mask.
        ValueError: a slide's attention and mask differ in length.
    """
    missing = sorted(set(attention) - set(masks))
    if missing:
        raise KeyError(f"no tumour mask for slide(s) {missing[:5]}")
    out = []
    for sid, attn in attention.items():
        mask = np.asarray(masks[sid], dtype=bool)
        out.append(dict(slide_id=sid, n_patches=int(mask.size), tumour_fraction=float(mask.mean()),
                        auc=attention_tumour_auc(attn, mask, slide=sid)))
    return out
