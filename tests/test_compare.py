"""The comparison sweep (gimplib.train.compare): rows, recipes, runs in parallel, tables from files."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time

import pytest

from gimplib.models.baselines import BASELINES
from gimplib.train.compare import (
    PAPER_TCGA,
    RECIPES,
    ROWS,
    Job,
    SweepConfig,
    read_runs,
    render_table,
    run_sweep,
    unavailable,
)
from gimplib.utils import load_json

# the smallest settings that still run every stage
TINY = SweepConfig(max_patches=64, window_len=64, embed_dim=16, num_heads=2, num_landmarks=8, decoder_hidden=16,
                   gene_embed_dim=16, fragment_size=64, num_groups=4, gene_epochs=1, pretrain_epochs=1,
                   finetune_epochs=1, pretrain_batch_size=4, lr=1e-3, baseline_lr=3e-4, device="cpu")


def test_every_row_has_a_runnable_recipe():
    assert {r.table for r in ROWS} == {"table1", "table2"}
    for table in ("table1", "table2"):
        labels = [r.label for r in ROWS if r.table == table]
        assert len(labels) == len(set(labels))
    assert {r.recipe for r in ROWS} == set(RECIPES)
    for recipe, (kind, opt) in RECIPES.items():
        assert kind in {"baseline", "fusion", "gimp", "pretrain_baseline"}
        assert unavailable(recipe) is None
        if "name" in opt:
            assert opt["name"] in BASELINES
    # Table 1's GiMP and Table 2's full model are one system with one set of runs
    assert {r.recipe for r in ROWS if r.label in ("GiMP", "all (GroupMSA + MPM + triplet)")} == {"gimp"}
    assert set(PAPER_TCGA) <= {(r.table, r.label) for r in ROWS}
    assert "unknown recipe 'abmill'" in unavailable("abmill")


def test_job_folders(tmp_path):
    assert Job("gimp", 3).out_dir(tmp_path) == tmp_path / "gimp" / "seed_3"
    assert Job("gimp", 3, fold=1).out_dir(tmp_path) == tmp_path / "gimp" / "fold_1" / "seed_3"


def test_sweep_in_two_processes_matches_one_and_tables_come_from_the_files(smoke, tmp_path):
    cohort, split = smoke
    recipes = ["abmil", "fusion_snn", "pre_snn_tri"]
    par = run_sweep(cohort, split, recipes, [0], out_root=tmp_path / "par", config=TINY, n_jobs=2)
    seq = run_sweep(cohort, split, recipes, [0], out_root=tmp_path / "seq", config=TINY, n_jobs=1)
    assert list(par) == list(seq) == [Job(r, 0) for r in recipes]
    for job in par:  # every job seeds itself: the number of processes changes nothing
        assert load_json(par[job] / "metrics.json") == load_json(seq[job] / "metrics.json")
    # the published systems train at baseline_lr, GiMP's rows at lr
    assert load_json(par[Job("abmil", 0)] / "config.json")["lr"] == 3e-4
    assert load_json(par[Job("pre_snn_tri", 0)] / "config.json")["lr"] == 1e-3
    assert (tmp_path / "par" / "genes_snn" / "seed_0" / "best.pt").is_file()  # trained once, before the jobs

    runs = read_runs(par)
    table = render_table(runs, "table1", ours="ours, synthetic")
    m = load_json(par[Job("abmil", 0)] / "metrics.json")
    assert table.loc[("pathology only", "ABMIL"), "accuracy (ours, synthetic)"] == f"{m['test_accuracy']:.3f}"
    assert table.loc[("pathology only", "ABMIL"), "AUC (ours, synthetic)"] == f"{m['test_auc']:.3f}"
    assert table.loc[("pathology only", "DSMIL"), "accuracy (ours, synthetic)"] == "not run"
    assert table.loc[("pre-training", "GiMP"), "accuracy (paper, TCGA)"] == 0.9947
    ablation = render_table(runs, "table2")
    assert ablation.loc[("ablation", "aggregator + SNN"), "runs"] == 1
    with pytest.raises(ValueError, match="unknown table 'table3'"):
        render_table(runs, "table3")

    # finished runs are reused, not retrained
    stamp = (par[Job("abmil", 0)] / "metrics.json").stat().st_mtime_ns
    again = run_sweep(cohort, split, recipes, [0], out_root=tmp_path / "par", config=TINY, n_jobs=1)
    assert again == par and (par[Job("abmil", 0)] / "metrics.json").stat().st_mtime_ns == stamp


def test_sweep_over_folds_and_seeds_gives_mean_and_sd(smoke, tmp_path):
    from gimplib.data import kfold_splits

    cohort, _ = smoke
    folds = kfold_splits(cohort, k=2, seed=0)
    done = run_sweep(cohort, folds, ["abmil"], [0, 1], out_root=tmp_path, config=TINY)
    assert list(done) == [Job("abmil", s, f) for f in (0, 1) for s in (0, 1)]  # recipe, fold, seed order
    assert (tmp_path / "abmil" / "fold_1" / "seed_0" / "metrics.json").is_file()
    runs = read_runs(done)
    assert sorted(runs["fold"]) == [0, 0, 1, 1]
    cell = render_table(runs, "table1").loc[("pathology only", "ABMIL"), "accuracy (ours)"]
    mean, sd = runs["accuracy"].mean(), runs["accuracy"].std(ddof=1)
    assert cell == f"{mean:.3f} ± {sd:.3f}"


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_a_failing_run_is_named(smoke, tmp_path, n_jobs):
    cohort, split = smoke
    bad = dataclasses.replace(TINY, input="windows")
    with pytest.raises(RuntimeError, match=r"recipe '(abmil|clam_sb)' \(seed 0\) failed: ValueError: input must be 'bag' or 'window'"):
        run_sweep(cohort, split, ["abmil", "clam_sb"], [0], out_root=tmp_path, config=bad, n_jobs=n_jobs)
    # no worker is left running (and writing) after the error
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


def test_sweep_refuses_bad_arguments(smoke, tmp_path):
    cohort, split = smoke
    with pytest.raises(ValueError, match="recipe 'nope' cannot run: unknown recipe"):
        run_sweep(cohort, split, ["nope"], [0], out_root=tmp_path, config=TINY)
    with pytest.raises(ValueError, match="n_jobs must be >= 1"):
        run_sweep(cohort, split, ["abmil"], [0], out_root=tmp_path, config=TINY, n_jobs=0)
    assert not any(tmp_path.iterdir())  # refused before anything was written
