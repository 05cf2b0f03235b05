"""Opening whole-slide images and reading their scale: levels, mpp, magnification.

OpenSlide is an optional dependency (``pip install gimplib[wsi]``); it is imported
inside the functions that need it, so ``import gimplib.data`` works without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gimplib.utils import DataError

__all__ = [
    "SlideInfo",
    "choose_level",
    "open_slide",
    "read_slide_info",
    "resolve_magnification",
    "slide_id_of",
]

# Objective powers a magnification derived from mpp is snapped to (within 5 %): 0.499 mpp
# must give 20x, not 20.04x, or every patch would be read one pixel too large.
STANDARD_MAGNIFICATIONS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0)


def slide_id_of(path: str | os.PathLike) -> str:
    """CLAM's slide id: the file name without its last extension (TCGA ids keep their dots)."""
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def _openslide() -> Any:
    try:
        import openslide
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "whole-slide reading needs OpenSlide: pip install 'gimplib[wsi]' "
            "(openslide-python and openslide-bin)"
        ) from err
    return openslide


def open_slide(path: str | os.PathLike) -> Any:
    """Open a slide with OpenSlide (plain PNG/JPEG images fall back to OpenSlide's ImageSlide).

    Args:
        path: a slide file (.svs, .tif, .ndpi, .mrxs, ...).

    Returns:
        An ``openslide.AbstractSlide``; close it when done.

    Raises:
        DataError: naming the file when it is missing or no reader understands it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"slide {path}: file not found")
    openslide = _openslide()
    try:
        return openslide.open_slide(str(path))
    except Exception as err:  # OpenSlideError, PIL.UnidentifiedImageError, OSError
        raise DataError(
            f"slide {path}: cannot be read as a whole-slide image ({type(err).__name__}: {err}); "
            "expected a format OpenSlide reads (svs, tiff, ndpi, mrxs, scn, ...)"
        ) from err


def _float_prop(props: Any, key: str) -> float | None:
    try:
        value = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value > 0 else None


@dataclass(frozen=True)
class SlideInfo:
    """What the tiler needs to know about a slide.

    Attributes:
        path: the slide file.
        slide_id: file name without extension.
        level_dimensions: (width, height) of every pyramid level, level 0 first.
        level_downsamples: downsample of every level relative to level 0.
        mpp: microns per level-0 pixel (``openslide.mpp-x``), or None.
        objective_power: scanning objective (``openslide.objective-power``), or None.
        vendor: ``openslide.vendor`` or None.
    """

    path: Path
    slide_id: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    objective_power: float | None
    vendor: str | None

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_downsample_xy(self, level: int) -> tuple[float, float]:
        """Per-axis downsample of ``level`` from the dimensions (CLAM's ``downsample`` attribute)."""
        w0, h0 = self.level_dimensions[0]
        w, h = self.level_dimensions[level]
        return (w0 / w, h0 / h)


def read_slide_info(slide: Any, path: str | os.PathLike) -> SlideInfo:
    """Collect levels and scale metadata from an open slide."""
    props = slide.properties
    mpp_x = _float_prop(props, "openslide.mpp-x")
    mpp_y = _float_prop(props, "openslide.mpp-y")
    mpp = mpp_x if mpp_y is None or mpp_x is None else (mpp_x + mpp_y) / 2
    return SlideInfo(
        path=Path(path),
        slide_id=slide_id_of(path),
        level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        mpp=mpp,
        objective_power=_float_prop(props, "openslide.objective-power"),
        vendor=props.get("openslide.vendor"),
    )


def resolve_magnification(info: SlideInfo, given: float | None = None) -> tuple[float, str]:
    """Level-0 magnification of a slide and where it came from.

    Order: the value the user gave, the scanner's objective power, then 10 / mpp
    (0.25 mpp ~ 40x, 0.5 mpp ~ 20x) snapped to a standard objective when within 5 %.

    Args:
        info: the slide.
        given: the user's level-0 magnification, overriding the metadata.

    Returns:
        ``(magnification, source)`` with source ``"given"``, ``"objective-power"`` or ``"mpp"``.

    Raises:
        DataError: naming the slide when none of the three is available.
    """
    if given is not None:
        if given <= 0:
            raise DataError(f"slide {info.path}: magnification {given} given; expected > 0")
        return float(given), "given"
    if info.objective_power is not None:
        return info.objective_power, "objective-power"
    if info.mpp is not None:
        mag = 10.0 / info.mpp
        for std in STANDARD_MAGNIFICATIONS:
            if abs(mag - std) <= 0.05 * std:
                mag = std
                break
        return mag, "mpp"
    raise DataError(
        f"slide {info.path}: no scale in its metadata (neither openslide.objective-power nor "
        "openslide.mpp-x); pass the level-0 magnification (slide_magnification=, "
        "--slide-magnification), e.g. 20 or 40"
    )


def choose_level(level_downsamples: tuple[float, ...], factor: float, tol: float = 0.02) -> int:
    """The coarsest pyramid level whose downsample does not exceed ``factor``.

    Reading from that level and resizing down by the remaining ratio never upsamples.

    Args:
        level_downsamples: downsample of every level (level 0 = 1).
        factor: wanted downsample from level 0 (e.g. 2 to read 20x from a 40x slide).
        tol: relative slack, because scanners store downsamples like 4.0002.

    Returns:
        The level index.
    """
    best = 0
    for level, ds in enumerate(level_downsamples):
        if ds <= factor * (1 + tol) and ds > level_downsamples[best]:
            best = level
    return best
