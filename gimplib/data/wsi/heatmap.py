"""Per-patch scores (e.g. the aggregator's attention) drawn over a slide thumbnail.

Works with a real slide (a path: its thumbnail is read with OpenSlide), with a
thumbnail you already have (give the slide's level-0 size), or with no image at all
(a blank canvas sized from the coords: the synthetic cohort has no slides).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gimplib.utils import DataError

__all__ = ["patch_score_image", "patch_size_level0", "plot_attention_heatmap"]


def patch_size_level0(path: str | os.PathLike) -> int:
    """Level-0 side of the patches of a CLAM h5 (patches or features file).

    Uses our ``patch_size_level0`` attribute, else CLAM's ``patch_size * downsample``,
    else the smallest spacing between coords (files written without attributes).
    """
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise DataError(f"{path}: no 'coords' dataset; expected a CLAM h5 with patch coordinates")
        attrs = f["coords"].attrs
        if "patch_size_level0" in attrs:
            return int(attrs["patch_size_level0"])
        if "patch_size" in attrs:
            ds = np.asarray(attrs.get("downsample", 1.0), dtype=np.float64).reshape(-1)[0]
            return int(round(float(attrs["patch_size"]) * ds))
        coords = np.asarray(f["coords"][:])
    steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    if steps.size == 0:
        raise DataError(f"{path}: cannot tell the patch size (no attributes, a single coordinate)")
    return int(steps.min())


def _normalize(scores: np.ndarray, how: str | None) -> tuple[np.ndarray, str]:
    if how in (None, "none"):
        return scores, "score"
    if how == "rank":  # CLAM's default: percentiles, robust to attention's heavy tail
        order = np.argsort(np.argsort(scores, kind="stable"), kind="stable")
        return (order + 0.5) / len(scores), "attention (percentile)"
    if how == "minmax":
        lo, hi = float(scores.min()), float(scores.max())
        return (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores), "attention (min-max)"
    raise ValueError(f"normalize={how!r}; expected 'rank', 'minmax' or None")


def patch_score_image(
    coords: np.ndarray, scores: np.ndarray, patch_size: int, *, canvas: tuple[int, int], scale: float
) -> np.ndarray:
    """Rasterise per-patch scores onto a canvas (NaN where no patch lies; overlaps averaged).

    Args:
        coords: (n, 2) level-0 (x, y) top-left corners.
        scores: (n,) scores.
        patch_size: patch side in level-0 pixels.
        canvas: (width, height) of the output in canvas pixels.
        scale: canvas pixels per level-0 pixel.

    Returns:
        (height, width) float32 image.
    """
    w, h = canvas
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.float64)
    x0 = np.clip(np.floor(coords[:, 0] * scale).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] * scale).astype(np.int64), 0, h)
    x1 = np.clip(np.maximum(np.ceil((coords[:, 0] + patch_size) * scale).astype(np.int64), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.ceil((coords[:, 1] + patch_size) * scale).astype(np.int64), y0 + 1), 0, h)
    for a, b, c, d, s in zip(x0, x1, y0, y1, scores):
        total[c:d, a:b] += s
        count[c:d, a:b] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _background(slide: Any, slide_dims: tuple[int, int] | None, coords: np.ndarray, patch_size: int, max_side: int):
    """(RGB image or None, level-0 (w, h))."""
    if isinstance(slide, (str, os.PathLike)):
        from gimplib.data.wsi.slide import open_slide

        handle = open_slide(Path(slide))
        try:
            dims = tuple(int(v) for v in handle.level_dimensions[0])
            thumb = handle.get_thumbnail((max_side, max_side)).convert("RGB")
        finally:
            handle.close()
        return np.asarray(thumb), dims
    if slide is not None:
        img = np.asarray(slide.convert("RGB") if isinstance(slide, Image.Image) else slide)
        if slide_dims is None:
            raise DataError(
                "plot_attention_heatmap: a thumbnail was given without slide_dims; expected the "
                "slide's level-0 (width, height) to place the patches"
            )
        return img[..., :3], tuple(int(v) for v in slide_dims)
    if slide_dims is not None:
        return None, tuple(int(v) for v in slide_dims)
    extent = coords.max(axis=0) + patch_size if len(coords) else np.array([patch_size, patch_size])
    return None, (int(extent[0]), int(extent[1]))


def plot_attention_heatmap(
    slide: str | os.PathLike | Image.Image | np.ndarray | None,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size: int,
    *,
    slide_dims: tuple[int, int] | None = None,
    normalize: str | None = "rank",
    cmap: str = "coolwarm",
    alpha: float = 0.5,
    max_side: int = 1024,
    ax: Any = None,
    title: str | None = None,
    colorbar: bool = True,
) -> Any:
    """Draw per-patch scores over a slide thumbnail at the patches' coords.

    Args:
        slide: a slide path, a thumbnail (PIL image or (h, w, 3) array; then give
            ``slide_dims``), or None for a blank canvas.
        coords: (n, 2) level-0 (x, y) top-left corners (a bag's ``coords``).
        scores: (n,) per-patch scores, e.g. ``AggregatorOutput.attn[0]``.
        patch_size: patch side in level-0 pixels (``patch_size_level0`` attribute of
            our h5 files; CLAM's ``patch_size * downsample``).
        slide_dims: level-0 (width, height); default from the slide, else from the coords.
        normalize: "rank" (percentiles, CLAM's default), "minmax" or None.
        cmap: matplotlib colormap.
        alpha: opacity of the scores over the thumbnail (1 on a blank canvas).
        max_side: long side of the drawing, in pixels.
        ax: draw into this axes; a new figure otherwise.
        title: axes title.
        colorbar: add a colorbar.

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.figure import Figure

    coords = np.asarray(coords)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise DataError(f"plot_attention_heatmap: coords of shape {coords.shape}; expected (n, 2)")
    if len(scores) != len(coords):
        raise DataError(f"plot_attention_heatmap: {len(scores)} scores for {len(coords)} coords; expected one per patch")
    if not np.isfinite(scores).all():
        raise DataError("plot_attention_heatmap: NaN/inf in scores")
    image, (w0, h0) = _background(slide, slide_dims, coords, patch_size, max_side)
    if image is not None:
        scale = image.shape[1] / w0
        canvas = (image.shape[1], image.shape[0])
    else:
        scale = min(1.0, max_side / max(w0, h0))
        canvas = (max(1, int(round(w0 * scale))), max(1, int(round(h0 * scale))))
    values, label = _normalize(scores, normalize)
    heat = patch_score_image(coords, values, patch_size, canvas=canvas, scale=scale)
    if ax is None:
        fig = Figure(figsize=(6, 6 * canvas[1] / canvas[0] + 0.3), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    if image is not None:
        ax.imshow(image)
    else:
        ax.imshow(np.full((canvas[1], canvas[0], 3), 255, np.uint8))
    vmin, vmax = (0.0, 1.0) if normalize in ("rank", "minmax") else (float(values.min()), float(values.max()))
    mappable = ax.imshow(
        np.ma.masked_invalid(heat), cmap=cmap, alpha=alpha if image is not None else 1.0,
        vmin=vmin, vmax=vmax, interpolation="nearest",
    )
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(mappable, ax=ax, shrink=0.7, label=label)
    return fig
