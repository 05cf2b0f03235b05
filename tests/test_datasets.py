"""Torch datasets: windows, whole bags, genes, collate, DataLoader workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gimplib.data import (
    BagDataset,
    GeneDataset,
    WindowDataset,
    collate_bags,
    load_cohort,
    read_bag,
    write_bag,
)
from gimplib.utils import DataError

from _data_helpers import case_name, make_cohort, slide_name


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    # case 0: two slides of 40 + 25 rows; cases 1..4: 30, 12, 50, 8 rows
    root = make_cohort(tmp_path_factory.mktemp("c") / "cohort", n_cases=5, lengths=[40, 25, 30, 12, 50, 8], two_slides=(0,))
    return load_cohort(root, verbose=False)


def _case_rows(cohort, case):
    return np.concatenate([read_bag(p).feats for p in cohort.slides_of(case)])


def test_window_is_a_contiguous_slice(cohort):
    ds = WindowDataset(cohort, cohort.case_ids, window_len=20, seed=0)
    for i, case in enumerate(cohort.case_ids):
        item = ds[i]
        rows = _case_rows(cohort, case)
        assert item["feats"].shape == (20, 8) and item["feats"].dtype == torch.float32
        assert item["mask"].dtype == torch.bool and item["mask"].all()
        assert item["case_id"] == case and item["y"].item() == i % 2 and item["index"] == i
        if len(rows) >= 20:
            s = item["start"]
            np.testing.assert_array_equal(item["feats"].numpy(), rows[s : s + 20])
        else:  # short bag repeated up to the window (case 2: 12 rows; case 4: 8)
            expect = rows[(item["start"] + np.arange(20)) % len(rows)]
            np.testing.assert_array_equal(item["feats"].numpy(), expect)
            assert set(item["feats"][:, 0].tolist()) == set(rows[:, 0].tolist())


def test_window_spans_a_case_s_slides(cohort):
    ds = WindowDataset(cohort, [case_name(0)], window_len=60, seed=0)  # 65 rows over two slides
    rows = _case_rows(cohort, case_name(0))
    starts = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        item = ds[0]
        starts.add(item["start"])
        np.testing.assert_array_equal(item["feats"].numpy(), rows[item["start"] : item["start"] + 60])
    assert len(starts) > 1  # windows move with the epoch


def test_windows_are_seeded(cohort):
    a = WindowDataset(cohort, cohort.case_ids, window_len=10, seed=5)
    b = WindowDataset(cohort, cohort.case_ids, window_len=10, seed=5)
    assert [a[i]["start"] for i in range(5)] == [b[i]["start"] for i in range(5)]
    first = [a[i]["start"] for i in range(5)]
    a.set_epoch(1)
    assert [a[i]["start"] for i in range(5)] != first


def test_window_padding_instead_of_tiling(cohort):
    ds = WindowDataset(cohort, [case_name(2)], window_len=20, tile_short=False, with_coords=True)
    item = ds[0]
    assert item["mask"].sum() == 12 and not item["mask"][12:].any()
    assert (item["feats"][12:] == 0).all() and item["coords"].shape == (20, 2)


def test_window_reads_only_the_window(tmp_path):
    root = make_cohort(tmp_path / "c", n_cases=1, lengths=[100], two_slides=(), genes=False)
    path = root / "h5_files" / f"{slide_name(case_name(0))}.h5"
    feats = read_bag(path).feats
    feats[50:] = np.nan  # rows a window never touches are never checked, so never read
    write_bag(path, feats)
    cohort = load_cohort(root, verbose=False)
    ds = WindowDataset(cohort, cohort.case_ids, window_len=10, seed=0)
    ok = failed = 0
    for epoch in range(20):
        ds.set_epoch(epoch)
        try:
            item = ds[0]
            assert item["start"] + 10 <= 50
            ok += 1
        except DataError as err:  # a window over the NaN rows fails, naming the file and row
            assert path.name in str(err) and "NaN or inf" in str(err)
            failed += 1
    assert ok > 0 and failed > 0  # a whole-bag read would fail every time


def test_bag_dataset_and_subsampling(cohort):
    ds = BagDataset(cohort, cohort.case_ids, seed=0)
    item = ds[0]
    np.testing.assert_array_equal(item["feats"].numpy(), _case_rows(cohort, case_name(0)))
    assert item["feats"].shape == (65, 8) and item["coords"].shape == (65, 2) and item["mask"].all()
    sub = BagDataset(cohort, cohort.case_ids, max_patches=16, seed=0)
    small = sub[0]
    assert small["feats"].shape == (16, 8)
    order = small["feats"][:, 0].numpy()
    assert (np.diff(order) > 0).all()  # original order kept (column 0 increases along the bag)
    assert set(order) <= set(item["feats"][:, 0].numpy())
    sub.set_epoch(1)
    assert not torch.equal(sub[0]["feats"], small["feats"])
    assert sub[4]["feats"].shape == (8, 8)  # shorter than max_patches: unchanged


def test_gene_dataset_and_gene_matrix_checks(cohort):
    genes = np.arange(15, dtype=np.float32).reshape(5, 3)
    ds = GeneDataset(cohort, cohort.case_ids, genes)
    assert torch.equal(ds[2]["genes"], torch.tensor([6.0, 7.0, 8.0])) and ds[2]["y"].item() == 0
    batch = collate_bags([ds[0], ds[1]])
    assert batch["genes"].shape == (2, 3) and "feats" not in batch
    with pytest.raises(DataError, match=r"gene_matrix of shape \(4, 3\); expected \(5, G\)"):
        GeneDataset(cohort, cohort.case_ids, genes[:4])
    bad = genes.copy()
    bad[1, 1] = np.nan
    with pytest.raises(DataError, match=rf"NaN or inf in the row of case '{case_name(1)}'"):
        WindowDataset(cohort, cohort.case_ids, gene_matrix=bad)
    with pytest.raises(DataError, match=r"case\(s\) \['TCGA-00-0000'\] are not in the cohort"):
        BagDataset(cohort, ["TCGA-00-0000"])


def test_collate_pads_and_masks(cohort):
    genes = np.ones((5, 3), np.float32)
    ds = BagDataset(cohort, cohort.case_ids, gene_matrix=genes)
    batch = collate_bags([ds[0], ds[2], ds[3]])  # 65, 12, 50 rows
    assert batch["feats"].shape == (3, 65, 8) and batch["mask"].shape == (3, 65)
    assert batch["mask"].sum(1).tolist() == [65, 12, 50]
    assert (batch["feats"][1, 12:] == 0).all() and batch["coords"].shape == (3, 65, 2)
    np.testing.assert_array_equal(batch["feats"][2, :50].numpy(), _case_rows(cohort, case_name(3)))
    assert batch["genes"].shape == (3, 3) and batch["y"].tolist() == [0, 0, 1]
    assert batch["case_id"] == [case_name(0), case_name(2), case_name(3)]


def test_dataloader_workers_match_single_process(cohort):
    ds = WindowDataset(cohort, cohort.case_ids, window_len=16, seed=1)
    ds[0]  # open a handle in the main process first: workers must not reuse it
    pickle.loads(pickle.dumps(ds))  # picklable with files open
    kwargs = dict(batch_size=2, collate_fn=collate_bags, shuffle=False)
    single = list(DataLoader(ds, num_workers=0, **kwargs))
    multi = list(DataLoader(ds, num_workers=2, **kwargs))
    assert len(single) == len(multi) == 3
    for a, b in zip(single, multi):
        assert torch.equal(a["feats"], b["feats"]) and torch.equal(a["mask"], b["mask"])
        assert a["case_id"] == b["case_id"]
