"""Patient-level splits: train/val/test, k-fold, CLAM split files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gimplib.data import (
    Cohort,
    check_disjoint,
    kfold_splits,
    load_cohort,
    read_clam_split,
    train_val_test_split,
    write_clam_split,
)
from gimplib.utils import DataError

from _data_helpers import case_name, make_cohort, slide_name


def _cohort(n_luad: int, n_lusc: int, slides_per_case: int = 0) -> Cohort:
    """An in-memory cohort (no files), LUAD and LUSC interleaved."""
    labels = ["LUAD"] * n_luad + ["LUSC"] * n_lusc
    rng = np.random.default_rng(0)
    labels = [labels[i] for i in rng.permutation(len(labels))]
    ids = [case_name(i) for i in range(len(labels))]
    cases = pd.DataFrame({"label": labels}, index=pd.Index(ids, name="case_id"))
    cases["y"] = (cases["label"] == "LUSC").astype(np.int64)
    slides = pd.DataFrame(
        [
            {"slide_id": slide_name(c, j), "case_id": c, "path": Path(f"/x/{slide_name(c, j)}.h5"), "n_patches": 10}
            for c in ids
            for j in range(slides_per_case)
        ],
        columns=["slide_id", "case_id", "path", "n_patches"],
    )
    return Cohort(data_dir=None, cases=cases, slides=slides, genes=None, label_names=["LUAD", "LUSC"], feat_dim=8 if slides_per_case else None)


def test_paper_sized_split():
    cohort = _cohort(470, 476)
    split = train_val_test_split(cohort, seed=0)
    assert [len(split[p]) for p in ("train", "val", "test")] == [567, 189, 190]
    assert sorted(sum(split.values(), [])) == sorted(cohort.case_ids)
    check_disjoint(split)
    for part, ids in split.items():  # stratified: each part's LUSC share within one case of 476/946
        n_lusc = cohort.labels_of(ids).sum()
        assert abs(n_lusc - len(ids) * 476 / 946) <= 1, part
    assert train_val_test_split(cohort, seed=0) == split
    assert train_val_test_split(cohort, seed=1)["test"] != split["test"]


def test_split_scales_sizes_to_small_cohorts():
    cohort = _cohort(10, 9)
    split = train_val_test_split(cohort, seed=3)
    assert [len(split[p]) for p in ("train", "val", "test")] == [11, 4, 4]  # 19 * (0.6, 0.2, 0.2)
    for ids in split.values():
        assert set(cohort.labels_of(ids)) == {0, 1}  # both classes in every part
    custom = train_val_test_split(cohort, sizes=(0.5, 0.0, 0.5))
    assert len(custom["val"]) == 0 and len(custom["train"]) + len(custom["test"]) == 19


def test_kfold():
    cohort = _cohort(23, 27)
    folds = kfold_splits(cohort, k=5, seed=0, val_fraction=0.1)
    assert len(folds) == 5
    tests = [c for f in folds for c in f["test"]]
    assert sorted(tests) == sorted(cohort.case_ids)  # every case tested exactly once
    for f in folds:
        check_disjoint(f)
        assert len(f["test"]) == 10 and len(f["val"]) == 5 and len(f["train"]) == 35
        assert abs(cohort.labels_of(f["test"]).sum() - 27 / 5) <= 1  # stratified
    assert kfold_splits(cohort, k=5, seed=0) == folds
    assert kfold_splits(cohort, k=5, seed=1) != folds
    assert all(f["val"] == [] for f in kfold_splits(cohort, k=3, val_fraction=0.0))
    with pytest.raises(ValueError, match="k must be"):
        kfold_splits(cohort, k=1)


def test_check_disjoint_names_the_patient():
    with pytest.raises(DataError, match=r"patient 'TCGA-10-1000' is in both 'train' and 'test'"):
        check_disjoint({"train": ["TCGA-10-1000", "TCGA-11-1001"], "val": [], "test": ["TCGA-10-1000"]})


def test_clam_split_round_trip_keeps_patients_together(tmp_path):
    cohort = _cohort(6, 6, slides_per_case=2)
    split = train_val_test_split(cohort, seed=0)
    path = write_clam_split(tmp_path / "splits" / "splits_0.csv", split, cohort)
    raw = pd.read_csv(path)
    assert list(raw.columns) == ["Unnamed: 0", "train", "val", "test"]  # CLAM's layout, index included
    assert raw["test"].isna().sum() > 0  # ragged: padded with empty cells
    assert raw["train"].notna().sum() == 2 * len(split["train"])  # every slide of a case
    assert read_clam_split(path, cohort) == split


def test_clam_split_errors(tmp_path):
    cohort = _cohort(3, 3, slides_per_case=1)
    s = [slide_name(c) for c in cohort.case_ids]
    unknown = tmp_path / "splits_1.csv"
    pd.DataFrame({"train": [s[0], s[1], "TCGA-99-9999-01Z-00-DX1"], "val": [s[2], None, None], "test": [s[3], None, None]}).to_csv(unknown)
    with pytest.raises(DataError, match=r"splits_1\.csv: train names slide 'TCGA-99-9999-01Z-00-DX1', which is not in the cohort"):
        read_clam_split(unknown, cohort)
    skipped = read_clam_split(unknown, cohort, allow_missing=True)
    assert skipped["train"] == cohort.case_ids[:2]

    cohort2 = _cohort(3, 3, slides_per_case=2)
    a, b = slide_name(cohort2.case_ids[0], 0), slide_name(cohort2.case_ids[0], 1)  # one patient's two slides
    twice = tmp_path / "splits_2.csv"
    pd.DataFrame({"train": [a], "val": [slide_name(cohort2.case_ids[1])], "test": [b]}).to_csv(twice)
    with pytest.raises(DataError, match=rf"splits_2\.csv: patient '{cohort2.case_ids[0]}' is in both 'train' and 'test'"):
        read_clam_split(twice, cohort2)
    pd.DataFrame({"train": [a], "validation": [b]}).to_csv(tmp_path / "cols.csv")
    with pytest.raises(DataError, match=r"cols\.csv: no column\(s\) \['val', 'test'\]"):
        read_clam_split(tmp_path / "cols.csv", cohort2)


def test_genes_only_cohort_splits_by_case_id(tmp_path):
    cohort = load_cohort(make_cohort(tmp_path / "g", n_cases=8, slides=False), verbose=False)
    split = train_val_test_split(cohort, seed=0)
    path = write_clam_split(tmp_path / "s.csv", split, cohort)
    assert read_clam_split(path, cohort) == split
