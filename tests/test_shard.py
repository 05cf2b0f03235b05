"""gimp-extract --shard i/n: deterministic shards, lock files, and three workers at once on a few slides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from gimplib.data.wsi.shard import parse_shard, release_slide, shard_items, take_slide
from gimplib.utils import DataError

ROOT = Path(__file__).resolve().parents[1]


def test_shards_cover_every_slide_once():
    ids = [f"slide_{k}" for k in (5, 2, 9, 0, 7, 1, 3)]
    parts = [shard_items(ids, ids, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert parts[0] == ["slide_0", "slide_5"] or sorted(parts[0]) == ["slide_0", "slide_3", "slide_9"]
    assert shard_items(list(reversed(ids)), list(reversed(ids)), (1, 3)) == parts[1]  # listing order does not matter
    assert shard_items(ids, ids, None) == ids
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(DataError, match="shard"):
            parse_shard(bad)


def test_lock_files(tmp_path):
    lock = take_slide(tmp_path, "s1")
    assert lock is not None and take_slide(tmp_path, "s1") is None  # held by a live process (this one)
    release_slide(lock)
    assert take_slide(tmp_path, "s1") is not None
    # a lock left by a process that no longer exists is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "locks" / "s2.lock"
    stale.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "time": 0}))
    assert take_slide(tmp_path, "s2") is not None
    # one from another machine is left alone
    (tmp_path / "locks" / "s3.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    assert take_slide(tmp_path, "s3") is None


WORKER = """
import json, sys
from gimplib.data.wsi import ClamParams, ExtractConfig, process_slides
config = ExtractConfig(random_weights=True, clam=ClamParams(a_t=0.05, a_h=0.01), patch_level=0, max_patches=2,
                       batch_size=2, device="cpu")
shard = None if sys.argv[3] == "all" else sys.argv[3]
rows = process_slides(sys.argv[1], sys.argv[2], config, progress=False, shard=shard)
print(rows.error.tolist(), file=sys.stderr)
print(json.dumps(rows[["slide_id", "status"]].values.tolist()))
"""


@pytest.mark.slow
def test_two_shards_and_a_free_worker_at_once(tmp_path):
    pytest.importorskip("openslide", reason="the wsi extra is not installed")
    pytest.importorskip("cv2", reason="the wsi extra is not installed")
    tifffile = pytest.importorskip("tifffile", reason="the wsi extra is not installed")
    sys.path.insert(0, str(Path(__file__).parent))
    from _clam_tiff import clam_test_image

    slides = tmp_path / "slides"
    slides.mkdir()
    img = clam_test_image(0)[::4, ::4]  # 750 x 500, one level: quick to segment and read
    names = [f"slide_{k}" for k in range(5)]
    for name in names:
        tifffile.imwrite(slides / f"{name}.tif", img, tile=(256, 256), photometric="rgb")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(slides), str(out), shard], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for shard in ("0/2", "1/2", "all")]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    done = [[sid for sid, status in rows if status == "done"] for rows in results]
    everything = sum(done, [])
    assert sorted(everything) == names, results  # every slide embedded, and by exactly one worker
    assert set(s for s, _ in results[0]).isdisjoint(s for s, _ in results[1])  # the two shards are disjoint
    assert sorted(s for s, _ in results[0] + results[1]) == names
    assert {status for _, status in results[2]} <= {"done", "skipped", "locked"}  # the free worker never redid one
    status = pd.read_csv(out / "extract_status.csv")
    assert sorted(status.slide_id) == names and set(status.status) <= {"done", "skipped"}
    assert all((out / "h5_files" / f"{n}.h5").is_file() for n in names)
    assert not list((out / "locks").glob("*.lock"))
