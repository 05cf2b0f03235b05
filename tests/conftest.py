"""Shared fixtures. No test reaches the network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real third-party files in ../shared/data (skips when the folder is absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only in the project's own checkouts)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def svs(shared_data: Path) -> Path:
    """The real Aperio slide region CMU-1-Small-Region.svs (skips when it is absent)."""
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the tiny models here run fastest on one, and the
    machine is shared (the Makefile exports OMP_NUM_THREADS=1 for the same reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    """The `smoke` synthetic cohort (24 patients) and its seeded train/val/test split."""
    from gimplib.data.cohort import load_cohort
    from gimplib.data.splits import train_val_test_split
    from gimplib.data.synthetic import generate_cohort

    folder = generate_cohort(tmp_path_factory.mktemp("cohort") / "smoke", preset="smoke", seed=0, progress=False)
    cohort = load_cohort(folder, verbose=False)
    return cohort, train_val_test_split(cohort, seed=0)
