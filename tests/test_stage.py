"""The Stage: one cohort and one split per workdir, recorded in workdir/cohort.json; run folders
named by their settings; the one split rule (decide_split) that the notebooks and gimp-train share."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gimplib.book.params import NOTEBOOK_PARAMETERS, check_notebook_parameters
from gimplib.book.stage import SPLIT_FILE, SYNTHETIC_COHORT, WSI_COHORT, Stage, run_name
from gimplib.data import load_cohort
from gimplib.data.splits import decide_split, kfold_splits, train_val_test_split, write_clam_split
from gimplib.data.synthetic import generate_cohort
from gimplib.utils import DataError, load_json, save_json


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    """A smoke synthetic cohort folder (24 patients) to copy as a 'real' data_dir."""
    return generate_cohort(tmp_path_factory.mktemp("stage") / "smoke", preset="smoke", seed=0, progress=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_first_stage_records_cohort_and_split_and_later_stages_read_them(tmp_path, capsys):
    work = tmp_path / "work"
    first = Stage.open("03_mpm", work, profile="smoke", device="cpu")
    record = load_json(work / "cohort.json")
    assert record["cohort_dir"] == str(SYNTHETIC_COHORT) and record["kind"] == "synthetic"
    assert record["profile"] == "smoke" and record["data_seed"] == 0 and record["recorded_by"] == "03_mpm"
    assert record["split"] == {"kind": "seeded", "seed": 0, "sizes": [567, 189, 190]}
    assert load_json(work / SPLIT_FILE) == first.split
    assert first.split == train_val_test_split(first.cohort, seed=0)
    assert first.dir == work / "03_mpm" and first.fig_dir.is_dir() and first.device == "cpu"
    assert first.path("04_pretrain", "gimp") == work / "04_pretrain" / "gimp"
    assert "seeded split (seed 0" in capsys.readouterr().out

    later = Stage.open("05_finetune", work, profile="smoke", seed=3, device="cpu")
    assert later.cohort_dir.resolve() == first.cohort_dir.resolve() and later.split == first.split
    assert later.seed == 3 and later.data_seed == 0
    assert load_json(work / "cohort.json")["recorded_by"] == "03_mpm", "a later stage must not rewrite the record"


def test_a_different_data_dir_is_refused_naming_both_unless_overwrite(tmp_path, smoke_dir):
    work = tmp_path / "work"
    Stage.open("01_data", work, profile="smoke", quiet=True)
    other = _copy(smoke_dir, tmp_path / "other")
    with pytest.raises(DataError) as err:
        Stage.open("02_genes", work, data_dir=other, quiet=True)
    message = str(err.value)
    assert str(other) in message and str(SYNTHETIC_COHORT) in message and "overwrite=True" in message
    with pytest.raises(DataError, match="profile='demo'.*records.*profile='smoke'"):
        Stage.open("02_genes", work, profile="demo", quiet=True)
    with pytest.raises(DataError, match="data_seed=1.*records data_seed=0"):
        Stage.open("02_genes", work, profile="smoke", data_seed=1, quiet=True)

    replaced = Stage.open("03_mpm", work, profile="smoke", data_seed=1, overwrite=True, quiet=True)
    assert load_json(work / "cohort.json")["data_seed"] == 1, "overwrite records the other synthetic cohort"
    assert load_json(replaced.cohort_dir / "cohort.json")["seed"] == 1 and replaced.split_source["seed"] == 1

    stage = Stage.open("02_genes", work, data_dir=other, overwrite=True, quiet=True)
    record = load_json(work / "cohort.json")
    assert Path(record["cohort_dir"]) == other.resolve() and record["kind"] == "data_dir"
    assert stage.cohort_dir == other
    # data_dir=None now means the recorded folder, not the synthetic cohort
    again = Stage.open("04_pretrain", work, quiet=True)
    assert again.cohort_dir.resolve() == other.resolve() and again.split == stage.split


def test_split_from_the_cohorts_clam_file_beats_the_seeded_one(tmp_path, smoke_dir):
    data = _copy(smoke_dir, tmp_path / "data")
    cohort = load_cohort(data, verbose=False)
    seeded = train_val_test_split(cohort, seed=0)
    # a split no seed would draw: the seeded test and val parts swapped
    clam = {"train": seeded["train"], "val": seeded["test"], "test": seeded["val"]}
    write_clam_split(data / "splits" / "splits_0.csv", clam, cohort)

    stage = Stage.open("01_data", tmp_path / "work", data_dir=data, quiet=True)
    assert stage.split == clam
    assert stage.split_source == {"kind": "clam_file", "file": str(data / "splits" / "splits_0.csv")}
    assert load_json(tmp_path / "work" / "cohort.json")["split"]["kind"] == "clam_file"
    # a stage that loads the genes alone (no slides table) maps the file's slide ids all the same
    genes_first = Stage.open("02_genes", tmp_path / "work3", data_dir=data, require=["genes"], quiet=True)
    assert not genes_first.cohort.has_slides and genes_first.split == clam

    plain = _copy(smoke_dir, tmp_path / "plain")
    stage = Stage.open("01_data", tmp_path / "work2", data_dir=plain, data_seed=5, quiet=True)
    assert stage.split == train_val_test_split(stage.cohort, seed=5) and stage.split_source["kind"] == "seeded"


def test_decide_split_order_of_sources(tmp_path, smoke_dir):
    data = _copy(smoke_dir, tmp_path / "data")
    cohort = load_cohort(data, verbose=False)
    folds = kfold_splits(cohort, k=3, seed=2)
    write_clam_split(data / "splits" / "splits_0.csv", folds[0], cohort)
    explicit = write_clam_split(tmp_path / "mine.csv", folds[1], cohort)
    assert decide_split(cohort, cohort_dir=data)[0] == folds[0]
    assert decide_split(cohort, cohort_dir=data, clam_split=explicit)[0] == folds[1]
    split, source = decide_split(cohort, cohort_dir=data, fold=2, k=3, seed=2)
    assert split == folds[2] and source == {"kind": "fold", "fold": 2, "k": 3, "seed": 2}
    assert decide_split(cohort, seed=4, sizes=(1, 1, 1))[0] == train_val_test_split(cohort, seed=4, sizes=(1, 1, 1))
    with pytest.raises(ValueError, match="fold 3 out of range: 3 folds"):
        decide_split(cohort, fold=3, k=3)


def test_overwrite_in_stage_01_decides_the_split_again(tmp_path, smoke_dir):
    data = _copy(smoke_dir, tmp_path / "data")
    work = tmp_path / "work"
    Stage.open("01_data", work, data_dir=data, quiet=True)
    save_json(work / SPLIT_FILE, {"train": [], "val": [], "test": []})  # stale
    assert Stage.open("03_mpm", work, quiet=True).split["train"] == [], "without overwrite the stored split is read"
    assert Stage.open("03_mpm", work, overwrite=True, quiet=True).split["train"] == [], "only stage 01 re-splits"
    assert len(Stage.open("01_data", work, overwrite=True, quiet=True).split["train"]) > 0


def test_a_workdir_from_before_the_record_reuses_its_split(tmp_path, smoke_dir):
    data = _copy(smoke_dir, tmp_path / "data")
    work = tmp_path / "work"
    cohort = load_cohort(data, verbose=False)
    old = train_val_test_split(cohort, seed=7)
    save_json(work / SPLIT_FILE, old)
    stage = Stage.open("02_genes", work, data_dir=data, quiet=True)
    assert stage.split == old and stage.split_source == {"kind": "reused", "file": str(SPLIT_FILE)}
    assert "reused 01_data/split.json" in stage.summary()


def test_stage_01_tiled_cohort_is_recorded_and_read_by_later_stages(tmp_path, smoke_dir):
    """What notebook 01 does with slides_dir: it writes workdir/01_data/wsi_cohort and opens itself
    on it; stage 02, given no data_dir, reads that cohort, not the synthetic one."""
    work = tmp_path / "work"
    tiled = _copy(smoke_dir, work / WSI_COHORT)
    Stage.open("01_data", work, data_dir=tiled, quiet=True)
    record = load_json(work / "cohort.json")
    assert record["kind"] == "slides" and record["cohort_dir"] == str(WSI_COHORT)
    later = Stage.open("02_genes", work, require=["genes"], quiet=True)
    assert later.cohort_kind == "slides" and later.cohort_dir.resolve() == tiled.resolve()
    assert not (work / SYNTHETIC_COHORT).exists(), "no synthetic cohort may be generated"


def test_recorded_cohort_that_is_gone_is_named(tmp_path, smoke_dir):
    work = tmp_path / "work"
    data = _copy(smoke_dir, tmp_path / "data")
    Stage.open("01_data", work, data_dir=data, quiet=True)
    shutil.rmtree(data)
    with pytest.raises(DataError, match=f"records the cohort {data}, which is gone"):
        Stage.open("02_genes", work, quiet=True)
    with pytest.raises(DataError, match="data_dir not found"):
        Stage.open("02_genes", work, data_dir=tmp_path / "missing", quiet=True)


def test_run_names_say_what_distinguishes_the_run():
    defaults = {"margin": 0.8, "lr": 1e-4, "mining": "all", "sizes": [1, 2]}
    assert run_name("gimp", dict(defaults), defaults) == ("gimp", {})
    assert run_name("gimp", {**defaults, "lr": 0.0001, "sizes": (1, 2)}, defaults)[0] == "gimp"
    name, changed = run_name("gimp", {**defaults, "margin": 0.4}, defaults)
    assert name.startswith("gimp-") and len(name) == len("gimp-") + 6 and changed == {"margin": 0.4}
    assert run_name("gimp", {**defaults, "margin": 0.4}, defaults)[0] == name, "the hash is stable"
    assert run_name("gimp", {**defaults, "margin": 0.5}, defaults)[0] != name
    assert run_name("gimp", defaults, defaults, seed=2) == ("gimp_seed2", {})
    assert run_name("gimp", {**defaults, "margin": 0.4}, defaults, seed=2)[0] == f"{name}_seed2"
    with pytest.raises(ValueError, match=r"no default for setting\(s\) \['typo'\]"):
        run_name("gimp", {"typo": 1}, defaults)


def test_run_dir_compares_with_the_notebooks_declared_defaults(tmp_path, smoke_dir):
    data = _copy(smoke_dir, tmp_path / "data")
    defaults = {"workdir": "workdir", "seed": 0, "device": "auto", "margin": 0.8, "n_show": 1, "num_epochs": 100}
    namespace = {**defaults, "workdir": str(tmp_path), "device": "cpu", "n_show": 3, "num_epochs": "100"}
    check_notebook_parameters(namespace, defaults, "04_pretrain")  # what the hidden cell does
    try:
        stage = Stage.open("04_pretrain", tmp_path / "work", data_dir=data, quiet=True)
        assert stage.run_dir("gimp", ignore=["n_show"]) == stage.dir / "gimp"
        ablation = {**namespace, "margin": 0.4, "num_epochs": 100}
        check_notebook_parameters(ablation, defaults, "04_pretrain")
        other = stage.run_dir("gimp", ignore=["n_show"])
        assert other.parent == stage.dir and other.name.startswith("gimp-")
        index = load_json(stage.dir / "runs.json")
        assert index[other.name] == {"recipe": "gimp", "seed": 0, "changed": {"margin": 0.4}}
        assert stage.run_dir("gimp_no_genes", {"margin": 0.8}) == stage.dir / "gimp_no_genes"
        sweep = Stage.open("04_pretrain", tmp_path / "work", seed=1, quiet=True)
        assert sweep.run_dir("gimp", {"margin": 0.8}) == stage.dir / "gimp_seed1"
    finally:
        NOTEBOOK_PARAMETERS.pop("04_pretrain", None)
    with pytest.raises(ValueError, match="no declared parameters recorded"):
        stage.run_dir("gimp")
    assert stage.run_dir("x", {"a": 2}, defaults={"a": 1}).name.startswith("x-")


# ------------------------------------------------------------------------ notebooks tier
ROOT = Path(__file__).resolve().parents[1]


def _run(stem: str, work: Path, **extra) -> Path:
    """Execute notebooks/<stem>.ipynb with the smoke set plus ``extra``, in ``work``; the executed copy."""
    from gimplib import book

    nb = ROOT / "notebooks" / f"{stem}.ipynb"
    declared = book.declared_parameters(nb)
    params = book.notebook_parameters(book.load_param_set("smoke", ROOT / "notebooks" / "params"), stem, declared=declared)
    params.update(workdir=str(work), **extra)
    out = work.parent / "executed" / f"{stem}_{len(list((work.parent / 'executed').glob('*')))}.ipynb" \
        if (work.parent / "executed").is_dir() else work.parent / "executed" / f"{stem}_0.ipynb"
    try:
        book.execute_notebook(nb, out, params, cwd=work.parent)
    except book.NotebookFailed as err:
        pytest.fail(str(err), pytrace=False)
    return out


def _outputs(path: Path) -> str:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.mark.notebooks
@pytest.mark.timeout(900)
def test_stage_02_reads_the_cohort_stage_01_tiled_from_raw_slides(tmp_path):
    """Notebook 01 with slides_dir tiles eight copies of a pyramidal TIFF (tests/_clam_tiff.py;
    CLAM mode, 512-px patches, a random encoder) into workdir/01_data/wsi_cohort; notebook 02,
    given no data_dir, trains on that cohort's 300 genes, not on the synthetic cohort's 600."""
    import numpy as np
    import pandas as pd

    from _clam_tiff import write_clam_test_tiff

    slides = tmp_path / "slides"
    slides.mkdir()
    image = write_clam_test_tiff(tmp_path / "image.tif")
    rows = []
    for i in range(8):
        case = f"TCGA-XX-{i:04d}"
        (slides / f"{case}-01Z-00-DX1.tif").symlink_to(image)
        rows.append({"case_id": case, "slide_id": f"{case}-01Z-00-DX1", "label": "LUAD" if i % 2 else "LUSC"})
    pd.DataFrame(rows).to_csv(tmp_path / "slides.csv", index=False)
    (tmp_path / "preset.csv").write_text("a_t,a_h\n4,1\n")  # CLAM's tcga preset drops regions this small
    rng = np.random.default_rng(0)
    genes = pd.DataFrame(rng.gamma(2.0, 2.0, size=(8, 300)), columns=[f"G{j}" for j in range(300)],
                         index=pd.Index([r["case_id"] for r in rows], name="case_id"))
    genes.iloc[1::2, :20] *= 4  # some signal for the LUAD cases
    genes.to_csv(tmp_path / "genes.csv")

    work = tmp_path / "work"
    _run("01_data", work, slides_dir=str(slides), slides_csv=str(tmp_path / "slides.csv"),
         gene_file=str(tmp_path / "genes.csv"), clam_preset=str(tmp_path / "preset.csv"), patch_size=512,
         feature_weights="random",
         split_sizes=[2, 1, 1], n_folds=0)
    record = load_json(work / "cohort.json")
    assert record["kind"] == "slides" and record["cohort_dir"] == str(WSI_COHORT)
    assert not (work / SYNTHETIC_COHORT).exists()

    executed = _run("02_genes", work, compare=False)
    assert load_json(work / "02_genes" / "metrics.json")["n_genes"] == 300
    assert "01_data/wsi_cohort (slides, 8 cases)" in _outputs(executed)
    assert not (work / SYNTHETIC_COHORT).exists(), "stage 02 fell back to the synthetic cohort"


@pytest.mark.notebooks
@pytest.mark.timeout(900)
def test_a_seed_sweep_and_an_ablation_in_one_workdir_keep_every_run(tmp_path):
    """papermill with -p seed 1 after seed 0, then -p mask_ratio 0.25 -p overwrite true (03): all
    three succeed in one workdir and every run keeps its own folder; the first is not touched."""
    work = tmp_path / "work"
    _run("03_mpm", work, num_epochs=1)
    (first,) = [p for p in (work / "03_mpm").iterdir() if (p / "checkpoint.pt").is_file()]
    stamp = (first / "checkpoint.pt").stat().st_mtime_ns
    _run("03_mpm", work, num_epochs=1, seed=1)
    assert (work / "03_mpm" / f"{first.name}_seed1" / "checkpoint.pt").is_file()
    _run("03_mpm", work, num_epochs=1, mask_ratio=0.25, overwrite=True)
    runs = [p for p in (work / "03_mpm").iterdir() if (p / "checkpoint.pt").is_file()]
    assert len(runs) == 3 and (first / "checkpoint.pt").stat().st_mtime_ns == stamp, "the ablation touched the first run"
    index = load_json(work / "03_mpm" / "runs.json")
    (ablation,) = [p.name for p in runs if p != first and not p.name.endswith("_seed1")]
    changed = index[ablation]["changed"]
    assert {k: v for k, v in changed.items() if index[first.name]["changed"].get(k) != v} == {"mask_ratio": 0.25}
    assert load_json(work / "03_mpm" / "metrics.json")["run"] == ablation


def test_gimp_train_takes_its_split_from_the_same_rule(tmp_path, smoke_dir, monkeypatch, capsys):
    """gimp-train reads the cohort's splits/splits_0.csv as the notebooks do (decide_split)."""
    import json

    import gimplib.data.splits as splits
    import gimplib.train.cli as cli
    from gimplib.train.cli import main

    data = _copy(smoke_dir, tmp_path / "data")
    cohort = load_cohort(data, verbose=False)
    seeded = train_val_test_split(cohort, seed=0)
    clam = {"train": seeded["train"], "val": seeded["test"], "test": seeded["val"]}
    write_clam_split(data / "splits" / "splits_0.csv", clam, cohort)
    chosen = []
    real = splits.decide_split
    monkeypatch.setattr(cli, "decide_split", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    rc = main(["genes", "--data-dir", str(data), "--out", str(tmp_path / "run"), "--num-epochs", "1", "--no-progress",
               "--device", "cpu", "--set", "encoder=snn"])
    assert rc == 0, capsys.readouterr().err
    (split, source), = chosen
    assert split == clam and source["kind"] == "clam_file"
    assert json.loads(capsys.readouterr().out)["test_accuracy"] >= 0


def test_the_book_says_which_cohort_the_stages_read():
    from gimplib.book.site import describe_data

    text, synthetic = describe_data({"data_dir": None, "profile": "smoke", "workdir": "/w"},
                                    {"kind": "slides", "cohort_dir": "01_data/wsi_cohort"})
    assert "/w/01_data/wsi_cohort" in text and not synthetic
    text, synthetic = describe_data({"data_dir": None, "profile": "demo", "workdir": "/w"},
                                    {"kind": "synthetic", "profile": "smoke", "data_seed": 2, "cohort_dir": "01_data/cohort"})
    assert synthetic and "profile `smoke`, seed 2" in text
