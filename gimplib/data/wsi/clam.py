"""CLAM mode: tissue contours and patch coordinates exactly as CLAM's ``create_patches_fp.py``.

Re-implemented from CLAM's documented behaviour (``WholeSlideImage.segmentTissue`` and
``process_contour``, mahmoodlab/CLAM) with the same OpenCV calls, so that the coordinates
equal CLAM's on the same slide and settings (checked against CLAM's own output in
``tests/fixtures/clam``). The steps:

1. Segment at ``seg_level`` (-1: the pyramid level nearest a 64x downsample, level 0 on a
   one-level slide): HSV saturation, median blur, threshold (or Otsu), closing.
2. OpenCV contours (two-level hierarchy: tissue and its holes). A tissue contour is kept
   when its area minus its holes' exceeds ``a_t`` reference tiles of 512 x 512 level-0
   pixels; of its holes the ``max_n_holes`` largest are kept if larger than ``a_h`` tiles.
3. Per tissue contour, a grid from its bounding box with a step of ``step_size`` pixels at
   ``patch_level``; a position is kept when the contour check (``four_pt``: any of four
   points half way between the patch centre and its corners lies in the contour) passes
   and the patch centre is not in a hole. With ``use_padding`` the grid runs to the end of
   the bounding box, so edge patches may hang past the slide.

Coordinates are level-0 (x, y), contour by contour, x outer and y inner within one
contour; a position in two overlapping bounding boxes appears twice, as in CLAM.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gimplib.utils import DataError

if TYPE_CHECKING:
    from gimplib.data.wsi.patching import PatchGrid

__all__ = [
    "CLAM_PRESETS",
    "CONTOUR_FNS",
    "ClamParams",
    "ClamSegmentation",
    "clam_level_downsamples",
    "clam_patch_coords",
    "clam_patch_grid",
    "clam_segment",
]

REF_PATCH_SIZE = 512  # CLAM's unit of a_t / a_h: one 512 x 512 tile of level-0 pixels
MAX_SEG_PIXELS = 1e8  # CLAM refuses to segment a level larger than this ("failed_seg")
CONTOUR_FNS = ("four_pt", "four_pt_hard", "center", "basic")

# The values of CLAM's presets/*.csv (segmentation, filter and patch columns).
CLAM_PRESETS: dict[str, dict[str, Any]] = {
    "tcga": dict(sthresh=8, mthresh=7, close=4, use_otsu=False, a_t=16, a_h=4, max_n_holes=8),
    "bwh_biopsy": dict(sthresh=15, mthresh=11, close=2, use_otsu=False, a_t=1, a_h=1, max_n_holes=2),
    "bwh_resection": dict(sthresh=15, mthresh=11, close=4, use_otsu=False, a_t=100, a_h=16, max_n_holes=8),
}


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the CLAM mode needs OpenCV: pip install 'gimplib[wsi]' (opencv-python-headless)") from err
    return cv2


def _parse_ids(value: Any, name: str, source: str) -> tuple[int, ...]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    text = str(value).strip()
    if text.lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as err:
        raise DataError(f"{source}: {name}={value!r}; expected 'none' or comma-separated contour ids") from err


def _parse_bool(value: Any, name: str, source: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise DataError(f"{source}: {name}={value!r}; expected TRUE or FALSE")


@dataclass
class ClamParams:
    """CLAM's segmentation and patching settings (its preset columns; defaults: ``tcga.csv``).

    Attributes:
        seg_level: pyramid level to segment (-1: nearest 64x downsample; 0 on one-level slides).
        sthresh: saturation threshold (0-255); pixels above it are tissue.
        mthresh: median-blur kernel size (odd, pixels at ``seg_level``).
        close: side of the square closing kernel (0 = none).
        use_otsu: Otsu's threshold instead of ``sthresh``.
        a_t: minimum tissue area, in 512 x 512 level-0 tiles (holes subtracted).
        a_h: minimum hole area, in the same tiles (smaller holes count as tissue).
        max_n_holes: at most this many (largest) holes per contour.
        use_padding: lay the grid to the end of each bounding box (edge patches may hang
            past the slide and are read with black there).
        contour_fn: keep rule: ``four_pt`` (any of 4 inner points in the contour),
            ``four_pt_hard`` (all 4), ``center`` (the centre), ``basic`` (the corner).
        keep_ids: keep only these contours (indices after filtering; empty = all).
        exclude_ids: drop these contours.
    """

    seg_level: int = -1
    sthresh: int = 8
    mthresh: int = 7
    close: int = 4
    use_otsu: bool = False
    a_t: float = 16
    a_h: float = 4
    max_n_holes: int = 8
    use_padding: bool = True
    contour_fn: str = "four_pt"
    keep_ids: tuple[int, ...] = field(default_factory=tuple)
    exclude_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.contour_fn not in CONTOUR_FNS:
            raise DataError(f"CLAM settings: contour_fn={self.contour_fn!r}; expected one of {CONTOUR_FNS}")
        if self.mthresh < 1 or self.mthresh % 2 == 0:
            raise DataError(f"CLAM settings: mthresh={self.mthresh}; expected an odd median-blur size >= 1")
        if not 0 <= self.sthresh <= 255:
            raise DataError(f"CLAM settings: sthresh={self.sthresh}; expected 0-255")
        if self.a_t < 0 or self.a_h < 0 or self.max_n_holes < 0 or self.close < 0:
            raise DataError(f"CLAM settings: a_t, a_h, max_n_holes and close must be >= 0; got {asdict(self)}")
        self.keep_ids = tuple(int(i) for i in self.keep_ids)
        self.exclude_ids = tuple(int(i) for i in self.exclude_ids)

    @classmethod
    def from_preset(cls, preset: str | os.PathLike = "tcga", **overrides: Any) -> "ClamParams":
        """Settings of a CLAM preset: a name (``tcga``, ``bwh_biopsy``, ``bwh_resection``) or a CSV.

        Args:
            preset: a name of CLAM's ``presets/*.csv`` (with or without ``.csv``), or the
                path of a preset CSV in CLAM's format (columns it does not use for
                segmentation or patching, such as ``vis_level``, are ignored).
            **overrides: fields to set after the preset (None values are ignored).

        Returns:
            The settings.

        Raises:
            DataError: naming the preset when it is unknown or a value is malformed.
        """
        name = str(preset)
        key = Path(name).stem if name.endswith(".csv") and not Path(name).is_file() else name
        if key in CLAM_PRESETS:
            values: dict[str, Any] = dict(CLAM_PRESETS[key])
        elif Path(name).is_file():
            values = cls._read_csv(Path(name))
        else:
            raise DataError(
                f"CLAM preset {name!r}: neither one of {sorted(CLAM_PRESETS)} nor a preset CSV file"
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"CLAM preset {name!r}: unknown setting(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    @classmethod
    def _read_csv(cls, path: Path) -> dict[str, Any]:
        import pandas as pd

        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as err:
            raise DataError(f"CLAM preset {path}: cannot be read as CSV ({err})") from err
        if len(table) < 1:
            raise DataError(f"CLAM preset {path}: no row; expected a header and one row of settings")
        row = table.iloc[0].to_dict()
        src = str(path)
        out: dict[str, Any] = {}
        casts = {"seg_level": int, "sthresh": int, "mthresh": int, "close": int, "max_n_holes": int,
                 "a_t": float, "a_h": float, "contour_fn": str}
        try:
            for key, cast in casts.items():
                if key in row and row[key] != "":
                    out[key] = cast(row[key])
        except ValueError as err:
            raise DataError(f"CLAM preset {path}: {err}") from err
        for key in ("use_otsu", "use_padding"):
            if key in row and row[key] != "":
                out[key] = _parse_bool(row[key], key, src)
        for key in ("keep_ids", "exclude_ids"):
            if key in row:
                out[key] = _parse_ids(row[key], key, src)
        return out

    def settings(self) -> dict:
        """The settings as a JSON-ready dict."""
        d = asdict(self)
        d["keep_ids"], d["exclude_ids"] = list(self.keep_ids), list(self.exclude_ids)
        return d

    def replace(self, **changes: Any) -> "ClamParams":
        """A copy with some fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class ClamSegmentation:
    """CLAM's tissue contours of one slide.

    Attributes:
        contours: tissue contours, each (k, 1, 2) int32 level-0 (x, y).
        holes: for each contour, its kept holes, each (k, 1, 2) int32 level-0 (x, y).
        seg_level: the level segmented.
        seg_downsample: (x, y) level-0 pixels per ``seg_level`` pixel (CLAM's estimate).
        image: (h, w, 3) uint8 RGB of ``seg_level``.
        mask: (h, w) bool, the kept contours filled minus their kept holes.
    """

    contours: list[np.ndarray]
    holes: list[list[np.ndarray]]
    seg_level: int
    seg_downsample: tuple[float, float]
    image: np.ndarray
    mask: np.ndarray


def clam_level_downsamples(slide: Any) -> list[tuple[float, float]]:
    """CLAM's per-axis downsample of every level: OpenSlide's value when the dimensions agree, else w0/w, h0/h."""
    w0, h0 = slide.level_dimensions[0]
    out = []
    for ds, (w, h) in zip(slide.level_downsamples, slide.level_dimensions):
        est = (w0 / float(w), h0 / float(h))
        out.append((float(ds), float(ds)) if est == (ds, ds) else est)
    return out


def _seg_level(slide: Any, seg_level: int, name: str) -> int:
    n = len(slide.level_dimensions)
    if seg_level < 0:
        return 0 if n == 1 else int(slide.get_best_level_for_downsample(64))
    if seg_level >= n:
        raise DataError(f"slide {name}: seg_level {seg_level} asked for; it has {n} level(s)")
    return int(seg_level)


def _filter_contours(cv2: Any, contours: tuple, hierarchy: np.ndarray, a_t: float, a_h: float, max_n_holes: int):
    # hierarchy columns after CLAM's slicing: [first child, parent]
    tissue, holes = [], []
    for idx in np.flatnonzero(hierarchy[:, 1] == -1):
        hole_ids = np.flatnonzero(hierarchy[:, 1] == idx)
        area = cv2.contourArea(contours[idx]) - np.array([cv2.contourArea(contours[h]) for h in hole_ids]).sum()
        if area == 0 or not a_t < area:
            continue
        tissue.append(contours[idx])
        largest = sorted((contours[h] for h in hole_ids), key=cv2.contourArea, reverse=True)[:max_n_holes]
        holes.append([h for h in largest if cv2.contourArea(h) > a_h])
    return tissue, holes


def clam_segment(slide: Any, params: ClamParams | None = None, *, name: str | os.PathLike = "slide") -> ClamSegmentation:
    """Segment the tissue of an open slide as CLAM's ``segmentTissue`` does.

    Args:
        slide: an open OpenSlide slide.
        params: the settings (default: CLAM's TCGA preset).
        name: the slide's file, for error messages.

    Returns:
        The :class:`ClamSegmentation` (possibly with no contour).

    Raises:
        DataError: naming the slide when the segmentation level is too large (CLAM's
            ``failed_seg``: over 1e8 pixels) or a ``keep_ids`` index does not exist.
    """
    cv2 = _cv2()
    params = params or ClamParams()
    level = _seg_level(slide, params.seg_level, str(name))
    w, h = slide.level_dimensions[level]
    if w * h > MAX_SEG_PIXELS:
        raise DataError(
            f"slide {name}: level {level} is {w} x {h} pixels, too large to segment (CLAM's limit is "
            f"1e8 pixels); expected a pyramid with a level near 64x downsample, or pass a coarser seg_level"
        )
    rgba = np.array(slide.read_region((0, 0), level, (w, h)))
    sat = cv2.cvtColor(rgba, cv2.COLOR_RGB2HSV)[:, :, 1]  # 4-channel input: alpha is ignored
    sat = cv2.medianBlur(np.ascontiguousarray(sat), params.mthresh)
    if params.use_otsu:
        _, binary = cv2.threshold(sat, 0, 255, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    else:
        _, binary = cv2.threshold(sat, params.sthresh, 255, cv2.THRESH_BINARY)
    if params.close > 0:
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((params.close, params.close), np.uint8))
    scale = clam_level_downsamples(slide)[level]
    unit = int(REF_PATCH_SIZE**2 / (scale[0] * scale[1]))
    found, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    tissue: list[np.ndarray] = []
    holes: list[list[np.ndarray]] = []
    if hierarchy is not None and len(found):
        tissue, holes = _filter_contours(
            cv2, found, hierarchy.reshape(-1, 4)[:, 2:], params.a_t * unit, params.a_h * unit, params.max_n_holes
        )
    ids = list(range(len(tissue)))
    if params.keep_ids:
        bad = sorted(set(params.keep_ids) - set(ids))
        if bad:
            raise DataError(f"slide {name}: keep_ids {bad} asked for; the segmentation kept contours {ids}")
        ids = sorted(set(params.keep_ids))
    ids = [i for i in ids if i not in set(params.exclude_ids)]
    tissue, holes = [tissue[i] for i in ids], [holes[i] for i in ids]
    mask = np.zeros((h, w), np.uint8)
    cv2.drawContours(mask, tissue, -1, 255, thickness=cv2.FILLED)
    for hs in holes:
        cv2.drawContours(mask, hs, -1, 0, thickness=cv2.FILLED)
    factor = np.asarray(scale, dtype=np.float64)
    return ClamSegmentation(
        contours=[np.array(c * factor, dtype=np.int32) for c in tissue],
        holes=[[np.array(hh * factor, dtype=np.int32) for hh in hs] for hs in holes],
        seg_level=level,
        seg_downsample=(float(scale[0]), float(scale[1])),
        image=np.ascontiguousarray(rgba[:, :, :3]),
        mask=mask > 0,
    )


def _in_contour(cv2: Any, contour: np.ndarray, x: float, y: float) -> bool:
    return cv2.pointPolygonTest(contour, (float(x), float(y)), False) >= 0


def _keep(cv2: Any, contour: np.ndarray, holes: list[np.ndarray], x: int, y: int, size: int, rule: str) -> bool:
    half = size // 2
    cx, cy = x + half, y + half
    if rule == "basic":
        inside = _in_contour(cv2, contour, x, y)
    elif rule == "center":
        inside = _in_contour(cv2, contour, cx, cy)
    else:
        shift = int(half * 0.5)
        points = [(cx - shift, cy - shift), (cx + shift, cy + shift), (cx + shift, cy - shift), (cx - shift, cy + shift)]
        if shift == 0:
            points = [(cx, cy)]
        hits = (_in_contour(cv2, contour, px, py) for px, py in points)
        inside = any(hits) if rule == "four_pt" else all(hits)
    if not inside:
        return False
    centre = (x + size / 2, y + size / 2)  # CLAM's hole test uses the true (float) centre
    return not any(cv2.pointPolygonTest(hole, centre, False) > 0 for hole in holes)


def clam_patch_coords(
    seg: ClamSegmentation,
    *,
    level_downsamples: list[tuple[float, float]],
    slide_dim: tuple[int, int],
    patch_level: int = 0,
    patch_size: int = 256,
    step_size: int = 256,
    use_padding: bool = True,
    contour_fn: str = "four_pt",
) -> tuple[np.ndarray, np.ndarray]:
    """CLAM's patch coordinates (``process_contours``) for a segmentation.

    Args:
        seg: the contours (:func:`clam_segment`).
        level_downsamples: CLAM's per-axis downsamples (:func:`clam_level_downsamples`).
        slide_dim: level-0 (w, h).
        patch_level: level the patches are read at.
        patch_size: side read at ``patch_level``.
        step_size: grid step in ``patch_level`` pixels.
        use_padding: grid to the end of each bounding box (else whole patches only).
        contour_fn: keep rule (see :class:`ClamParams`).

    Returns:
        ``(coords, contour_index)``: (n, 2) int64 level-0 (x, y) in CLAM's order, and (n,)
        the index of the contour each came from.
    """
    cv2 = _cv2()
    if contour_fn not in CONTOUR_FNS:
        raise DataError(f"CLAM settings: contour_fn={contour_fn!r}; expected one of {CONTOUR_FNS}")
    if patch_size < 1 or step_size < 1:
        raise DataError(f"CLAM settings: patch_size={patch_size}, step_size={step_size}; expected >= 1")
    # CLAM truncates the level downsample to an integer here (4.0002 -> 4).
    dx, dy = int(level_downsamples[patch_level][0]), int(level_downsamples[patch_level][1])
    ref_w, ref_h = patch_size * dx, patch_size * dy
    img_w, img_h = slide_dim
    coords, owner = [], []
    for idx, (contour, holes) in enumerate(zip(seg.contours, seg.holes)):
        x0, y0, w, h = cv2.boundingRect(contour)
        stop_x, stop_y = x0 + w, y0 + h
        if not use_padding:
            stop_x, stop_y = min(stop_x, img_w - ref_w + 1), min(stop_y, img_h - ref_h + 1)
        xs = np.arange(x0, stop_x, step_size * dx)
        ys = np.arange(y0, stop_y, step_size * dy)
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        for x, y in zip(gx.ravel().tolist(), gy.ravel().tolist()):
            if _keep(cv2, contour, holes, x, y, ref_w, contour_fn):
                coords.append((x, y))
                owner.append(idx)
    return np.array(coords, dtype=np.int64).reshape(-1, 2), np.array(owner, dtype=np.int64)


def clam_patch_grid(
    slide: Any,
    info: Any,
    params: ClamParams | None = None,
    *,
    patch_level: int = 0,
    patch_size: int = 256,
    step_size: int | None = None,
) -> tuple["PatchGrid", ClamSegmentation]:
    """Segment an open slide and lay CLAM's patches: ``create_patches_fp.py --seg --patch``.

    Args:
        slide: the open OpenSlide slide.
        info: its :class:`~gimplib.data.wsi.slide.SlideInfo`.
        params: CLAM's settings (default: the TCGA preset).
        patch_level: pyramid level the patches are read at (CLAM's ``--patch_level``).
        patch_size: side read at ``patch_level`` (CLAM's ``--patch_size``).
        step_size: grid step at ``patch_level`` (default ``patch_size``).

    Returns:
        ``(grid, segmentation)``; the grid may hold no patch (CLAM then writes no file).

    Raises:
        DataError: naming the slide when ``patch_level`` does not exist or segmentation fails.
    """
    from gimplib.data.wsi.patching import PatchGrid

    params = params or ClamParams()
    if not 0 <= patch_level < info.level_count:
        raise DataError(f"slide {info.path}: patch_level {patch_level} asked for; it has {info.level_count} level(s)")
    seg = clam_segment(slide, params, name=info.path)
    downsamples = clam_level_downsamples(slide)
    coords, _ = clam_patch_coords(
        seg,
        level_downsamples=downsamples,
        slide_dim=info.dimensions,
        patch_level=patch_level,
        patch_size=patch_size,
        step_size=step_size or patch_size,
        use_padding=params.use_padding,
        contour_fn=params.contour_fn,
    )
    ds = downsamples[patch_level]
    grid = PatchGrid(
        coords=coords,
        tissue=None,
        patch_level=patch_level,
        patch_size=int(patch_size),
        patch_size_level0=int(patch_size) * int(ds[0]),
        target_patch_size=None,
        target_magnification=None,
        slide_magnification=None,
        magnification_source=None,
        downsample=(float(ds[0]), float(ds[1])),
        level_dim=info.level_dimensions[patch_level],
        slide_dim=info.dimensions,
        mode="clam",
    )
    return grid, seg
