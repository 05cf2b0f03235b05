"""Bag IO: CLAM h5 and pt files, windows, the handle pool, and bad bags."""

from __future__ import annotations

import io
import json
import os
import pickle

import h5py
import numpy as np
import pytest
import torch

from gimplib.data import BagReader, bag_info, read_bag, write_bag, write_bag_pt
from gimplib.data.bags import _read_h5_rows
from gimplib.utils import DataError

from _data_helpers import clam_save_hdf5


@pytest.fixture
def feats() -> np.ndarray:
    return np.random.default_rng(0).random((300, 16), dtype=np.float32)


@pytest.fixture
def coords() -> np.ndarray:
    return (np.arange(600).reshape(300, 2) * 256).astype(np.int64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_h5_round_trip_and_window(tmp_path, feats, coords, dtype):
    path = write_bag(tmp_path / "s.h5", feats, coords, attrs={"patch_size": 256}, dtype=dtype)
    assert bag_info(path) == (300, 16)
    whole = read_bag(path)
    tol = 0 if dtype == "float32" else 1e-3
    assert whole.feats.dtype == np.float32 and whole.feats.shape == (300, 16)
    np.testing.assert_allclose(whole.feats, feats, atol=tol)
    np.testing.assert_array_equal(whole.coords, coords)
    win = read_bag(path, 17, 117)
    np.testing.assert_array_equal(win.feats, whole.feats[17:117])
    np.testing.assert_array_equal(win.coords, coords[17:117])
    assert len(win) == 100 and read_bag(path, with_coords=False).coords is None
    with h5py.File(path) as f:  # stored the way CLAM stores it
        assert f["features"].maxshape == (None, 16) and f["features"].chunks is not None
        assert f["coords"].attrs["patch_size"] == 256


def test_pt_round_trip_and_window(tmp_path, feats):
    path = write_bag_pt(tmp_path / "s.pt", feats)
    assert bag_info(path) == (300, 16)
    np.testing.assert_array_equal(read_bag(path).feats, feats)
    np.testing.assert_array_equal(read_bag(path, 5, 9).feats, feats[5:9])
    assert read_bag(path).coords is None
    torch.save(torch.from_numpy(feats).half(), tmp_path / "half.pt")  # CLAM-written, no helper
    assert read_bag(tmp_path / "half.pt").feats.dtype == np.float32


def test_clam_written_bag_reads_unchanged(tmp_path, feats, coords):
    path = tmp_path / "clam.h5"
    clam_save_hdf5(path, feats, coords, batch=64)
    with h5py.File(path) as f:
        assert f["features"].chunks == (32, 16) and f["features"].maxshape == (None, 16)
    assert bag_info(path) == (300, 16)
    np.testing.assert_array_equal(read_bag(path, 250, 300).feats, feats[250:])


class _CountingFile(io.RawIOBase):
    """A file object that counts the bytes h5py reads through it."""

    def __init__(self, path):
        self._f = open(path, "rb")
        self.bytes_read = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._f.seek(offset, whence)

    def tell(self):
        return self._f.tell()

    def readinto(self, buf):
        n = self._f.readinto(buf)
        self.bytes_read += n
        return n

    def close(self):
        self._f.close()
        super().close()


def test_window_reads_only_its_rows(tmp_path):
    n, d = 20_000, 64
    path = tmp_path / "big.h5"
    write_bag(path, np.ones((n, d), np.float32), chunk_rows=256)
    size = os.path.getsize(path)
    counter = _CountingFile(path)
    with h5py.File(counter, "r") as f:
        feats, _, _ = _read_h5_rows(f, path, 5000, 6000, with_coords=False)
    assert feats.shape == (1000, d)
    # 1000 of 20000 rows: the bytes read stay near the window's size, far below the file's
    assert counter.bytes_read < 0.15 * size, (counter.bytes_read, size)


def test_nan_outside_window_is_not_read(tmp_path, feats):
    feats = feats.copy()
    feats[200, 3] = np.nan
    path = write_bag(tmp_path / "nan.h5", feats)
    assert read_bag(path, 0, 100).feats.shape == (100, 16)
    with pytest.raises(DataError, match=r"nan\.h5.*NaN or inf.*row 200"):
        read_bag(path)


def test_bag_reader_pool_and_pickling(tmp_path, feats):
    paths = [write_bag(tmp_path / f"s{i}.h5", feats + i) for i in range(3)]
    reader = BagReader(max_open=2)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(reader.read(p, 0, 4).feats, feats[:4] + i)
    assert len(reader._h5) == 2  # least recently used closed
    clone = pickle.loads(pickle.dumps(reader))  # a DataLoader worker's copy
    assert clone._h5 == {} and clone._pid is None
    np.testing.assert_array_equal(clone.read(paths[0], 10, 12).feats, feats[10:12])
    reader.close()
    assert reader._h5 == {}


def test_write_is_atomic(tmp_path, feats):
    path = tmp_path / "s.h5"
    with pytest.raises(DataError, match=r"s\.h5.*coords"):
        write_bag(path, feats, coords=np.zeros((5, 2)))
    assert list(tmp_path.iterdir()) == []  # neither the bag nor a temp file
    with pytest.raises(DataError, match=r"e\.h5.*shape"):
        write_bag(tmp_path / "e.h5", np.zeros((0, 4)))


# --------------------------------------------------------------------------- bad bags


def _raw_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, val in datasets.items():
            f.create_dataset(key, data=val)
    return path


def test_missing_file(tmp_path):
    for name in ("gone.h5", "gone.pt"):
        with pytest.raises(DataError, match=rf"{name}: bag file not found"):
            bag_info(tmp_path / name)


def test_corrupt_files(tmp_path):
    bad = tmp_path / "corrupt.h5"
    bad.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DataError, match=r"corrupt\.h5: cannot be read as HDF5"):
        read_bag(bad)
    bad_pt = tmp_path / "corrupt.pt"
    bad_pt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match=r"corrupt\.pt: cannot be read"):
        bag_info(bad_pt)


def test_truncated_h5(tmp_path, feats):
    path = write_bag(tmp_path / "trunc.h5", np.tile(feats, (20, 1)), chunk_rows=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"trunc\.h5"):
        read_bag(path)


def test_no_features_dataset(tmp_path):
    path = _raw_h5(tmp_path / "nofeat.h5", coords=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"nofeat\.h5: no 'features' dataset.*\['coords'\]"):
        bag_info(path)


def test_features_coords_length_mismatch(tmp_path):
    path = _raw_h5(tmp_path / "mism.h5", features=np.zeros((5, 4)), coords=np.zeros((4, 2)))
    with pytest.raises(DataError, match=r"mism\.h5: 'features' has 5 rows but 'coords' has 4"):
        read_bag(path)


def test_empty_bag(tmp_path):
    path = _raw_h5(tmp_path / "empty.h5", features=np.zeros((0, 4)), coords=np.zeros((0, 2)))
    with pytest.raises(DataError, match=r"empty\.h5: empty bag"):
        bag_info(path)
    torch.save(torch.zeros(0, 4), tmp_path / "empty.pt")
    with pytest.raises(DataError, match=r"empty\.pt: empty bag"):
        bag_info(tmp_path / "empty.pt")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path, feats, bad):
    feats = feats.copy()
    feats[7, 2] = bad
    with pytest.raises(DataError, match=r"bad\.h5: NaN or inf in 'features' \(first at row 7\)"):
        read_bag(write_bag(tmp_path / "bad.h5", feats))
    with pytest.raises(DataError, match=r"bad\.pt: NaN or inf"):
        read_bag(write_bag_pt(tmp_path / "bad.pt", feats))


def test_bad_shapes_and_bounds(tmp_path):
    path = _raw_h5(tmp_path / "flat.h5", features=np.zeros(10))
    with pytest.raises(DataError, match=r"flat\.h5: 'features' has shape \(10,\)"):
        bag_info(path)
    ok = write_bag(tmp_path / "ok.h5", np.zeros((10, 3), np.float32))
    with pytest.raises(DataError, match=r"ok\.h5: rows \[5, 20\) requested from a bag of 10"):
        read_bag(ok, 5, 20)


def test_bench_io_small(tmp_path):
    from gimplib.bench.io import run

    out = run(["--n", "3000", "--dim", "32", "--window", "300", "--repeats", "2", "--dir", str(tmp_path)])
    json.dumps(out)
    assert out["n_patches"] == 3000 and out["window_len"] == 300
    assert out["window_s"] > 0 and out["whole_s"] > 0
    assert out["ratio"] == pytest.approx(out["whole_s"] / out["window_s"], rel=0.05)
    assert list(tmp_path.iterdir()) == []  # the temporary bag is gone


@pytest.fixture
def bag_cache():
    """Turn the process-wide bag cache on for one test, and off again afterwards."""
    from gimplib.data import set_bag_cache

    set_bag_cache(0)
    yield set_bag_cache
    set_bag_cache(0)


def test_bag_cache_is_off_by_default_and_serves_the_same_rows(tmp_path, feats, coords, bag_cache):
    from gimplib.data import bag_cache_info

    path = write_bag(tmp_path / "s.h5", feats, coords, dtype="float16")
    reader = BagReader()
    reader.read(path, 0, 10)
    assert bag_cache_info()["bags"] == 0  # off: nothing kept
    bag_cache(0.01)
    for lo, hi, with_coords in [(0, 300, True), (17, 42, False), (250, 300, True)]:
        got = reader.read(path, lo, hi, with_coords=with_coords)
        want = read_bag(path, lo, hi, with_coords=with_coords)
        assert got.feats.dtype == np.float32
        np.testing.assert_array_equal(got.feats, want.feats)
        if with_coords:
            np.testing.assert_array_equal(got.coords, want.coords)
        else:
            assert got.coords is None
    info = bag_cache_info()
    assert info["bags"] == 1 and info["misses"] == 1 and info["hits"] == 2
    assert info["bytes"] == feats.size * 2 + coords.size * 8  # kept as stored: float16
    got = reader.read(path, 0, 5)
    got.feats[:] = -1  # a caller's copy, not the cached rows
    np.testing.assert_array_equal(reader.read(path, 0, 5).feats, read_bag(path, 0, 5).feats)
    with pytest.raises(DataError, match=r"rows \[290, 301\) requested from a bag of 300"):
        reader.read(path, 290, 301)


def test_bag_cache_sees_rewritten_files_and_keeps_its_budget(tmp_path, feats, bag_cache):
    from gimplib.data import bag_cache_info

    bag_cache(0.01)
    reader = BagReader()
    path = write_bag(tmp_path / "s.h5", feats)
    reader.read(path)
    write_bag(path, feats + 1)  # atomically replaced: a new file under the same name
    np.testing.assert_allclose(reader.read(path).feats, feats + 1)
    bag_cache(0)
    write_bag(path, feats + 2)  # the handle pool alone must not serve the old file either
    np.testing.assert_allclose(reader.read(path).feats, feats + 2)
    bag_cache(0.01)
    # a budget of two bags: the least recently used third one is evicted
    one_bag = feats.nbytes
    bag_cache(2.5 * one_bag / 2**30)
    paths = [write_bag(tmp_path / f"b{i}.h5", feats) for i in range(3)]
    for p in paths:
        reader.read(p, with_coords=False)
    info = bag_cache_info()
    assert info["bags"] == 2 and info["bytes"] <= info["max_bytes"]
    bag_cache(0)
    assert bag_cache_info()["bags"] == 0
    with pytest.raises(ValueError, match="max_gb must be >= 0"):
        bag_cache(-1)


def test_bag_cache_checks_the_whole_bag_once(tmp_path, feats, bag_cache):
    bad = feats.copy()
    bad[250, 3] = np.nan
    path = write_bag(tmp_path / "bad.h5", bad)
    bag_cache(0.01)
    with pytest.raises(DataError, match=r"bad\.h5: NaN or inf in 'features' \(first at row 250\)"):
        BagReader().read(path, 0, 10)
