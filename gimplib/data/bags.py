"""Bags: the patch features (and coords) of one slide, in CLAM's file formats.

CLAM's ``extract_features_fp.py`` writes ``h5_files/<slide_id>.h5`` with two datasets,
``features`` (N, D) float32 and ``coords`` (N, 2) int (level-0 pixel x, y), created
chunked and resizable (``maxshape=(None, ...)``), and ``pt_files/<slide_id>.pt`` holding
the (N, D) feature tensor alone. Both are read here without conversion. From h5 only
the requested rows are read, so a 6,000-patch window of a 148,569-patch bag costs a
window's worth of IO, not a bag's.

A run that reads the same small bags every epoch (and a sweep that trains many systems on
one cohort in one process) can keep whole bags in memory: :func:`set_bag_cache` turns on a
process-wide, size-bounded cache that :class:`BagReader` consults. It is off by default
because paper-scale bags (up to 148,569 x 1024) do not fit it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from gimplib.utils import DataError, atomic_path

__all__ = [
    "Bag", "BagReader", "bag_cache_info", "bag_encoder", "bag_info", "read_bag", "set_bag_cache", "write_bag", "write_bag_pt"]

BAG_SUFFIXES = (".h5", ".pt")


@dataclass
class Bag:
    """One slide's patches.

    Attributes:
        feats: (n, d) float32 features.
        coords: (n, 2) int64 level-0 (x, y) of each patch's top-left corner, or None
            (``.pt`` bags carry no coords).
        path: the file it came from.
    """

    feats: np.ndarray
    coords: np.ndarray | None
    path: Path

    def __len__(self) -> int:
        return int(self.feats.shape[0])


def _check_h5_datasets(f: h5py.File, path: Path) -> tuple[int, int]:
    if "features" not in f:
        raise DataError(
            f"{path}: no 'features' dataset (found {sorted(f.keys())}); "
            "expected CLAM's h5 layout with 'features' (N, D) and 'coords' (N, 2)"
        )
    feats = f["features"]
    if not isinstance(feats, h5py.Dataset):
        raise DataError(f"{path}: 'features' is a group, not a dataset; expected an (N, D) array")
    if feats.ndim != 2:
        raise DataError(f"{path}: 'features' has shape {feats.shape}; expected (N, D)")
    n, d = feats.shape
    if n == 0:
        raise DataError(f"{path}: empty bag ('features' has 0 rows); expected at least one patch")
    if "coords" in f:
        coords = f["coords"]
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise DataError(f"{path}: 'coords' has shape {coords.shape}; expected (N, 2)")
        if coords.shape[0] != n:
            raise DataError(
                f"{path}: 'features' has {n} rows but 'coords' has {coords.shape[0]}; "
                "expected one coordinate pair per patch"
            )
    return int(n), int(d)


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        raise DataError(f"{path}: bag file not found")
    try:
        # no chunk cache: a window is whole chunks plus two partial ones, read once each, and
        # without the cache HDF5 reads them straight into the output (a window read measured
        # 2.8 vs 3.5 ms on CLAM's (32, 1024) chunks; issue 14)
        return h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as err:
        raise DataError(f"{path}: cannot be read as HDF5 ({err}); expected a CLAM h5 bag") from err


def _load_pt(path: Path) -> torch.Tensor:
    if not path.exists():
        raise DataError(f"{path}: bag file not found")
    try:
        # mmap: the shape (bag_info) and a window (read_bag) then cost only the pages touched
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # files saved with the legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a corrupt file
            raise DataError(f"{path}: cannot be read as a torch tensor file ({err})") from err
    if isinstance(obj, dict) and "features" in obj:
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
        shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise DataError(f"{path}: holds {shape}; expected an (N, D) feature tensor")
    if obj.shape[0] == 0:
        raise DataError(f"{path}: empty bag (0 rows); expected at least one patch")
    return obj


def bag_info(path: str | os.PathLike) -> tuple[int, int]:
    """Number of patches and feature dim of a bag, from the file's shape alone.

    Args:
        path: a CLAM ``.h5`` or ``.pt`` bag.

    Returns:
        ``(n, d)``.
    """
    path = Path(path)
    if path.suffix == ".pt":
        t = _load_pt(path)
        return int(t.shape[0]), int(t.shape[1])
    with _open_h5(path) as f:
        return _check_h5_datasets(f, path)


def _finite_or_raise(feats: np.ndarray, path: Path, start: int) -> None:
    if not np.isfinite(feats).all():
        bad = int(np.argwhere(~np.isfinite(feats))[0, 0]) + start
        raise DataError(f"{path}: NaN or inf in 'features' (first at row {bad}); expected finite values")


def _read_h5_rows(
    f: h5py.File, path: Path, start: int | None, stop: int | None, with_coords: bool
) -> tuple[np.ndarray, np.ndarray | None, int]:
    n, _ = _check_h5_datasets(f, path)
    lo, hi = _bounds(start, stop, n, path)
    try:
        feats = np.asarray(f["features"][lo:hi], dtype=np.float32)
        coords = None
        if with_coords and "coords" in f:
            coords = np.asarray(f["coords"][lo:hi], dtype=np.int64)
    except OSError as err:  # a truncated or damaged file can open fine and fail on read
        raise DataError(f"{path}: rows [{lo}, {hi}) cannot be read ({err}); the file looks corrupt") from err
    return feats, coords, lo


# --------------------------------------------------------------------------- in-memory cache


class _BagCache:
    """Whole h5 bags (features in their stored dtype, coords) kept in memory, least recently
    used evicted first, keyed by the file's identity (:func:`_identity`), so that a rewritten
    file is read again."""

    def __init__(self) -> None:
        self.max_bytes = 0
        self.entries: OrderedDict[tuple, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self.nbytes = self.hits = self.misses = 0

    @staticmethod
    def _size(feats: np.ndarray, coords: np.ndarray | None) -> int:
        return feats.nbytes + (coords.nbytes if coords is not None else 0)

    def _shrink(self, limit: int) -> None:
        """Evict least recently used bags until at most ``limit`` bytes are held."""
        while self.entries and self.nbytes > limit:
            self.nbytes -= self._size(*self.entries.popitem(last=False)[1])

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._shrink(max_bytes)
        if max_bytes == 0:
            self.hits = self.misses = 0

    def get(self, key: tuple) -> tuple[np.ndarray, np.ndarray | None] | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return entry

    def load(self, key: tuple, f: h5py.File, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
        """Read the whole bag ``f`` (identity ``key``), check it once, keep it if it fits."""
        n, _ = _check_h5_datasets(f, path)
        try:
            feats = np.asarray(f["features"][...])
            coords = np.asarray(f["coords"][...], dtype=np.int64) if "coords" in f else None
        except OSError as err:
            raise DataError(f"{path}: rows [0, {n}) cannot be read ({err}); the file looks corrupt") from err
        if not np.issubdtype(feats.dtype, np.floating):
            feats = feats.astype(np.float32)
        _finite_or_raise(feats, path, 0)  # once, for the whole bag
        size = self._size(feats, coords)
        if size <= self.max_bytes:  # a bag larger than the whole budget is read from disk each time
            self._shrink(self.max_bytes - size)
            self.entries[key] = (feats, coords)
            self.nbytes += size
        return feats, coords


_CACHE = _BagCache()


def set_bag_cache(max_gb: float) -> None:
    """Keep whole h5 bags in memory, up to ``max_gb`` GiB in this process (0 turns it off).

    Bags are cached in their stored dtype (a float16 bag costs half a float32 one) the first
    time :class:`BagReader` reads any rows of them, after their features were checked to be
    finite; later reads of any rows come from memory. Every process (each DataLoader worker
    too) has its own cache. Lowering the budget evicts the least recently used bags.

    Args:
        max_gb: the budget in GiB (2**30 bytes); 0 empties and disables the cache.
    """
    if not max_gb >= 0:
        raise ValueError(f"max_gb must be >= 0, got {max_gb}")
    _CACHE.resize(int(max_gb * 2**30))


def bag_cache_info() -> dict[str, int]:
    """The cache's state: ``max_bytes``, ``bytes``, ``bags``, ``hits``, ``misses``."""
    return {"max_bytes": _CACHE.max_bytes, "bytes": _CACHE.nbytes, "bags": len(_CACHE.entries),
            "hits": _CACHE.hits, "misses": _CACHE.misses}


def _identity(path: Path) -> tuple:
    """(path, inode, mtime, size): changes when the file is rewritten or replaced."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: bag file not found") from None
    return (str(path), st.st_ino, st.st_mtime_ns, st.st_size)


def read_bag(
    path: str | os.PathLike,
    start: int | None = None,
    stop: int | None = None,
    with_coords: bool = True,
    check_finite: bool = True,
) -> Bag:
    """Read the rows ``[start, stop)`` of a bag (all rows by default).

    Args:
        path: ``.h5`` (CLAM ``features``/``coords``, float16 or float32, any D) or ``.pt``.
        start: first row (default 0).
        stop: one past the last row (default N). Out-of-range bounds are an error.
        with_coords: read ``coords`` too (h5 only).
        check_finite: raise on NaN/inf in what was read.

    Returns:
        A :class:`Bag` with ``feats`` (stop - start, D) float32 and ``coords``
        (stop - start, 2) int64 or None.
    """
    path = Path(path)
    if path.suffix == ".pt":
        t = _load_pt(path)
        lo, hi = _bounds(start, stop, t.shape[0], path)
        feats = t[lo:hi].to(torch.float32).numpy()
        coords = None
    else:
        with _open_h5(path) as f:
            feats, coords, lo = _read_h5_rows(f, path, start, stop, with_coords)
    if check_finite:
        _finite_or_raise(feats, path, lo)
    return Bag(feats=feats, coords=coords, path=path)


class BagReader:
    """Reads bags through a small pool of open file handles, one pool per process.

    Opening an HDF5 file costs more than reading a 6,000-row window from it, so a
    dataset that reads many windows keeps its files open. Handles are never shared
    across processes: the pool is dropped when pickled (DataLoader workers) and
    rebuilt when the process id changes (fork), so each worker opens its own.

    Args:
        max_open: how many files to keep open (least recently used is closed first).
    """

    def __init__(self, *, max_open: int = 64) -> None:
        self.max_open = max_open
        self._pid: int | None = None
        self._h5: dict[Path, tuple[h5py.File, tuple]] = {}
        self._pt: dict[Path, tuple[torch.Tensor, tuple]] = {}

    def __getstate__(self) -> dict:
        return {"max_open": self.max_open, "_pid": None, "_h5": {}, "_pt": {}}

    def _pool(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use
            self._h5, self._pt, self._pid = {}, {}, os.getpid()

    def _handle(self, path: Path, ident: tuple) -> h5py.File | torch.Tensor:
        """The open handle of ``path``, whose identity is now ``ident`` (:func:`_identity`); a
        file replaced since it was opened (e.g. rewritten atomically) is opened again."""
        self._pool()
        pool = self._pt if path.suffix == ".pt" else self._h5
        if path in pool:
            handle, old = pool.pop(path)
            if old == ident:
                pool[path] = (handle, ident)  # mark as most recently used
                return handle
            if isinstance(handle, h5py.File):
                handle.close()
        if len(pool) >= self.max_open:
            oldest = next(iter(pool))
            handle = pool.pop(oldest)[0]
            if isinstance(handle, h5py.File):
                handle.close()
        handle = _load_pt(path) if path.suffix == ".pt" else _open_h5(path)
        pool[path] = (handle, ident)
        return handle

    def read(
        self,
        path: str | os.PathLike,
        start: int | None = None,
        stop: int | None = None,
        with_coords: bool = True,
        check_finite: bool = True,
    ) -> Bag:
        """Same as :func:`read_bag`, through the pool (and the cache, when :func:`set_bag_cache` is on)."""
        path = Path(path)
        ident = _identity(path)
        if _CACHE.max_bytes and path.suffix != ".pt":
            # a cached bag needs no open file; a bag read for the cache was checked finite
            entry = _CACHE.get(ident)
            feats, coords = entry if entry is not None else _CACHE.load(ident, self._handle(path, ident), path)
            lo, hi = _bounds(start, stop, feats.shape[0], path)
            out_coords = coords[lo:hi].copy() if with_coords and coords is not None else None
            return Bag(feats=feats[lo:hi].astype(np.float32), coords=out_coords, path=path)
        handle = self._handle(path, ident)
        if isinstance(handle, torch.Tensor):
            lo, hi = _bounds(start, stop, handle.shape[0], path)
            feats, coords = handle[lo:hi].to(torch.float32).numpy(), None
        else:
            feats, coords, lo = _read_h5_rows(handle, path, start, stop, with_coords)
        if check_finite:
            _finite_or_raise(feats, path, lo)
        return Bag(feats=feats, coords=coords, path=path)

    def close(self) -> None:
        """Close every open file."""
        for handle, _ in self._h5.values():
            handle.close()
        self._h5, self._pt = {}, {}

    def __del__(self) -> None:
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:
            pass


def _bounds(start: int | None, stop: int | None, n: int, path: Path) -> tuple[int, int]:
    lo = 0 if start is None else int(start)
    hi = n if stop is None else int(stop)
    if not (0 <= lo < hi <= n):
        raise DataError(f"{path}: rows [{lo}, {hi}) requested from a bag of {n} patches")
    return lo, hi


def write_bag(
    path: str | os.PathLike,
    feats: np.ndarray | torch.Tensor,
    coords: np.ndarray | torch.Tensor | None = None,
    attrs: dict | None = None,
    dtype: str = "float32",
    chunk_rows: int = 1024,
    coords_dtype: str = "int64",
    file_attrs: dict | None = None,
    feature_attrs: dict | None = None,
) -> Path:
    """Write a bag as CLAM does (chunked, resizable datasets), atomically.

    Args:
        path: destination ``.h5``.
        feats: (n, d) features.
        coords: (n, 2) level-0 (x, y), or None.
        attrs: extra attributes for the ``coords`` dataset (CLAM stores patch_size,
            patch_level, downsample, ... there).
        dtype: stored feature dtype, ``float32`` (CLAM's) or ``float16``.
        chunk_rows: rows per HDF5 chunk.
        coords_dtype: stored coords dtype (CLAM's ``extract_features_fp.py`` writes int32).
        file_attrs: attributes of the file itself (gimp-extract records the encoder and its
            weights' identity there, see :func:`bag_encoder`).
        feature_attrs: attributes of the ``features`` dataset (TRIDENT names its encoder there).

    Returns:
        ``path``.
    """
    path = Path(path)
    feats = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise DataError(f"{path}: refusing to write features of shape {feats.shape}; expected (N>0, D)")
    n, d = feats.shape
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            rows = max(1, min(chunk_rows, n))
            fds = f.create_dataset(
                "features", data=feats.astype(dtype), maxshape=(None, d), chunks=(rows, d)
            )
            for key, value in (feature_attrs or {}).items():
                fds.attrs[key] = value
            if coords is not None:
                coords = coords.cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
                if coords.shape != (n, 2):
                    raise DataError(f"{path}: coords of shape {coords.shape}; expected ({n}, 2)")
                ds = f.create_dataset(
                    "coords", data=coords.astype(coords_dtype), maxshape=(None, 2), chunks=(rows, 2)
                )
                for key, value in (attrs or {}).items():
                    ds.attrs[key] = value
            for key, value in (file_attrs or {}).items():
                f.attrs[key] = value
    return path


def bag_encoder(path: str | os.PathLike) -> dict[str, str]:
    """The encoder a bag's features came from, as gimp-extract records it.

    Returns:
        ``{"encoder": ..., "encoder_weights": ...}`` where ``encoder_weights`` is
        ``"sha256:<hex>"`` of the weights file or ``"random"``; empty for a ``.pt`` bag or
        an ``.h5`` written by other tools (CLAM records nothing).
    """
    path = Path(path)
    if path.suffix != ".h5":
        return {}
    with _open_h5(path) as f:
        return {k: str(f.attrs[k]) for k in ("encoder", "encoder_weights") if k in f.attrs}


def write_bag_pt(path: str | os.PathLike, feats: np.ndarray | torch.Tensor) -> Path:
    """Write CLAM's ``pt_files/<slide_id>.pt`` (the (N, D) tensor alone), atomically."""
    path = Path(path)
    t = torch.as_tensor(np.asarray(feats) if not isinstance(feats, torch.Tensor) else feats)
    if t.ndim != 2 or t.shape[0] == 0:
        raise DataError(f"{path}: refusing to write features of shape {tuple(t.shape)}; expected (N>0, D)")
    with atomic_path(path) as tmp:
        torch.save(t.detach().cpu().float().contiguous(), tmp)
    return path
