"""``python -m gimplib.bench io``: reading a 6,000-patch window vs the whole bag.

Writes one bag of the paper's largest size (148,569 x 1024 float32, 608 MB) the way
CLAM's ``save_hdf5`` does (chunked ``(32, D)``, ``maxshape=(None, D)``, appended batch by
batch through ``resize``) into a temporary folder, then times

* ``window_s``: :func:`gimplib.data.read_bag` of a random 6,000-row window (opening the
  file each time, as a cold dataset item would);
* ``window_pooled_s``: the same through :class:`gimplib.data.BagReader` (file kept open,
  what :class:`gimplib.data.WindowDataset` does after the first epoch);
* ``whole_s``: ``h5py`` ``f["features"][:]``, the whole bag, as CLAM's loaders read it;

each the median of ``--repeats`` runs on a warm page cache (the file was just written),
and reports ``ratio = whole_s / window_s`` (the target is >= 20; the ideal for pure
bandwidth is n / L = 24.8).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from gimplib.data.bags import BagReader, read_bag

__all__ = ["run", "write_clam_style"]


def write_clam_style(
    path: Path, n: int, dim: int, *, chunk_rows: int = 32, batch: int = 512, seed: int = 0
) -> Path:
    """Write an (n, dim) float32 bag as CLAM's feature extraction does, batch by batch.

    Args:
        path: destination ``.h5``.
        n: patches.
        dim: feature dim.
        chunk_rows: HDF5 chunk rows (CLAM: 32; older CLAM versions: 1).
        batch: rows appended per ``resize`` (CLAM: one feature-extraction batch).
        seed: feature seed.
    """
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for lo in range(0, n, batch):
            hi = min(lo + batch, n)
            feats = rng.random((hi - lo, dim), dtype=np.float32)
            coords = np.stack([np.arange(lo, hi) % 512, np.arange(lo, hi) // 512], 1).astype(np.int64) * 256
            for key, val in (("features", feats), ("coords", coords)):
                if key not in f:
                    f.create_dataset(
                        key, data=val, maxshape=(None, val.shape[1]), chunks=(chunk_rows, val.shape[1])
                    )
                else:
                    ds = f[key]
                    ds.resize(ds.shape[0] + len(val), axis=0)
                    ds[-len(val) :] = val
    return path


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the figures as a flat dict (printed as JSON by the CLI)."""
    parser = argparse.ArgumentParser(prog="python -m gimplib.bench io", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=148_569, help="patches in the bag")
    parser.add_argument("--dim", type=int, default=1024, help="feature dim")
    parser.add_argument("--window", type=int, default=6000, help="window length L")
    parser.add_argument("--chunk-rows", type=int, default=32, help="HDF5 chunk rows (CLAM: 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the temporary bag")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.window <= args.n:
        parser.error("need 0 < window <= n")

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="gimp-bench-io-") as tmp:
        path = Path(tmp) / "bag.h5"
        t0 = time.perf_counter()
        write_clam_style(path, args.n, args.dim, chunk_rows=args.chunk_rows, seed=args.seed)
        write_s = time.perf_counter() - t0
        rng = np.random.default_rng(args.seed)
        starts = iter(rng.integers(0, args.n - args.window + 1, size=10 * args.repeats + 10))

        def window() -> None:
            s = int(next(starts))
            bag = read_bag(path, s, s + args.window)
            assert bag.feats.shape == (args.window, args.dim)

        reader = BagReader()
        reader.read(path, 0, 1)  # open once, as a warm dataset would have

        def window_pooled() -> None:
            s = int(next(starts))
            reader.read(path, s, s + args.window)

        def whole() -> None:
            with h5py.File(path, "r") as f:
                feats = f["features"][:]
            assert feats.shape == (args.n, args.dim)

        whole()  # warm the page cache equally for every reader
        window_s = _median_time(window, args.repeats)
        window_pooled_s = _median_time(window_pooled, args.repeats)
        whole_s = _median_time(whole, args.repeats)
        reader.close()
        file_mb = path.stat().st_size / 2**20

    return {
        "n_patches": args.n,
        "feat_dim": args.dim,
        "window_len": args.window,
        "chunk_rows": args.chunk_rows,
        "file_mb": round(file_mb, 1),
        "write_s": _sig(write_s),
        "window_s": _sig(window_s),
        "window_pooled_s": _sig(window_pooled_s),
        "whole_s": _sig(whole_s),
        "ratio": round(whole_s / window_s, 2),
        "ratio_pooled": round(whole_s / window_pooled_s, 2),
        "ideal_ratio": round(args.n / args.window, 2),
        "repeats": args.repeats,
        "page_cache": "warm",
    }


def _sig(seconds: float, digits: int = 4) -> float:
    """Round to significant digits, so tiny timings keep their precision (fixed decimals
    turned a 0.00046 s read into 0.0005 and the reported ratio no longer matched it)."""
    return float(f"{seconds:.{digits}g}")
