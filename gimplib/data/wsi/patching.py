"""The patch grid of a slide at a target magnification (the field mode), and CLAM's patches h5.

Coordinates are level-0 pixels (x, y) of each patch's top-left corner, in CLAM's order
(``np.meshgrid(xs, ys, indexing="ij")`` flattened: x outer, y inner). In this field mode
one grid starts at (0, 0) and each position is kept once, when the tissue mask covers at
least ``min_tissue`` of it; only whole patches are laid. CLAM's own grid (one per tissue
contour, from its bounding box, with padding) is the CLAM mode, :mod:`gimplib.data.wsi.clam`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from gimplib.data.wsi.slide import SlideInfo, choose_level, resolve_magnification
from gimplib.data.wsi.tissue import TissueMask
from gimplib.utils import DataError, atomic_path

__all__ = ["PatchGrid", "patch_footprint", "patch_grid", "read_patches_h5", "write_patches_h5"]


@dataclass
class PatchGrid:
    """Where to read the patches of one slide.

    Attributes:
        coords: (n, 2) int64 level-0 (x, y) top-left corners, CLAM's order.
        tissue: (n,) float32 tissue fraction of each patch (field mode), or None.
        patch_level: pyramid level the patches are read from.
        patch_size: side read at ``patch_level`` (CLAM's ``patch_size`` attribute).
        patch_size_level0: side of a patch in level-0 pixels (also the grid step when
            ``step_size == target_patch_size``).
        target_patch_size: side of a patch at ``target_magnification`` (e.g. 256 at 20x);
            None in the CLAM mode.
        target_magnification: magnification the patches represent (None in the CLAM mode).
        slide_magnification: level-0 magnification of the slide, and where it came from
            (None in the CLAM mode, which does not read the scale).
        downsample: per-axis downsample of ``patch_level`` (CLAM's ``downsample``).
        level_dim: (w, h) of ``patch_level``.
        slide_dim: level-0 (w, h).
        grid_shape: (columns, rows) of the one grid (field mode), or None.
        mode: ``"field"`` or ``"clam"`` (see :mod:`gimplib.data.wsi.clam`).
    """

    coords: np.ndarray
    tissue: np.ndarray | None
    patch_level: int
    patch_size: int
    patch_size_level0: int
    target_patch_size: int | None
    target_magnification: float | None
    slide_magnification: float | None
    magnification_source: str | None
    downsample: tuple[float, float]
    level_dim: tuple[int, int]
    slide_dim: tuple[int, int]
    grid_shape: tuple[int, int] | None = None
    mode: str = "field"

    def subset(self, index: np.ndarray) -> None:
        """Keep only the patches at ``index`` (in place)."""
        self.coords = self.coords[index]
        if self.tissue is not None:
            self.tissue = self.tissue[index]

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def attrs(self, name: str, save_path: str | os.PathLike) -> dict:
        """CLAM's attributes of the ``coords`` dataset, plus TRIDENT-style scale fields."""
        attrs = {
            "patch_size": int(self.patch_size),
            "patch_level": int(self.patch_level),
            "downsample": np.asarray(self.downsample, dtype=np.float64),
            "downsampled_level_dim": np.asarray(self.level_dim, dtype=np.int64),
            "level_dim": np.asarray(self.level_dim, dtype=np.int64),
            "name": str(name),
            "save_path": str(save_path),
            "patch_size_level0": int(self.patch_size_level0),
            "patch_mode": self.mode,
        }
        if self.target_magnification is not None:
            attrs["target_patch_size"] = int(self.target_patch_size)
            attrs["target_magnification"] = float(self.target_magnification)
        if self.slide_magnification is not None:
            attrs["level0_magnification"] = float(self.slide_magnification)
        return attrs


def patch_footprint(patch_size: int, target_magnification: float, slide_magnification: float) -> int:
    """Level-0 side of a ``patch_size`` patch taken at ``target_magnification``."""
    return int(round(patch_size * slide_magnification / target_magnification))


def patch_grid(
    info: SlideInfo,
    tissue: TissueMask | None,
    *,
    patch_size: int = 256,
    step_size: int | None = None,
    target_magnification: float = 20.0,
    slide_magnification: float | None = None,
    min_tissue: float = 0.25,
) -> PatchGrid:
    """Lay the patch grid of a slide and keep the patches on tissue.

    Args:
        info: the slide (see :func:`read_slide_info`).
        tissue: its tissue mask; None keeps every grid position.
        patch_size: patch side in pixels at the target magnification.
        step_size: grid step at the target magnification (default ``patch_size``: no overlap).
        target_magnification: e.g. 20 for 20x.
        slide_magnification: level-0 magnification, overriding the slide's metadata
            (needed when the slide has neither objective power nor mpp).
        min_tissue: minimum fraction of a patch covered by tissue.

    Returns:
        A :class:`PatchGrid` (possibly with zero patches).

    Raises:
        DataError: naming the slide when its scale is unknown or finer patches than the
            scan are asked for.
    """
    mag, source = resolve_magnification(info, slide_magnification)
    if target_magnification > mag * 1.02:
        raise DataError(
            f"slide {info.path}: scanned at {mag:g}x ({source}); cannot cut patches at "
            f"{target_magnification:g}x without upsampling; expected a target <= {mag:g}x"
        )
    factor = mag / target_magnification
    size0 = patch_footprint(patch_size, target_magnification, mag)
    step0 = patch_footprint(step_size or patch_size, target_magnification, mag)
    level = choose_level(info.level_downsamples, factor)
    read_size = int(round(size0 / info.level_downsamples[level]))
    w0, h0 = info.dimensions
    xs = np.arange(0, w0 - size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, h0 - size0 + 1, step0, dtype=np.int64)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    if tissue is None:
        frac = np.ones(len(coords), np.float32)
    else:
        frac = _tissue_fraction(tissue, coords, size0)
    keep = frac >= min_tissue if tissue is not None else np.ones(len(coords), bool)
    return PatchGrid(
        coords=coords[keep],
        tissue=frac[keep],
        patch_level=level,
        patch_size=read_size,
        patch_size_level0=size0,
        target_patch_size=int(patch_size),
        target_magnification=float(target_magnification),
        slide_magnification=float(mag),
        magnification_source=source,
        downsample=info.level_downsample_xy(level),
        level_dim=info.level_dimensions[level],
        slide_dim=info.dimensions,
        grid_shape=(len(xs), len(ys)),
    )


def _tissue_fraction(tissue: TissueMask, coords: np.ndarray, size0: int) -> np.ndarray:
    # Summed-area table of the mask: each patch's tissue pixels in O(1).
    mask = tissue.mask.astype(np.float64)
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1))
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    dx, dy = tissue.downsample
    x0 = np.clip(np.round(coords[:, 0] / dx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.round(coords[:, 1] / dy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(np.round((coords[:, 0] + size0) / dx).astype(np.int64), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.round((coords[:, 1] + size0) / dy).astype(np.int64), y0 + 1), 1, h)
    inside = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return (inside / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def write_patches_h5(path: str | os.PathLike, grid: PatchGrid, name: str) -> Path:
    """Write CLAM's ``patches/<slide_id>.h5``: ``coords`` (n, 2) with its attributes, atomically.

    Args:
        path: destination file.
        grid: the patch grid (at least one patch).
        name: the slide id (CLAM's ``name`` attribute).

    Returns:
        ``path``.
    """
    path = Path(path)
    if len(grid) == 0:
        raise DataError(f"{path}: refusing to write a patches file with no patch (slide {name})")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=grid.coords, maxshape=(None, 2), chunks=(min(len(grid), 1024), 2))
            for key, value in grid.attrs(name, path.parent.resolve()).items():
                ds.attrs[key] = value
    return path


def read_patches_h5(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Coords (n, 2) int64 and the ``coords`` attributes of a CLAM patches (or features) h5."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise DataError(f"{path}: no 'coords' dataset; expected CLAM's patches h5")
            coords = np.asarray(f["coords"][:], dtype=np.int64)
            attrs = dict(f["coords"].attrs)
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err})") from err
    return coords, attrs
