"""The multi-level TIFF the CLAM-mode tests write, and CLAM's coordinates on it.

Kept apart from the tests so that ``tests/fixtures/clam/README.md``'s recipe can write the
same bytes before CLAM's own ``create_patches_fp.py`` reads them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BACKGROUND = 245
PINK = np.array((200, 100, 180), np.int16)
SIZE = (3000, 2000)  # level-0 (w, h); levels 1 and 2 are exactly 2x and 4x smaller
LEVELS = 3


def clam_test_image(seed: int = 0) -> np.ndarray:
    """(2000, 3000, 3) uint8: three textured 'tissue' regions on glass, with holes of several sizes.

    Region A (left) has three holes of about 0.3 megapixel and one small one, so
    ``max_n_holes`` and ``a_h`` both matter; region B touches the right border, so padding
    matters; a diamond C gives slanted edges for the four-point rule; a speck falls under ``a_t``.
    """
    w, h = SIZE
    rng = np.random.default_rng(seed)
    tissue = np.zeros((h, w), bool)
    tissue[150:1850, 150:1650] = True  # A
    tissue[300:800, 300:900] = False  # A's holes
    tissue[300:850, 1000:1550] = False
    tissue[1100:1600, 400:1000] = False
    tissue[1200:1350, 1200:1350] = False  # small hole
    tissue[150:1100, 2100:] = True  # B, on the right border
    yy, xx = np.mgrid[0:h, 0:w]
    tissue |= (np.abs(xx - 2450) + np.abs(yy - 1500)) <= 420  # C
    tissue[200:320, 1800:1920] = True  # speck
    img = np.full((h, w, 3), BACKGROUND, np.uint8)
    noise = rng.integers(-30, 31, size=(h, w, 3), dtype=np.int16)
    img[tissue] = np.clip(PINK + noise[tissue], 0, 255).astype(np.uint8)
    return img


def write_clam_test_tiff(path: str | Path, seed: int = 0) -> Path:
    """Write :func:`clam_test_image` as a tiled 3-level pyramidal TIFF (generic-tiff for OpenSlide)."""
    import tifffile

    path = Path(path)
    img = clam_test_image(seed)
    with tifffile.TiffWriter(path) as tw:
        for k in range(LEVELS):
            tw.write(
                np.ascontiguousarray(img[:: 2**k, :: 2**k]), tile=(256, 256), photometric="rgb",
                compression="zlib", subfiletype=0 if k == 0 else 1,
                resolution=(1e4 / (0.5 * 2**k),) * 2, resolutionunit="CENTIMETER",
            )
    return path
