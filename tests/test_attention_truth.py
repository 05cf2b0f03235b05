"""Attention against the synthetic cohort's known tumour patches (gimplib.data.synthetic.tumour_masks,
gimplib.metrics.attention_tumour_auc): the check only simulated data allows."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from gimplib.data.synthetic import generate_cohort, tumour_masks
from gimplib.metrics import attention_tumour_auc, attention_tumour_aucs
from gimplib.utils import DataError


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("truth") / "cohort", preset="smoke", seed=0, progress=False,
                           n_patients=8, min_patches=40, max_patches=200)


def test_tumour_masks_match_the_bags_and_the_recorded_facts(cohort):
    meta = json.loads((cohort / "cohort.json").read_text())
    masks = tumour_masks(cohort)
    assert sorted(masks) == sorted(s["slide_id"] for s in meta["slides"])
    for slide in meta["slides"]:
        mask = masks[slide["slide_id"]]
        with h5py.File(cohort / "h5_files" / f"{slide['slide_id']}.h5") as f:
            feats = f["features"][:]
        assert mask.dtype == bool and len(mask) == len(feats)
        assert mask.mean() == pytest.approx(slide["tumour_fraction"], abs=1e-6)
    # the truth is in the features: tumour patches sit apart from the rest (their own prototypes)
    sid, mask = max(masks.items(), key=lambda kv: min(kv[1].sum(), (~kv[1]).sum()))
    with h5py.File(cohort / "h5_files" / f"{sid}.h5") as f:
        feats = f["features"][:]
    centre = feats[mask].mean(0)
    dist = np.linalg.norm(feats - centre, axis=1)
    assert attention_tumour_auc(-dist, mask) > 0.9, "tumour patches are not the ones near the tumour centre"
    assert tumour_masks(cohort, [sid])[sid].tolist() == mask.tolist()


def test_tumour_masks_errors_name_the_problem(cohort, tmp_path):
    with pytest.raises(DataError, match="no slide"):
        tumour_masks(cohort, ["TCGA-XX-NOPE-01Z-00-DX1"])
    with pytest.raises(DataError, match="no cohort.json"):
        tumour_masks(tmp_path)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "cohort.json").write_text(json.dumps({"generator": "someone else"}))
    with pytest.raises(DataError, match="not written by gimplib.data.synthetic"):
        tumour_masks(fake)
    meta = json.loads((cohort / "cohort.json").read_text())
    meta["slides"][0]["tumour_fraction"] = 0.999
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cohort.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="disagrees"):
        tumour_masks(bad, [meta["slides"][0]["slide_id"]])


def test_attention_tumour_auc_by_hand():
    tumour = np.array([0, 0, 1, 1, 0], dtype=bool)
    assert attention_tumour_auc(np.array([0.1, 0.2, 0.9, 0.8, 0.3]), tumour) == 1.0
    assert attention_tumour_auc(np.array([0.9, 0.8, 0.1, 0.2, 0.7]), tumour) == 0.0
    # one of the six tumour / other pairs out of order: 5 / 6
    assert attention_tumour_auc(np.array([0.1, 0.85, 0.9, 0.8, 0.3]), tumour) == pytest.approx(5 / 6)
    assert np.isnan(attention_tumour_auc(np.ones(3), np.ones(3, dtype=bool)))
    rows = attention_tumour_aucs({"a": np.array([0.1, 0.9]), "b": np.array([0.9, 0.1])},
                                 {"a": np.array([False, True]), "b": np.array([False, True]), "c": np.array([True])})
    assert [(r["slide_id"], r["auc"], r["n_patches"], r["tumour_fraction"]) for r in rows] == [
        ("a", 1.0, 2, 0.5), ("b", 0.0, 2, 0.5)]


def test_attention_tumour_auc_bad_input():
    with pytest.raises(ValueError, match="slide X: attention"):
        attention_tumour_auc(np.ones(3), np.ones(4, dtype=bool), slide="slide X")
    with pytest.raises(ValueError, match="NaN"):
        attention_tumour_auc(np.array([np.nan, 1.0]), np.array([True, False]))
    with pytest.raises(KeyError, match="no tumour mask"):
        attention_tumour_aucs({"z": np.ones(2)}, {})
