"""Figures for the book's notebooks.

Every function takes plain arrays / DataFrames (never a model), draws with matplotlib and
seaborn, and returns a :class:`matplotlib.figure.Figure` built without ``pyplot``: nothing is
shown or kept alive behind the caller's back. In a notebook, make the figure the cell's last
expression (or call ``display(fig)``) and it renders inline; in a script, ``fig.savefig(...)``.

Separability scores for embeddings (:func:`embedding_scores`) are computed on the embedding
itself, not on its 2-d t-SNE projection, because t-SNE distorts distances.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

__all__ = [
    "embedding_scores",
    "plot_attention_tumour_auc",
    "plot_attention_map",
    "plot_bag_sizes",
    "plot_confusion",
    "plot_gene_attributions",
    "plot_gene_heatmap",
    "plot_learning_curves",
    "plot_reconstructions",
    "plot_roc",
    "plot_seed_accuracies",
    "plot_tissue_maps",
    "plot_tsne_panels",
    "save_figure",
    "tsne_2d",
    "use_book_figures",
]

#: Class colours shared by every figure (LUAD, LUSC, then a seaborn palette).
PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]


def _figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (4.0, 3.2), **kw):
    """A constrained-layout Figure of ``nrows x ncols`` panels, each about ``size`` inches."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _label_names(y: np.ndarray, label_names: Sequence[str] | None) -> list[str]:
    if label_names is not None:
        return list(label_names)
    return [str(c) for c in range(int(np.max(y)) + 1)] if len(y) else []


# --------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------
def plot_bag_sizes(
    n_patches: Sequence[int] | np.ndarray | pd.Series,
    labels: Sequence[str] | None = None,
    *,
    log: bool = True,
    bins: int = 30,
    title: str = "Patches per slide",
) -> Figure:
    """Histogram of bag sizes (patches per slide or per case), split by class.

    Args:
        n_patches: (n,) patch counts.
        labels: (n,) class name of each bag, or None for one histogram.
        log: log-scaled x axis (bag sizes span orders of magnitude in TCGA: 485 to 148,569).
        bins: number of bins.
        title: panel title.
    """
    sizes = np.asarray(n_patches, dtype=float)
    if sizes.ndim != 1 or len(sizes) == 0:
        raise ValueError(f"n_patches must be a non-empty 1-d sequence, got shape {sizes.shape}")
    if labels is not None and len(labels) != len(sizes):
        raise ValueError(f"labels has {len(labels)} entries but n_patches has {len(sizes)}")
    frame = pd.DataFrame({"patches": sizes, "label": labels if labels is not None else "all"})
    fig, axes = _figure(size=(5.0, 3.4))
    ax = axes[0, 0]
    hue_order = sorted(frame["label"].unique())
    sns.histplot(
        data=frame, x="patches", hue="label", hue_order=hue_order, bins=bins,
        log_scale=log and bool((sizes > 0).all()), element="step", ax=ax,
        palette=PALETTE[: len(hue_order)],
    )
    if log:
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("patches per bag" + (" (log scale)" if log else ""))
    ax.set_ylabel("bags")
    ax.set_title(
        f"{title}: n={len(sizes)}, median {np.median(sizes):,.0f}, "
        f"range {sizes.min():,.0f}-{sizes.max():,.0f}",
        fontsize=9,
    )
    return fig


def _raster(xy: np.ndarray, values: np.ndarray, max_side: int = 2048):
    """Patches on their grid as an image (NaN = background) and its imshow extent, or None.

    The grid step is the most common gap between neighbouring distinct coordinates (the
    patch stride; tissue regions need not share one grid origin, so each patch is rounded to
    its nearest cell). None when the coords span more than ``max_side`` cells.
    """
    if len(xy) == 0:
        return None
    gaps = np.concatenate([np.diff(np.unique(xy[:, axis])) for axis in (0, 1)])
    gaps = gaps[gaps > 0]
    if len(gaps) == 0:
        step = 1.0
    else:
        values_, counts = np.unique(gaps, return_counts=True)
        step = float(values_[counts.argmax()])
    origin = xy.min(0)
    cells = np.rint((xy - origin) / step).astype(np.int64)
    if cells.max() >= max_side:
        return None
    raster = np.full((cells[:, 1].max() + 1, cells[:, 0].max() + 1), np.nan)
    raster[cells[:, 1], cells[:, 0]] = values
    (x0, y0) = origin
    extent = (x0 - step / 2, x0 + step * (raster.shape[1] - 0.5), y0 + step * (raster.shape[0] - 0.5), y0 - step / 2)
    return raster, extent


def plot_tissue_maps(
    coords: Sequence[np.ndarray],
    values: Sequence[np.ndarray] | None = None,
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 3,
    cmap: str = "viridis",
    value_label: str = "value",
    marker_size: float | None = None,
) -> Figure:
    """Tissue maps: each slide's patches drawn at their grid coordinates.

    Without ``values`` every patch is one colour (the tissue's footprint); with values
    (e.g. the first principal component of the patch features, or attention) the patches
    are coloured by them.

    Args:
        coords: per slide, (n_i, 2) patch top-left coordinates (x, y) in level-0 pixels.
        values: per slide, (n_i,) values to colour by, or None.
        titles: per slide, a panel title.
        ncols: panels per row.
        cmap: colour map for ``values``.
        value_label: colour-bar label.
        marker_size: marker size when the coords lie on no regular grid (then drawn as a
            scatter); default scales with the number of patches.
    """
    if len(coords) == 0:
        raise ValueError("plot_tissue_maps needs at least one slide's coords")
    ncols = max(1, min(ncols, len(coords)))
    nrows = int(np.ceil(len(coords) / ncols))
    fig, axes = _figure(nrows, ncols, size=(3.4, 3.4))
    for i, ax in enumerate(axes.flat):
        if i >= len(coords):
            ax.set_axis_off()
            continue
        xy = np.asarray(coords[i])
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"coords[{i}] must have shape (n, 2), got {xy.shape}")
        v = None if values is None else np.asarray(values[i], dtype=float)
        if v is not None and v.shape != (len(xy),):
            raise ValueError(f"values[{i}] must have shape ({len(xy)},), got {v.shape}")
        grid = _raster(xy, np.ones(len(xy)) if v is None else v)
        if grid is None:  # coords on no regular grid: fall back to a scatter
            size = marker_size if marker_size is not None else float(np.clip(4000.0 / max(len(xy), 1), 1, 40))
            colour = dict(c=PALETTE[2]) if v is None else dict(c=v, cmap=cmap)
            im = ax.scatter(xy[:, 0], xy[:, 1], s=size, marker="s", linewidths=0, **colour)
            ax.invert_yaxis()  # image convention: y grows downwards
        else:
            raster, extent = grid
            im = ax.imshow(raster, extent=extent, cmap=ListedColormap([PALETTE[2]]) if v is None else cmap,
                           interpolation="nearest")
        if v is not None:
            fig.colorbar(im, ax=ax, shrink=0.7, label=value_label)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(titles[i] if titles is not None else f"slide {i}: {len(xy):,} patches", fontsize=9)
    return fig


def plot_attention_map(
    coords: np.ndarray,
    attn: np.ndarray,
    *,
    title: str = "Attention of CLS over patches",
    rank: bool = True,
) -> Figure:
    """Attention heatmap of one slide drawn over its patch coordinates.

    Args:
        coords: (n, 2) patch coordinates.
        attn: (n,) attention weights of the CLS token over the patches.
        title: panel title.
        rank: colour by percentile rank rather than raw weight (attention is heavy-tailed;
            ranks make the structure visible, as CLAM's heatmaps do).
    """
    attn = np.asarray(attn, dtype=float)
    if attn.ndim != 1:
        raise ValueError(f"attn must be 1-d (n,), got shape {attn.shape}")
    shown = pd.Series(attn).rank(pct=True).to_numpy() if rank else attn
    return plot_tissue_maps(
        [coords], [shown], titles=[title], ncols=1, cmap="coolwarm",
        value_label="attention (percentile)" if rank else "attention",
    )


def plot_gene_heatmap(
    matrix: np.ndarray,
    y: Sequence[int] | np.ndarray,
    *,
    gene_names: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    max_genes: int = 60,
    max_cases: int = 200,
    seed: int = 0,
) -> Figure:
    """Heatmap of the most class-discriminative genes, cases grouped by class.

    Genes are ranked by the absolute difference of class means divided by the pooled standard
    deviation (a t-like score) and the top ``max_genes`` are shown, z-scored per gene, ordered
    by which class they are up in. Modules of co-expressed genes appear as blocks.

    Args:
        matrix: (n_cases, n_genes) expression (already transformed, e.g. log2(x+1)).
        y: (n_cases,) integer class labels.
        gene_names: (n_genes,) column names.
        label_names: class names indexed by y.
        max_genes: genes to show.
        max_cases: cases to show (a stratified random subset when there are more).
        seed: seed of the case subset.
    """
    x = np.asarray(matrix, dtype=float)
    y = np.asarray(y).astype(int)
    if x.ndim != 2 or x.shape[0] != len(y):
        raise ValueError(f"matrix must be (n_cases, n_genes) with n_cases={len(y)}, got {x.shape}")
    names = _label_names(y, label_names)
    genes = np.asarray(gene_names if gene_names is not None else [f"g{j}" for j in range(x.shape[1])])
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    pooled = x.std(0) + 1e-8
    score = (means.max(0) - means.min(0)) / pooled
    top = np.argsort(-score)[: min(max_genes, x.shape[1])]
    up_in = means[:, top].argmax(0)
    top = top[np.lexsort((-score[top], up_in))]
    rng = np.random.default_rng(seed)
    rows = np.arange(len(y))
    if len(rows) > max_cases:
        rows = np.sort(rng.choice(rows, size=max_cases, replace=False))
    rows = rows[np.argsort(y[rows], kind="stable")]
    z = x[np.ix_(rows, top)]
    z = (z - z.mean(0)) / (z.std(0) + 1e-8)
    fig, axes = _figure(1, 2, size=(3.2, 4.2), gridspec_kw={"width_ratios": [1, 18]})
    strip, ax = axes[0]
    strip.imshow(np.searchsorted(classes, y[rows])[:, None], aspect="auto", interpolation="nearest",
                 cmap=ListedColormap(PALETTE[: len(classes)]), vmin=0, vmax=max(len(classes) - 1, 1))
    strip.set_xticks([])
    strip.set_yticks([])
    strip.set_ylabel("cases, grouped by class: " + " | ".join(names[c] for c in classes))
    im = ax.imshow(z, aspect="auto", cmap="RdBu_r", vmin=-2.5, vmax=2.5, interpolation="nearest")
    ax.set_yticks([])
    if len(top) <= 40:
        ax.set_xticks(range(len(top)), genes[top], rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"top {len(top)} discriminative genes")
    fig.colorbar(im, ax=ax, shrink=0.6, label="z-score")
    fig.suptitle("Gene modules: most discriminative genes", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
_SPLITS = ("train", "val", "test")
_ALIASES = {"acc": "accuracy"}
_NOT_CURVES = {"lr", "time", "time_s", "seconds", "epoch_time", "step", "epoch"}


def plot_learning_curves(
    metrics: pd.DataFrame | str | os.PathLike,
    *,
    x: str = "epoch",
    keys: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Learning curves from a per-epoch metrics CSV (or DataFrame): one panel per quantity.

    Columns named ``<split>_<quantity>`` (split in train/val/test, e.g. ``train_loss_rec``,
    ``val_auc``) are grouped by quantity, one line per split. Columns that are zero throughout
    (a switched-off loss term) and bookkeeping columns (``lr``, ``time_s``) are not drawn.

    Args:
        metrics: DataFrame or path to the CSV written beside a checkpoint.
        x: the x-axis column (``epoch``; ``step`` or the row number when absent).
        keys: the quantities to draw, in order (default: every loss, then accuracy and AUC).
        title: figure title.
    """
    frame = pd.read_csv(metrics) if isinstance(metrics, (str, os.PathLike)) else metrics.copy()
    if x not in frame.columns:
        x = "step" if "step" in frame.columns else x
        if x not in frame.columns:
            frame = frame.reset_index(names=x)
    groups: dict[str, dict[str, str]] = {}
    for col in frame.columns:
        if col == x or col in _NOT_CURVES or not pd.api.types.is_numeric_dtype(frame[col]):
            continue
        values = frame[col].dropna()
        if values.empty or bool((values == 0).all()):
            continue
        split, _, name = col.partition("_")
        if split not in _SPLITS or not name:
            split, name = "", col
        groups.setdefault(_ALIASES.get(name, name), {})[split] = col
    if keys is None:
        keys = [k for k in groups if "loss" in k] + [k for k in ("accuracy", "auc") if k in groups]
    keys = [k for k in keys if k in groups]
    if not keys:
        raise ValueError(f"no metric columns to plot in {list(frame.columns)}")
    # at most two panels per row: the figure is shown at the book's column width (about 7
    # inches), where a row of four 3.4-inch panels would shrink its text to a few pixels
    ncols = min(2, len(keys))
    nrows = -(-len(keys) // ncols)
    fig, axes = _figure(nrows, ncols, size=(3.6, 2.8))
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    for ax, key in zip(axes.flat, keys):
        for split, col in groups[key].items():
            sub = frame[[x, col]].dropna()
            ax.plot(sub[x], sub[col], marker="o", ms=2.5, label=split or col)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_reconstructions(
    truth: np.ndarray,
    pred: np.ndarray,
    mask: np.ndarray,
    *,
    n_rows: int = 24,
    n_dims: int = 64,
    title: str = "Masked patch modelling",
) -> Figure:
    """Masked patches: the true embeddings, their reconstructions, and a value scatter.

    Shows the first ``n_rows`` masked positions of one window and ``n_dims`` feature dimensions
    (the ones with the largest variance over the shown rows), plus a scatter of predicted vs
    true values over all masked positions with the L1 error of the model and of the trivial
    predictor that outputs the window's mean embedding.

    Args:
        truth: (n, D) the window's original patch embeddings.
        pred: (n, D) the decoder's output.
        mask: (n,) bool, True where the patch was masked (the only rows L_rec scores).
    """
    truth = np.asarray(truth, dtype=float)
    pred = np.asarray(pred, dtype=float)
    mask = np.asarray(mask, dtype=bool)
    if truth.shape != pred.shape or truth.ndim != 2 or mask.shape != (truth.shape[0],):
        raise ValueError(f"need truth, pred (n, D) and mask (n,); got {truth.shape}, {pred.shape}, {mask.shape}")
    if not mask.any():
        raise ValueError("mask has no masked position to show")
    t, p = truth[mask], pred[mask]
    l1 = float(np.abs(p - t).mean())
    l1_mean = float(np.abs(truth[~mask].mean(0, keepdims=True) - t).mean()) if (~mask).any() else float("nan")
    rows = slice(0, min(n_rows, len(t)))
    dims = np.argsort(-t[rows].var(0))[: min(n_dims, t.shape[1])]
    lo, hi = np.percentile(t[rows][:, dims], [2, 98])
    fig, axes = _figure(1, 3, size=(3.6, 3.2))
    for ax, m, name in ((axes[0, 0], t, "truth"), (axes[0, 1], p, "reconstruction")):
        im = ax.imshow(m[rows][:, dims], aspect="auto", cmap="magma", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"{len(dims)} feature dims")
        ax.set_ylabel("masked patches")
    fig.colorbar(im, ax=axes[0, :2].tolist(), shrink=0.7)
    ax = axes[0, 2]
    rng = np.random.default_rng(0)
    flat = rng.choice(t.size, size=min(t.size, 5000), replace=False)
    ax.scatter(t.flat[flat], p.flat[flat], s=2, alpha=0.3, c=PALETTE[2])
    edge = [min(t.min(), p.min()), max(t.max(), p.max())]
    ax.plot(edge, edge, "k--", lw=0.8)
    ax.set_xlabel("true value")
    ax.set_ylabel("reconstructed")
    ax.set_title(f"L1 {l1:.3f} (mean-embedding baseline {l1_mean:.3f})", fontsize=9)
    fig.suptitle(f"{title}: {int(mask.sum())} of {len(mask)} patches masked", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------
def plot_confusion(
    confusion: np.ndarray | Sequence[Sequence[int]],
    label_names: Sequence[str],
    *,
    title: str = "Confusion matrix (test)",
) -> Figure:
    """Confusion matrix with counts and row-normalised percentages.

    Args:
        confusion: (C, C) counts, rows = true class, columns = predicted class.
        label_names: the C class names.
    """
    cm = np.asarray(confusion, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(label_names):
        raise ValueError(f"confusion must be (C, C) with C={len(label_names)}, got {cm.shape}")
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    annot = np.array([[f"{int(c)}\n{f:.0%}" for c, f in zip(rc, rf)] for rc, rf in zip(cm, frac)])
    fig, axes = _figure(size=(3.8, 3.2))
    ax = axes[0, 0]
    sns.heatmap(frac, annot=annot, fmt="", cmap="Blues", vmin=0, vmax=1, cbar=False,
                xticklabels=label_names, yticklabels=label_names, ax=ax, square=True)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title}\naccuracy {acc:.3f} (n={int(cm.sum())})", fontsize=9)
    return fig


def plot_roc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    positive: int = 1,
    title: str = "ROC (test)",
) -> Figure:
    """ROC curves of one or more models, with their AUC in the legend.

    Args:
        curves: name -> (y_true (n,), prob) where prob is (n,) scores of the positive class
            or (n, C) class probabilities (column ``positive`` is used).
        positive: the positive class index.
        title: panel title.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    fig, axes = _figure(size=(3.8, 3.6))
    ax = axes[0, 0]
    for i, (name, (y_true, prob)) in enumerate(curves.items()):
        y_true = np.asarray(y_true).astype(int)
        score = np.asarray(prob, dtype=float)
        if score.ndim == 2:
            score = score[:, positive]
        if len(np.unique(y_true)) < 2:
            raise ValueError(f"curve {name!r}: y_true has a single class; ROC undefined")
        fpr, tpr, _ = roc_curve(y_true == positive, score)
        auc = roc_auc_score(y_true == positive, score)
        ax.plot(fpr, tpr, lw=1.6, color=PALETTE[i % len(PALETTE)], label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    return fig


# --------------------------------------------------------------------------------------
# Embeddings (Fig. 2)
# --------------------------------------------------------------------------------------
def embedding_scores(emb: np.ndarray, y: np.ndarray, *, k: int = 5, seed: int = 0) -> dict[str, float]:
    """Separability of an embedding: silhouette and cross-validated kNN accuracy.

    Both are computed on the (standardised) embedding, not on a 2-d projection.

    Args:
        emb: (n, e) embeddings.
        y: (n,) integer labels.
        k: neighbours for the kNN classifier (capped by the smallest training fold).
        seed: seed of the stratified folds.

    Returns:
        dict(silhouette in [-1, 1], knn_accuracy in [0, 1], n).
    """
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.preprocessing import StandardScaler

    emb = np.asarray(emb, dtype=float)
    y = np.asarray(y).astype(int)
    if emb.ndim != 2 or len(emb) != len(y):
        raise ValueError(f"emb must be (n, e) with n={len(y)}, got {emb.shape}")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        raise ValueError(f"need >= 2 classes with >= 2 samples each, got counts {dict(zip(classes, counts))}")
    z = StandardScaler().fit_transform(emb)
    sil = float(silhouette_score(z, y))
    folds = int(min(5, counts.min()))
    k = int(max(1, min(k, len(y) - len(y) // folds - 1)))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    knn = float(cross_val_score(KNeighborsClassifier(n_neighbors=k), z, y, cv=cv).mean())
    return {"silhouette": sil, "knn_accuracy": knn, "n": int(len(y))}


def tsne_2d(emb: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-d t-SNE of (n, e) embeddings (perplexity capped for small n); returns (n, 2)."""
    from sklearn.manifold import TSNE

    emb = np.asarray(emb, dtype=np.float32)
    if len(emb) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(emb)}")
    perplexity = float(min(perplexity, max(2.0, (len(emb) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(emb)


def plot_tsne_panels(
    panels: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    label_names: Sequence[str] | None = None,
    seed: int = 0,
    ncols: int = 2,
    scores: Mapping[str, Mapping[str, float]] | None = None,
) -> Figure:
    """Fig. 2 style: one t-SNE panel per model, points coloured by class, scores in the title.

    Two panels per row by default (the paper's four panels as 2 x 2), so that each panel is
    half the book's column wide rather than a quarter.

    Args:
        panels: model name -> (emb (n, e), y (n,)).
        label_names: class names indexed by y.
        seed: t-SNE seed (the same for every panel).
        ncols: panels per row (2).
        scores: model name -> precomputed :func:`embedding_scores`; computed here when absent.
    """
    if not panels:
        raise ValueError("plot_tsne_panels needs at least one panel")
    ncols = max(1, min(ncols, len(panels)))
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = _figure(nrows, ncols, size=(3.3, 3.3))
    for ax, (name, (emb, y)) in zip(axes.flat, panels.items()):
        y = np.asarray(y).astype(int)
        names = _label_names(y, label_names)
        s = dict(scores[name]) if scores is not None and name in scores else embedding_scores(emb, y, seed=seed)
        xy = tsne_2d(emb, seed=seed)
        for c in np.unique(y):
            ax.scatter(*xy[y == c].T, s=10, alpha=0.8, color=PALETTE[c % len(PALETTE)], label=names[c])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}\nsilhouette {s['silhouette']:.2f}, kNN acc {s['knn_accuracy']:.2f}", fontsize=9)
        ax.legend(fontsize=7, markerscale=1.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    return fig


def plot_gene_attributions(
    group_attn: np.ndarray,
    y: np.ndarray,
    *,
    label_names: Sequence[str] | None = None,
    group_names: Sequence[str] | None = None,
    top: int = 20,
) -> Figure:
    """Gene-group attributions: mean attention of CLS_ge over gene groups, per class.

    Args:
        group_attn: (n_cases, n_groups) attention of the inter-group CLS token over groups
            (rows sum to one), as returned by ``GroupMSA(..., return_attn=True)``.
        y: (n_cases,) integer labels.
        label_names: class names indexed by y.
        group_names: (n_groups,) names (e.g. "g3: KRT5, TP63, ..."), default "group i".
        top: show the ``top`` groups with the largest mean attention overall.
    """
    a = np.asarray(group_attn, dtype=float)
    y = np.asarray(y).astype(int)
    if a.ndim != 2 or a.shape[0] != len(y):
        raise ValueError(f"group_attn must be (n_cases, n_groups) with n_cases={len(y)}, got {a.shape}")
    names = _label_names(y, label_names)
    groups = list(group_names) if group_names is not None else [f"group {j}" for j in range(a.shape[1])]
    if len(groups) != a.shape[1]:
        raise ValueError(f"group_names has {len(groups)} names for {a.shape[1]} groups")
    order = np.argsort(-a.mean(0))[: min(top, a.shape[1])]
    frame = pd.DataFrame(a[:, order], columns=[groups[j] for j in order])
    frame["class"] = [names[c] for c in y]
    long = frame.melt(id_vars="class", var_name="gene group", value_name="attention")
    fig, axes = _figure(size=(5.2, max(2.6, 0.28 * len(order) + 1.2)))
    ax = axes[0, 0]
    hue_order = [names[c] for c in np.unique(y)]
    sns.barplot(data=long, y="gene group", x="attention", hue="class", hue_order=hue_order,
                palette=PALETTE[: len(hue_order)], errorbar="sd", ax=ax, orient="h")
    ax.axvline(1.0 / a.shape[1], color="k", ls=":", lw=0.8, label="uniform")
    ax.set_title("GroupMSA: attention of CLS_ge over gene groups (mean +- sd)", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    return fig


def plot_seed_accuracies(
    runs: pd.DataFrame,
    *,
    paper: Mapping[str, float] | None = None,
    n_test: int | None = None,
    title: str | None = None,
) -> Figure:
    """Test accuracy of every seed as a point, one row per system, the paper's value marked.

    A table's "mean +- sd" over two or three seeds hides how far apart the runs are; the
    points show it. Beside each row, when ``n_test`` is given, a grey bar is the exact
    (Clopper-Pearson) 95 % interval of one run at the row's median accuracy: the
    uncertainty that the test set alone leaves, whatever the seeds do.

    Args:
        runs: one row per run with columns ``system`` (row label, drawn top to bottom in
            order of first appearance) and ``accuracy`` (optionally ``seed``).
        paper: the paper's accuracy per system label (drawn as a red diamond; rows missing
            here get none).
        n_test: test patients per run (for the interval and the "one patient" note).
        title: figure title.

    Raises:
        ValueError: ``runs`` lacks a column or holds no run.
    """
    from gimplib.metrics import clopper_pearson

    missing = {"system", "accuracy"} - set(runs.columns)
    if missing:
        raise ValueError(f"runs needs the columns system and accuracy; missing {sorted(missing)}")
    runs = runs.dropna(subset=["accuracy"])
    if runs.empty:
        raise ValueError("runs holds no run with an accuracy")
    systems = list(dict.fromkeys(runs["system"]))
    paper = dict(paper or {})
    fig, axes = _figure(1, 1, size=(7.0, 0.32 * len(systems) + 1.0))
    ax = axes[0, 0]
    rng = np.random.default_rng(0)
    for i, name in enumerate(systems):
        acc = runs.loc[runs["system"] == name, "accuracy"].to_numpy(dtype=float)
        if n_test:
            low, high = clopper_pearson(round(float(np.median(acc)) * n_test), n_test)
            ax.plot([low, high], [i, i], color="0.8", lw=5, solid_capstyle="butt", zorder=1,
                    label="exact 95 % interval, one run" if i == 0 else None)
        ax.scatter(acc, i + rng.uniform(-0.12, 0.12, len(acc)), s=16, color=PALETTE[0], zorder=3,
                   label="one seed" if i == 0 else None)
        ax.plot([acc.mean()] * 2, [i - 0.3, i + 0.3], color=PALETTE[0], lw=1.5, zorder=2,
                label="mean over seeds" if i == 0 else None)
        if name in paper:
            ax.scatter([paper[name]], [i], marker="D", s=22, color="#c0392b", zorder=4,
                       label="paper (TCGA)" if not any(t.get_label() == "paper (TCGA)" for t in ax.collections) else None)
    ax.set_yticks(range(len(systems)), systems, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy" + (f" (one patient = {100 / n_test:.1f} points)" if n_test else ""))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=4, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_attention_tumour_auc(
    records: pd.DataFrame | Sequence[Mapping[str, float]],
    *,
    label: Mapping[str, str] | None = None,
    title: str = "Attention vs the known tumour patches (synthetic cohort)",
) -> Figure:
    """Per slide, the AUC of the attention scores for its tumour patches, against its tumour share.

    Only a synthetic cohort knows which patches are tumour
    (:func:`gimplib.data.synthetic.tumour_masks`); 0.5 (dashed) is attention unrelated to
    the tumour, 1.0 every tumour patch above every other patch.

    Args:
        records: :func:`gimplib.metrics.attention_tumour_aucs` output (``slide_id``,
            ``tumour_fraction``, ``auc``), as records or a DataFrame.
        label: optional class name per ``slide_id`` (points coloured by class).
        title: figure title.

    Raises:
        ValueError: no slide with a defined AUC.
    """
    frame = pd.DataFrame(records)
    missing = {"slide_id", "tumour_fraction", "auc"} - set(frame.columns)
    if missing:
        raise ValueError(f"records need slide_id, tumour_fraction and auc; missing {sorted(missing)}")
    frame = frame.dropna(subset=["auc"])
    if frame.empty:
        raise ValueError("no slide with a defined attention-vs-tumour AUC (every slide all tumour or none)")
    fig, axes = _figure(1, 1, size=(6.0, 3.4))
    ax = axes[0, 0]
    classes = frame["slide_id"].map(label) if label else pd.Series(["slides"] * len(frame), index=frame.index)
    for i, (name, sub) in enumerate(frame.groupby(classes, sort=True)):
        ax.scatter(100 * sub["tumour_fraction"], sub["auc"], s=14, alpha=0.8, color=PALETTE[i % len(PALETTE)],
                   label=f"{name} (n = {len(sub)})")
    median = float(frame["auc"].median())
    ax.axhline(0.5, ls="--", color="0.5", lw=1, label="chance (0.5)")
    ax.axhline(median, color="0.2", lw=1, label=f"median {median:.2f}")
    ax.set_xlabel("tumour patches in the slide (%)")
    ax.set_ylabel("AUC of attention for tumour")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    return fig


def use_book_figures(fmt: str = "retina") -> None:
    """Set the inline figure format of a running IPython kernel once (the book's notebooks).

    ``"retina"`` (default) renders PNGs at twice the resolution, shown at their nominal
    size; ``"svg"`` gives vector figures (sharp at any width, heavy for t-SNE scatter
    plots). Outside IPython this does nothing.

    Args:
        fmt: ``"retina"``, ``"svg"`` or ``"png"``.
    """
    if fmt not in ("retina", "svg", "png"):
        raise ValueError(f"fmt must be 'retina', 'svg' or 'png', got {fmt!r}")
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return
    if get_ipython() is not None:
        set_matplotlib_formats(fmt)


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 130) -> Path:
    """Save ``fig`` to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path

