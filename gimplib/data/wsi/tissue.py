"""Tissue segmentation on a low-resolution copy of the slide (the field mode).

The recipe is CLAM's (``WholeSlideImage.segmentTissue``): HSV saturation, median blur,
a fixed threshold (or Otsu), morphological closing, then tissue regions and holes
filtered by area. It is re-implemented here with NumPy/SciPy on pixel masks (no
OpenCV contours); the defaults are those of CLAM's TCGA preset. One deliberate
difference: CLAM measures the area thresholds ``a_t`` and ``a_h`` in 512 x 512 level-0
pixel tiles, which is 256 x 256 at 20x only on 40x scans; here the unit is one output
patch footprint (``patch_size`` at the target magnification), the same on every scanner.
The CLAM mode (:mod:`gimplib.data.wsi.clam`) segments with CLAM's OpenCV calls instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from gimplib.utils import DataError, atomic_path

__all__ = ["TissueMask", "TissueParams", "otsu_threshold", "segment_tissue", "slide_tissue_mask"]


@dataclass
class TissueParams:
    """Settings of the tissue segmentation (CLAM's names; defaults from its TCGA preset).

    Attributes:
        seg_downsample: segment at about this downsample from level 0 (CLAM: level nearest 64x).
        min_mask_side: but keep at least this many mask pixels on the long side (small
            slides and regions would otherwise become a few dozen pixels).
        sthresh: saturation threshold (0-255); pixels above it are tissue.
        mthresh: median-blur kernel size (odd, mask pixels).
        close: side of the square closing kernel (mask pixels, 0 = none).
        use_otsu: threshold by Otsu's method instead of ``sthresh``.
        a_t: minimum tissue-region area, in patch footprints.
        a_h: minimum hole area kept as background, in patch footprints (smaller holes are filled).
        max_n_holes: at most this many (largest) holes kept per region.
    """

    seg_downsample: float = 64.0
    min_mask_side: int = 512
    sthresh: int = 8
    mthresh: int = 7
    close: int = 4
    use_otsu: bool = False
    a_t: float = 16.0
    a_h: float = 4.0
    max_n_holes: int = 8


@dataclass
class TissueMask:
    """A boolean tissue mask of a slide.

    Attributes:
        mask: (h, w) bool, True = tissue.
        downsample: level-0 pixels per mask pixel along (x, y).
        thumbnail: (h, w, 3) uint8 RGB image the mask was computed from.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    thumbnail: np.ndarray

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean())

    def save_png(self, path: Any) -> None:
        """Write the mask as an 8-bit PNG (255 = tissue), atomically."""
        with atomic_path(path) as tmp:
            Image.fromarray(self.mask.astype(np.uint8) * 255).save(tmp, format="PNG")


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising between-class variance of (<= t, > t)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between))


def _close(mask: np.ndarray, size: int) -> np.ndarray:
    # Pad with edge values so that closing does not eat tissue touching the border
    # (OpenCV's morphologyEx behaves the same way).
    padded = np.pad(mask, size, mode="edge")
    closed = ndimage.binary_closing(padded, structure=np.ones((size, size), bool))
    return closed[size:-size, size:-size]


def _fill_small_holes(mask: np.ndarray, regions: np.ndarray, min_hole: float, max_n_holes: int) -> np.ndarray:
    # Holes are 4-connected background components that do not touch the border.
    holes, n_holes = ndimage.label(~mask)
    if n_holes == 0:
        return mask
    border = set(np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])).tolist())
    areas = np.bincount(holes.ravel(), minlength=n_holes + 1)
    # The left neighbour of a hole's first pixel (raster order) is the region enclosing it.
    flat = holes.ravel()
    ids, first = np.unique(flat, return_index=True)
    parent = dict(zip(ids.tolist(), regions.ravel()[first - 1].tolist()))
    kept: dict[int, list[tuple[int, int]]] = {}
    for h in ids.tolist():
        if h == 0 or h in border:
            continue
        kept.setdefault(parent[h], []).append((int(areas[h]), h))
    fill = np.zeros(n_holes + 1, bool)
    for holes_of_region in kept.values():
        holes_of_region.sort(reverse=True)
        for rank, (area, h) in enumerate(holes_of_region):
            if rank >= max_n_holes or area <= min_hole:
                fill[h] = True
    return mask | fill[holes]


def segment_tissue(
    rgb: np.ndarray,
    *,
    area_unit: float = 1.0,
    sthresh: int = 8,
    mthresh: int = 7,
    close: int = 4,
    use_otsu: bool = False,
    a_t: float = 16.0,
    a_h: float = 4.0,
    max_n_holes: int = 8,
) -> np.ndarray:
    """Tissue mask of a low-resolution RGB image of a slide.

    Args:
        rgb: (h, w, 3) uint8 image (a thumbnail or a low pyramid level).
        area_unit: mask pixels in one unit of ``a_t`` / ``a_h`` (one patch footprint).
        sthresh: saturation threshold (0-255).
        mthresh: median-blur size (mask pixels).
        close: closing kernel side (mask pixels; 0 = none).
        use_otsu: Otsu's threshold instead of ``sthresh``.
        a_t: minimum region area (units of ``area_unit``).
        a_h: holes up to this area are filled (units of ``area_unit``).
        max_n_holes: at most this many largest holes are kept per region.

    Returns:
        (h, w) bool mask, True = tissue.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise DataError(f"segment_tissue: image of shape {rgb.shape}; expected (h, w, 3) RGB")
    sat = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)).convert("HSV"))[..., 1]
    if mthresh > 1:
        sat = ndimage.median_filter(sat, size=mthresh, mode="nearest")
    thresh = otsu_threshold(sat) if use_otsu else sthresh
    mask = sat > thresh
    if close > 0:
        mask = _close(mask, close)
    # Regions: 8-connected, like OpenCV's contours; drop those of area <= a_t.
    regions, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n:
        areas = np.bincount(regions.ravel(), minlength=n + 1)
        keep = areas > a_t * area_unit
        keep[0] = False
        mask = keep[regions]
        regions = np.where(mask, regions, 0)
        mask = _fill_small_holes(mask, regions, a_h * area_unit, max_n_holes)
    return mask


def _read_downsampled(slide: Any, level: int, reduce: int, max_pixels: int = 1 << 25) -> np.ndarray:
    # Read one level in horizontal strips, each shrunk by an integer factor, so that a
    # slide without a small pyramid level never needs its whole level in memory.
    w, h = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    rows = max(reduce, (max_pixels // max(w, 1)) // reduce * reduce)
    strips = []
    for y in range(0, h, rows):
        hh = min(rows, h - y)
        tile = slide.read_region((0, int(round(y * ds))), level, (w, hh))
        white = Image.new("RGBA", tile.size, (255, 255, 255, 255))
        tile = Image.alpha_composite(white, tile.convert("RGBA")).convert("RGB")
        if reduce > 1:
            tile = tile.reduce(reduce)
        strips.append(np.asarray(tile))
    return np.concatenate(strips, axis=0)


def slide_tissue_mask(slide: Any, *, patch_area_level0: float, params: TissueParams | None = None) -> TissueMask:
    """Segment the tissue of an open slide at low resolution.

    Args:
        slide: an open OpenSlide slide.
        patch_area_level0: level-0 pixel area of one patch footprint (the area unit).
        params: segmentation settings.

    Returns:
        The :class:`TissueMask`.
    """
    params = params or TissueParams()
    w0, h0 = slide.level_dimensions[0]
    target = min(params.seg_downsample, max(1.0, max(w0, h0) / params.min_mask_side))
    level = slide.get_best_level_for_downsample(target)
    reduce = max(1, int(math.floor(target / slide.level_downsamples[level] + 1e-6)))
    thumb = _read_downsampled(slide, level, reduce)
    mh, mw = thumb.shape[:2]
    downsample = (w0 / mw, h0 / mh)
    unit = patch_area_level0 / (downsample[0] * downsample[1])
    mask = segment_tissue(
        thumb,
        area_unit=unit,
        sthresh=params.sthresh,
        mthresh=params.mthresh,
        close=params.close,
        use_otsu=params.use_otsu,
        a_t=params.a_t,
        a_h=params.a_h,
        max_n_holes=params.max_n_holes,
    )
    return TissueMask(mask=mask, downsample=downsample, thumbnail=thumb)
