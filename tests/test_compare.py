"""The comparison sweep (gimplib.train.compare): rows, recipes, runs in parallel, tables from files."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time

import pytest

from gimplib.models.baselines import BLOCKS, SYSTEMS
from gimplib.train.compare import (
    PAPER_TCGA,
    RECIPES,
    ROWS,
    Job,
    SweepConfig,
    read_runs,
    recipe_facts,
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
    for recipe, (trainer, opt) in RECIPES.items():
        assert trainer in {"train_baseline", "finetune", "pretrain_baseline", "pretrain_gimp"}
        assert unavailable(recipe) is None
        if "name" in opt:  # a registered system's recipe, trained by the task its record names
            assert recipe in SYSTEMS[opt["name"]].recipes and trainer == SYSTEMS[opt["name"]].trainer
    # Table 1's GiMP and Table 2's full model are one system with one set of runs
    assert {r.recipe for r in ROWS if r.label in ("GiMP", "aggregator + GroupMSA + triplet + MPM (GiMP)")} == {"gimp"}
    assert set(PAPER_TCGA) == {(r.table, r.label) for r in ROWS}  # the paper's figure beside every row
    assert "unknown recipe 'abmill'" in unavailable("abmill")


# The paper's 14 + 6 rows (Jin et al. 2023, Tables 1 and 2; PAPER_FACTS.md), written out by hand:
# (table, block, label, accuracy, gene encoder, pre-training, MPM, triplet source, fine-tuning inputs)
PAPER_ROWS = [
    ("table1", "pathology, no pre-training", "ABMIL", 0.7737, None, None, False, None, "image"),
    ("table1", "pathology, no pre-training", "DSMIL", 0.7566, None, None, False, None, "image"),
    ("table1", "pathology, no pre-training", "CLAM-SB", 0.8519, None, None, False, None, "image"),
    ("table1", "pathology, no pre-training", "CLAM-MB", 0.8889, None, None, False, None, "image"),
    ("table1", "pathology, no pre-training", "TransMIL", 0.8836, None, None, False, None, "image"),
    ("table1", "pathology, no pre-training", "GiMP w/o GroupMSA", 0.8995, None, None, False, None, "image"),
    ("table1", "pathology + genomic, no pre-training", "PORPOISE", 0.9524, "porpoise", None, False, None, "image+genes"),
    ("table1", "pathology + genomic, no pre-training", "Pathomic Fusion", 0.9684, "pathomic", None, False, None,
     "image+genes"),
    ("table1", "pathology + genomic, no pre-training", "MCAT", 0.9632, "mcat", None, False, None, "image+genes"),
    ("table1", "pathology + genomic, no pre-training", "GiMP w/o pre-training", 0.9737, "groupmsa", None, False, None,
     "image+genes"),
    ("table1", "pathology + genomic, pre-training", "MGCA", 0.9105, "groupmsa", "mgca", False, None, "image+genes"),
    ("table1", "pathology + genomic, pre-training", "BioViL", 0.9316, "groupmsa", "biovil", False, None, "image+genes"),
    ("table1", "pathology + genomic, pre-training", "REFERS", 0.9368, "groupmsa", "refers", False, None, "image+genes"),
    ("table1", "pathology + genomic, pre-training", "GiMP", 0.9947, "groupmsa", "gimp", True, "image+genes",
     "image+genes"),
    ("table2", "ablation", "aggregator + SNN", 0.9684, "snn", None, False, None, "image+genes"),
    ("table2", "ablation", "aggregator + GroupMSA", 0.9737, "groupmsa", None, False, None, "image+genes"),
    ("table2", "ablation", "aggregator + MPM", 0.9579, None, "gimp", True, None, "image"),
    ("table2", "ablation", "aggregator + triplet", 0.9263, None, "gimp", False, "image", "image"),
    ("table2", "ablation", "aggregator + GroupMSA + triplet", 0.9526, "groupmsa", "gimp", False, "image+genes",
     "image+genes"),
    ("table2", "ablation", "aggregator + GroupMSA + triplet + MPM (GiMP)", 0.9974, "groupmsa", "gimp", True,
     "image+genes", "image+genes"),
]


def test_rows_are_the_papers_rows_and_each_recipe_trains_what_the_row_says():
    ours = [r for r in ROWS if not r.ours]
    assert len([r for r in ours if r.table == "table1"]) == 14 and len([r for r in ours if r.table == "table2"]) == 6
    assert [(r.table, r.group, r.label, r.paper_accuracy) for r in ours] == [row[:4] for row in PAPER_ROWS]
    for row, (*_, gene, pre, mpm, triplet, inputs) in zip(ours, PAPER_ROWS):
        facts = recipe_facts(row.recipe)
        assert (facts["gene_encoder"], facts["pretraining"], facts["mpm"], facts["triplet"],
                facts["finetune_inputs"]) == (gene, pre, mpm, triplet, inputs), row.label
    assert PAPER_TCGA[("table1", "GiMP")] == {"accuracy": 0.9947}


def test_recipes_and_table_blocks_are_read_off_the_registry():
    for name, system in SYSTEMS.items():
        for recipe in system.recipes:
            assert RECIPES[recipe].options["name"] == name
            for row in (r for r in ROWS if r.recipe == recipe and r.table == "table1"):
                assert row.group == BLOCKS[system.block], (name, row.label)
    # the sweep's widths come from the records: at the paper's scale, the official architectures
    paper = SweepConfig()
    assert paper.baseline_kwargs("mcat") == dict(embed_dim=256, num_heads=8)
    assert paper.baseline_kwargs("porpoise") == dict(embed_dim=512, scale=8)
    assert paper.baseline_kwargs("dsmil") == {}
    assert paper.baseline_kwargs("biovil") == paper.aggregator()


def test_job_folders(tmp_path):
    assert Job("gimp", 3).out_dir(tmp_path) == tmp_path / "gimp" / "seed_3"
    assert Job("gimp", 3, fold=1).out_dir(tmp_path) == tmp_path / "gimp" / "fold_1" / "seed_3"


def test_sweep_in_two_processes_matches_one_and_tables_come_from_the_files(smoke, tmp_path):
    cohort, split = smoke
    recipes = ["abmil", "fusion_snn", "pre_groupmsa_tri"]
    par = run_sweep(cohort, split, recipes, [0], out_root=tmp_path / "par", config=TINY, n_jobs=2)
    seq = run_sweep(cohort, split, recipes, [0], out_root=tmp_path / "seq", config=TINY, n_jobs=1)
    assert list(par) == list(seq) == [Job(r, 0) for r in recipes]
    for job in par:  # every job seeds itself: the number of processes changes nothing
        assert load_json(par[job] / "metrics.json") == load_json(seq[job] / "metrics.json")
    # the published systems train at baseline_lr, GiMP's rows at lr
    assert load_json(par[Job("abmil", 0)] / "config.json")["lr"] == 3e-4
    ft = load_json(par[Job("pre_groupmsa_tri", 0)] / "config.json")
    assert ft["lr"] == 1e-3 and ft["gene_encoder"]["encoder"] == "groupmsa"  # fine-tuned on image + genes
    assert (tmp_path / "par" / "genes_groupmsa" / "seed_0" / "best.pt").is_file()  # trained once, before the jobs

    runs = read_runs(par)
    table = render_table(runs, "table1", ours="ours, synthetic")
    m = load_json(par[Job("abmil", 0)] / "metrics.json")
    path = "pathology, no pre-training"
    assert table.loc[(path, "ABMIL"), "accuracy (ours, synthetic)"] == f"{m['test_accuracy']:.3f}"
    assert table.loc[(path, "ABMIL"), "AUC (ours, synthetic)"] == f"{m['test_auc']:.3f}"
    assert table.loc[(path, "DSMIL"), "accuracy (ours, synthetic)"] == "not run"
    assert table.loc[(path, "ABMIL"), "accuracy (paper, TCGA)"] == "0.7737"
    assert table.loc[("pathology + genomic, pre-training", "GiMP"), "accuracy (paper, TCGA)"] == "0.9947"
    assert table.loc[("pathology + genomic, pre-training", "GiMP"), "inputs"] == "image+genes"
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
    cell = render_table(runs, "table1").loc[("pathology, no pre-training", "ABMIL"), "accuracy (ours)"]
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


def test_paper_claims_verdicts_follow_the_numbers():
    import pandas as pd

    from gimplib.train.compare import paper_claims

    acc = {"abmil": [0.70, 0.72, 0.74], "dsmil": [0.70] * 3, "clam_sb": [0.7] * 3, "clam_mb": [0.7] * 3,
           "transmil": [0.80, 0.80, 0.80], "aggregator": [0.90, 0.91, 0.89],  # beats the MIL rows by 0.10
           "porpoise": [0.85] * 3, "pathomic": [0.86] * 3, "mcat": [0.86] * 3, "fusion_groupmsa": [0.88] * 3,
           "fusion_snn": [0.875, 0.885, 0.88],  # 0.005 behind GroupMSA: less than one of 40 patients
           "mgca": [0.80] * 3, "biovil": [0.95] * 3, "refers": [0.80] * 3, "gimp": [0.90, 0.90, 0.90],
           "pre_groupmsa_tri": [0.90] * 3, "pre_mpm": [0.70] * 3, "pre_tri": [0.70] * 3}
    runs = pd.DataFrame([dict(recipe=r, seed=s, fold=None, accuracy=a, auc=a, run="")
                         for r, values in acc.items() for s, a in enumerate(values)])
    sep = {"GiMP": dict(silhouette=0.3, knn_accuracy=0.9), "GiMP w/o genes": dict(silhouette=0.1, knn_accuracy=0.8),
           "BioViL-style": dict(silhouette=0.2, knn_accuracy=0.95)}
    claims = paper_claims(runs, n_test=40, separability=sep)
    claims.index = claims["claim"].str.split(".").str[0]
    verdict = claims["verdict"].to_dict()
    assert verdict["1"] == "holds"  # 0.900 vs best MIL 0.800
    assert verdict["2a"] == "does not hold"  # weakest fusion 0.85 vs best image-only 0.90
    assert verdict["2b"] == "cannot tell at this size"  # 0.005 < 1/40
    assert verdict["3a"] == "cannot tell at this size"  # 0.02 < one patient of 40 (0.025)
    assert verdict["3b"] == "does not hold"  # BioViL-style 0.95
    assert verdict["4a"] == "cannot tell at this size"
    assert verdict["4b"] == "holds"
    assert verdict["5"] == "mixed (no clear ranking)"  # best silhouette, not the best kNN
    assert claims.loc["1", "paper"] == "0.8995 vs 0.8889"  # the paper: aggregator vs its best MIL row (CLAM-MB)
    assert "Transmil" not in claims.loc["1", "ours"] and "TransMIL 0.800" in claims.loc["1", "ours"]
    assert (paper_claims(runs.iloc[:0], n_test=40)["verdict"] == "not run").all()


@pytest.mark.parametrize("recipe", [r for system in SYSTEMS.values() for r in system.recipes])
def test_every_registered_systems_recipe_trains_and_reloads(smoke, tmp_path, recipe):
    from gimplib.train import load_model
    from gimplib.train.compare import run_recipe

    cohort, split = smoke
    out = run_recipe(Job(recipe, 0), cohort, split, out_root=tmp_path, config=TINY)
    metrics = load_json(out / "metrics.json")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    system = SYSTEMS[RECIPES[recipe].options["name"]]
    if system.block == "pretraining":  # pre-trained, then fine-tuned on image + genes like GiMP
        assert type(load_model(out / "pretrain" / "checkpoint.pt")) is system.constructor
        assert load_model(out / "best.pt").uses_genes
    else:
        assert type(load_model(out / "best.pt")) is system.constructor
