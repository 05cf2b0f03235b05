"""Bad inputs, each through the entry point a user types: the book runner, papermill, and the
command-line tools (gimp-train, gimp-synth, gimp-extract, python -m gimplib.bench).

Each test is one kind of bad input; it checks the exit status and that the message names the
file, case, slide or parameter at fault and what to type instead. The silent-wrong and
data-loss kinds come first (issue 12). The table in book/running.md lists them all.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from gimplib.data.bags import read_bag, write_bag

ROOT = Path(__file__).resolve().parents[1]
GENES = ["genes", "--num-epochs", "1", "--no-progress", "--set", "n_boot=0", "--set", "encoder_kwargs.fragment_size=32"]
ABMIL = ["baseline", "--name", "abmil", "--num-epochs", "1", "--no-progress", "--set", "n_boot=0"]
TINY_GIMP = ["--set", "model_kwargs.embed_dim=32", "--set", "model_kwargs.depth=1", "--set", "model_kwargs.num_heads=2",
             "--set", "model_kwargs.num_landmarks=8", "--set", "window_len=16", "--batch-size", "2"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 12-patient synthetic cohort with 16-32 patches per slide and 120 genes."""
    from gimplib.data.synthetic import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("tiny") / "cohort", preset="smoke", n_patients=12,
                           min_patches=16, max_patches=32, n_genes=120, n_modules=4, progress=False)


def copy_of(tiny: Path, tmp_path: Path, name: str = "cohort") -> Path:
    return Path(shutil.copytree(tiny, tmp_path / name))


def run_cli(main, argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a ``main(argv)``; argparse's SystemExit becomes the status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(map(str, argv)))
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
            if isinstance(exit_.code, str):
                err.write(exit_.code)
    return rc, out.getvalue(), err.getvalue()


def train(argv) -> tuple[int, str, str]:
    from gimplib.train.cli import main

    return run_cli(main, argv)


def book(argv, tmp_path: Path) -> tuple[int, str, str]:
    from gimplib.book.runner import main

    return run_cli(main, ["--root", ROOT, "--output", tmp_path / "book", "--no-build", *argv])


def edit_csv(folder: Path, fn) -> None:
    df = pd.read_csv(folder / "dataset.csv", dtype=str)
    fn(df)
    df.to_csv(folder / "dataset.csv", index=False)


def write_pyramid(path: Path, w: int = 1024, h: int = 768) -> Path:
    """A 2-level tiled TIFF at 0.5 um/px: white background, a textured pink block on the left."""
    import tifffile

    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 250, np.uint8)
    block = np.array((200, 100, 180), np.int16) + rng.integers(-30, 30, size=(h - 256, w // 2 - 128, 3))
    img[128: h - 128, 128: w // 2] = np.clip(block, 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for k in range(2):
            res = 1e4 / (0.5 * 2**k)
            tw.write(np.ascontiguousarray(img[:: 2**k, :: 2**k]), tile=(256, 256), photometric="rgb",
                     compression="zlib", subfiletype=0 if k == 0 else 1, resolution=(res, res),
                     resolutionunit="CENTIMETER")
    return path


EXTRACT = ["--mode", "field", "--a-t", "1", "--max-patches", "2", "--batch-size", "2", "--random-weights", "--quiet"]


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    write_pyramid(folder / "slide_a.tif")
    return folder


def extract(argv) -> tuple[int, str, str]:
    from gimplib.data.wsi.cli import main

    return run_cli(main, argv)


# =========================================================================== 1. stale reuse


def test_reuse_is_announced_with_its_date_and_changed_gene_values_stop_it(tiny, tmp_path):
    data, out = copy_of(tiny, tmp_path), tmp_path / "genes"
    assert train([*GENES, "--data-dir", data, "--out", out])[0] == 0
    rc, stdout, _ = train([*GENES, "--data-dir", data, "--out", out])
    assert rc == 0 and re.search(r"reusing the finished run in .*genes \(finished \d{4}-\d\d-\d\d \d\d:\d\d UTC", stdout)
    genes = pd.read_parquet(data / "genes.parquet")
    (genes * 2 + 1).to_parquet(data / "genes.parquet")  # every value replaced, same shape and ids
    rc, _, err = train([*GENES, "--data-dir", data, "--out", out])
    assert rc == 1
    assert "made from other inputs" in err and "the gene table's values changed" in err
    assert "gimp-train: --overwrite" in err and "-p overwrite=true" in err
    rc, stdout, _ = train([*GENES, "--data-dir", data, "--out", out, "--overwrite"])
    assert rc == 0 and "reusing" not in stdout


def test_a_bag_changed_in_place_stops_the_reuse_and_is_named(tiny, tmp_path):
    data, out = copy_of(tiny, tmp_path), tmp_path / "abmil"
    assert train([*ABMIL, "--data-dir", data, "--out", out])[0] == 0
    bag = sorted((data / "h5_files").glob("*.h5"))[3]
    old = read_bag(bag)
    write_bag(bag, old.feats[::-1].copy(), old.coords)  # same name, same shape, other content
    rc, _, err = train([*ABMIL, "--data-dir", data, "--out", out])
    assert rc == 1 and "the bags (size or modification time) changed: 1 of" in err and bag.stem in err


def test_a_relabelled_case_stops_the_reuse(tiny, tmp_path):
    data, out = copy_of(tiny, tmp_path), tmp_path / "genes"
    assert train([*GENES, "--data-dir", data, "--out", out])[0] == 0
    edit_csv(data, lambda df: df.__setitem__("label", df["label"].where(df.index != 0, "LUAD" if df.loc[0, "label"] == "LUSC" else "LUSC")))
    rc, _, err = train([*GENES, "--data-dir", data, "--out", out])
    assert rc == 1 and "dataset.csv (cases, slides or labels) changed" in err


def test_a_retrained_upstream_run_stops_the_reuse(tiny, tmp_path):
    g, pre = tmp_path / "genes", tmp_path / "pre"
    assert train([*GENES, "--data-dir", tiny, "--out", g])[0] == 0
    pretrain = ["pretrain", "--data-dir", tiny, "--out", pre, "--gene-ckpt", g / "best.pt", "--num-epochs", "1",
                "--no-progress", *TINY_GIMP]
    assert train(pretrain)[0] == 0
    assert train([*GENES, "--data-dir", tiny, "--out", g, "--overwrite", "--seed", "0"])[0] == 0
    rc, _, err = train(pretrain)
    assert rc == 1 and f"the upstream run {g / 'best.pt'} changed" in err


def test_a_run_without_a_fingerprint_is_not_reused(tiny, tmp_path):
    out = tmp_path / "genes"
    assert train([*GENES, "--data-dir", tiny, "--out", out])[0] == 0
    config = json.loads((out / "config.json").read_text())
    del config["inputs"]  # as an older gimplib wrote it
    (out / "config.json").write_text(json.dumps(config))
    rc, _, err = train([*GENES, "--data-dir", tiny, "--out", out])
    assert rc == 1 and "records no fingerprint of its inputs" in err


# =========================================================================== 2. safe overwrite


def real_cohort(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    (folder / "h5_files").mkdir(parents=True)
    write_bag(folder / "h5_files" / "s1.h5", np.ones((3, 8), np.float32))
    (folder / "dataset.csv").write_text("case_id,slide_id,label\nc1,s1,LUAD\n")
    (folder / "notes.txt").write_text("three months of annotations")
    return folder


def test_gimp_synth_overwrite_never_removes_a_folder_it_did_not_write(tmp_path):
    from gimplib.data.synthetic import main

    folder = real_cohort(tmp_path)
    rc, _, err = run_cli(main, [folder, "--preset", "smoke", "--overwrite", "--quiet", "--n-patients", "4"])
    assert rc == 2 and "not a cohort written by gimp-synth" in err and "--overwrite" not in err
    assert (folder / "notes.txt").read_text() == "three months of annotations" and (folder / "h5_files" / "s1.h5").is_file()


def test_gimp_synth_without_overwrite_does_not_suggest_it_for_a_foreign_folder(tmp_path):
    from gimplib.data.synthetic import main

    folder = real_cohort(tmp_path)
    rc, _, err = run_cli(main, [folder, "--preset", "smoke", "--quiet", "--n-patients", "4"])
    assert rc == 2 and "not a cohort written by gimp-synth" in err and "overwrite" not in err.lower()
    assert (folder / "notes.txt").is_file()


def test_gimp_synth_overwrite_keeps_its_own_cohort_when_a_user_added_files(tiny, tmp_path):
    from gimplib.data.synthetic import main

    folder = copy_of(tiny, tmp_path)
    (folder / "my_notes.txt").write_text("mine")
    rc, _, err = run_cli(main, [folder, "--preset", "smoke", "--overwrite", "--quiet", "--n-patients", "4"])
    assert rc == 2 and "my_notes.txt" in err and "gimp-synth did not write" in err
    assert (folder / "my_notes.txt").is_file()


def test_gimp_synth_overwrite_replaces_its_own_cohort(tiny, tmp_path):
    from gimplib.data.synthetic import MARKER, main

    folder = copy_of(tiny, tmp_path)
    assert (folder / MARKER).is_file()
    rc, _, _ = run_cli(main, [folder, "--preset", "smoke", "--overwrite", "--quiet", "--n-patients", "4",
                              "--min-patches", "8", "--max-patches", "16", "--n-genes", "120", "--n-modules", "4"])
    assert rc == 0 and json.loads((folder / "cohort.json").read_text())["n_patients"] == 4


# =========================================================================== 3. labels


@pytest.mark.parametrize("variant", ["luad", "Luad", "LU AD"], ids=["lower", "mixed", "space"])
def test_labels_differing_only_in_case_or_spaces_are_refused_naming_the_cases(tiny, tmp_path, variant):
    data = copy_of(tiny, tmp_path)
    if variant == "LU AD":  # a space inside: make the clean spelling "LU AD" vs "LU  AD"
        edit_csv(data, lambda df: df.__setitem__("label", df["label"].replace("LUAD", "LU AD")))
        variant = "LU  AD"
    first = pd.read_csv(data / "dataset.csv", dtype=str).query("label in ['LUAD', 'LU AD']").iloc[0]
    edit_csv(data, lambda df: df.__setitem__("label", df["label"].where(df.case_id != first.case_id, variant)))
    rc, _, err = train([*GENES, "--data-dir", data, "--out", tmp_path / "g"])
    assert rc == 1 and "differ only in upper/lower case or spaces" in err
    assert repr(variant) in err and first.case_id in err
    assert not (tmp_path / "g").exists()


def test_a_tiny_class_is_warned_about(tiny, tmp_path):
    from gimplib.data.cohort import load_cohort

    data = copy_of(tiny, tmp_path)
    df = pd.read_csv(data / "dataset.csv", dtype=str)
    keep_luad = df[df.label == "LUAD"].case_id.unique()[:2]
    edit_csv(data, lambda d: d.drop(d[(d.label == "LUAD") & ~d.case_id.isin(keep_luad)].index, inplace=True))
    with pytest.warns(UserWarning, match=r"fewer than 5 cases: \{'LUAD': 2\}"):
        load_cohort(data, verbose=False)


def test_a_single_class_cohort_is_refused_before_any_training(tiny, tmp_path):
    data = copy_of(tiny, tmp_path)
    edit_csv(data, lambda df: df.__setitem__("label", "LUAD"))
    out = tmp_path / "g"
    rc, _, err = train([*GENES, "--data-dir", data, "--out", out])
    assert rc == 1 and "single class ['LUAD']" in err and "at least two classes" in err
    assert not out.exists()  # nothing trained, nothing written


# =========================================================================== 4. random weights


def test_random_weight_bags_are_recorded_and_every_reader_warns(slides, tmp_path):
    from gimplib.book.site import describe_data
    from gimplib.data.cohort import load_cohort

    out = tmp_path / "cohort"
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["slide_a"], "label": ["LUAD"]}).to_csv(labels, index=False)
    rc, stdout, _ = extract([slides, out, *EXTRACT, "--labels", labels])
    assert rc == 0 and "next: dataset.csv is written; add a gene table" in stdout
    with h5py.File(out / "h5_files" / "slide_a.h5", "r") as f:
        assert f.attrs["encoder"] == "resnet50_trunc" and f.attrs["encoder_weights"] == "random"
    with pytest.warns(UserWarning, match=r"1 of 1 bag\(s\) were extracted with a RANDOM encoder"):
        load_cohort(out, require=("slides",), verbose=False)
    text, warn = describe_data({"data_dir": str(out)})
    assert warn and "randomly initialised encoder" in text and "1 of 1 bags" in text


def test_weights_identity_is_the_file_hash(tmp_path):
    import hashlib

    from gimplib.data.wsi.features import weights_identity

    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    assert weights_identity(weights=path) == "sha256:" + hashlib.sha256(b"weights").hexdigest()
    assert weights_identity(random_weights=True) == "random"


# =========================================================================== unclear errors


def test_a_renamed_slide_id_column_is_named(tiny, tmp_path):
    data = copy_of(tiny, tmp_path)
    edit_csv(data, lambda df: df.rename(columns={"slide_id": "slide"}, inplace=True))
    rc, _, err = train([*ABMIL, "--data-dir", data, "--out", tmp_path / "a"])
    assert rc == 1 and "no 'slide_id' column" in err and "h5_files/" in err and "Traceback" not in err


def test_bags_narrower_than_the_checkpoint_fail_before_a_config_is_written(tiny, tmp_path):
    pre = tmp_path / "pre"
    assert train(["pretrain", "--data-dir", tiny, "--out", pre, "--num-epochs", "1", "--no-progress", *TINY_GIMP])[0] == 0
    narrow = copy_of(tiny, tmp_path, "narrow")
    for bag in (narrow / "h5_files").glob("*.h5"):
        b = read_bag(bag)
        write_bag(bag, b.feats[:, :512].copy(), b.coords)
    out = tmp_path / "ft"
    rc, _, err = train(["finetune", "--data-dir", narrow, "--out", out, "--pretrained-ckpt", pre / "checkpoint.pt",
                        "--num-epochs", "1", "--no-progress"])
    assert rc == 1 and "are 512 features wide" in err and "trained on 1024-wide features" in err
    assert str(pre / "checkpoint.pt") in err and not (out / "config.json").exists()


def test_a_failed_start_does_not_block_the_corrected_rerun(tiny, tmp_path):
    out = tmp_path / "g"
    rc, _, err = train([*GENES, "--data-dir", tiny, "--out", out, "--set", "encoder=bogus"])
    assert rc == 1 and "bogus" in err and "Traceback" not in err
    rc, _, err = train([*GENES, "--data-dir", tiny, "--out", out])
    assert rc == 0, err


@pytest.mark.parametrize("content", [b"truncated", b"random", b"text"])
def test_a_file_that_is_not_a_checkpoint_is_one_clear_line(tiny, tmp_path, content):
    good = tmp_path / "genes"
    assert train([*GENES, "--data-dir", tiny, "--out", good])[0] == 0
    bad = tmp_path / "bad.pt"
    if content == b"truncated":
        bad.write_bytes((good / "best.pt").read_bytes()[:5000])
    elif content == b"random":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        bad.write_text("model weights are on the shared drive\n")
    rc, _, err = train(["pretrain", "--data-dir", tiny, "--out", tmp_path / "p", "--gene-ckpt", bad, "--no-progress"])
    assert rc == 1 and "not a gimplib checkpoint (truncated or another format" in err and str(bad) in err
    assert "weights_only" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_negative_gene_values_hint_names_what_the_user_types(tiny, tmp_path):
    data = copy_of(tiny, tmp_path)
    genes = pd.read_parquet(data / "genes.parquet")
    (genes - genes.mean()).to_parquet(data / "genes.parquet")  # centred: negative values
    rc, _, err = train([*GENES, "--data-dir", data, "--out", tmp_path / "g"])
    assert rc == 1 and "-p gene_transform=none" in err and "--set gene_transform=none" in err


def test_cases_without_genes_hint_drop_incomplete_and_gimp_train_has_it(tiny, tmp_path):
    data = copy_of(tiny, tmp_path)
    genes = pd.read_parquet(data / "genes.parquet")
    genes.iloc[1:].to_parquet(data / "genes.parquet")
    rc, _, err = train([*GENES, "--data-dir", data, "--out", tmp_path / "g"])
    assert rc == 1 and "--drop-incomplete" in err and "-p drop_incomplete=true" in err and genes.index[0] in err
    rc, _, err = train([*GENES, "--data-dir", data, "--out", tmp_path / "g", "--drop-incomplete"])
    assert rc == 0, err


def test_drop_incomplete_is_a_parameter_of_every_notebook():
    from gimplib.book.params import declared_parameters, stage_notebooks

    for nb in stage_notebooks(ROOT / "notebooks"):
        assert "drop_incomplete" in declared_parameters(nb), nb.name


def test_another_configuration_in_the_run_folder_names_what_to_type(tiny, tmp_path):
    out = tmp_path / "g"
    assert train([*GENES, "--data-dir", tiny, "--out", out])[0] == 0
    rc, _, err = train([*GENES, "--data-dir", tiny, "--out", out, "--lr", "0.01"])
    assert rc == 1 and "lr: saved" in err and "-p overwrite=true" in err and "gimp-train: --overwrite" in err


def test_metrics_json_is_strict_json_with_a_reason_for_each_null(tmp_path):
    from gimplib.utils import save_json

    path = save_json(tmp_path / "metrics.json", {"test_auc": float("nan"), "val_auc": np.float64("inf"), "n": 3})

    def refuse(name):
        raise AssertionError(f"bare {name} in metrics.json")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["test_auc"] is None and data["val_auc"] is None and data["n"] == 3
    assert "nan" in data["null_reasons"]["test_auc"] and "single class" in data["null_reasons"]["test_auc"]


@pytest.mark.parametrize("setting,message", [
    ("num_epochs=three", "num_epochs='three': expected an integer >= 1 (notebook: -p num_epochs=50; gimp-train: --set num_epochs=50)"),
    ("batch_size=0", "batch_size=0: expected an integer >= 1"),
    ("lr=-1", "lr=-1: expected a number > 0"),
], ids=["text", "zero", "negative"])
def test_training_options_of_the_wrong_type_fail_before_the_run_folder(tiny, tmp_path, setting, message):
    out = tmp_path / "g"
    argv = [a for a in GENES if a not in ("--num-epochs", "1")]  # the flag would win over --set
    rc, _, err = train([*argv, "--data-dir", tiny, "--out", out, "--set", setting])
    assert rc == 1 and message in err and not out.exists()


def test_gimp_train_reads_1e_minus_4_as_a_number(tiny, tmp_path):
    rc, _, err = train([*GENES, "--data-dir", tiny, "--out", tmp_path / "g", "--set", "lr=1e-4"])
    assert rc == 0, err
    assert json.loads((tmp_path / "g" / "config.json").read_text())["lr"] == 1e-4


def test_gimp_train_unknown_baseline_is_one_line(tiny, tmp_path):
    rc, _, err = train(["baseline", "--name", "abmill", "--data-dir", tiny, "--out", tmp_path / "b"])
    assert rc == 1 and "unknown baseline 'abmill'" in err and "Traceback" not in err


def test_gimp_train_baseline_without_name(tiny, tmp_path):
    rc, _, err = train(["baseline", "--data-dir", tiny, "--out", tmp_path / "b"])
    assert rc != 0 and "needs --name" in err


def test_gimp_train_set_without_equals(tiny, tmp_path):
    rc, _, err = train([*GENES, "--data-dir", tiny, "--out", tmp_path / "g", "--set", "lr"])
    assert rc != 0 and "--set expects KEY=VALUE, got 'lr'" in err


def test_gimp_train_missing_data_dir(tmp_path):
    rc, _, err = train([*GENES, "--data-dir", tmp_path / "nope", "--out", tmp_path / "g"])
    assert rc == 1 and "nope: cohort folder not found" in err


# --------------------------------------------------------------------------- gimp-extract


def test_extract_labels_file_missing_fails_before_any_slide(slides, tmp_path):
    out = tmp_path / "out"
    rc, _, err = extract([slides, out, *EXTRACT, "--labels", tmp_path / "lables.csv"])
    assert rc == 2 and "labels file" in err and "lables.csv not found" in err
    assert not (out / "masks").exists() and not (out / "h5_files").exists()


def test_extract_labels_for_other_slides_fail_before_any_slide(slides, tmp_path):
    out, labels = tmp_path / "out", tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["slide_b"], "label": ["LUAD"]}).to_csv(labels, index=False)
    rc, _, err = extract([slides, out, *EXTRACT, "--labels", labels])
    assert rc == 2 and "no label for slide(s) ['slide_a']" in err and not (out / "masks").exists()


def test_extract_labels_with_wrong_columns(slides, tmp_path):
    out, labels = tmp_path / "out", tmp_path / "labels.csv"
    pd.DataFrame({"slide": ["slide_a"], "class": ["LUAD"]}).to_csv(labels, index=False)
    rc, _, err = extract([slides, out, *EXTRACT, "--labels", labels])
    assert rc == 2 and "expected 'label' and 'slide_id' and/or 'case_id'" in err and not (out / "masks").exists()


def test_extract_resume_keeps_the_original_status_and_time(slides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("out")  # a relative output folder, as typed
    assert extract([slides, out, *EXTRACT])[0] == 0
    first = pd.read_csv(out / "extract_status.csv")
    assert extract([slides, out, *EXTRACT])[0] == 0
    again = pd.read_csv(out / "extract_status.csv")
    assert again.status.tolist() == ["done"] and again.seconds.tolist() == first.seconds.tolist() != [0.0]
    assert Path(again.path[0]).is_absolute()
    for sub in ("patches", "h5_files"):  # CLAM's save_path attribute: absolute in both files
        with h5py.File(out / sub / "slide_a.h5", "r") as f:
            assert f["coords"].attrs["save_path"] == str((out / sub).resolve())


def test_extract_shows_a_patch_bar_inside_each_slide(slides, tmp_path, capsys):
    from gimplib.data.wsi import ExtractConfig, process_slides
    from gimplib.data.wsi.tissue import TissueParams

    config = ExtractConfig(mode="field", tissue=TissueParams(a_t=1.0), max_patches=2, random_weights=True, batch_size=1)
    process_slides(slides, tmp_path / "out", config, progress=True)
    err = capsys.readouterr().err
    assert "slide_a.tif" in err and "patch" in err and "2/2" in err


# --------------------------------------------------------------------------- the book runner and papermill


def test_runner_type_checks_parameters_before_running(tmp_path):
    rc, _, err = book(["--params", "smoke", "--only", "02", "-p", "num_epochs=three"], tmp_path)
    assert rc == 2 and "parameter num_epochs = 'three' (str), expected an integer" in err and "-p num_epochs=" in err
    assert not (tmp_path / "book" / "_build" / "site").exists()  # nothing ran


def test_runner_refuses_a_non_boolean_switch(tmp_path):
    rc, _, err = book(["--params", "smoke", "--only", "02", "-p", "overwrite=maybe"], tmp_path)
    assert rc == 2 and "parameter overwrite = 'maybe'" in err and "true or false" in err


def test_runner_accepts_1e_minus_4_as_a_number(tmp_path):
    from gimplib.book.params import check_parameter_types, declared_parameters

    declared = declared_parameters(ROOT / "notebooks" / "02_genes.ipynb")
    values, problems = check_parameter_types({"lr": "1e-4", "num_epochs": "3"}, declared, "02_genes")
    assert not problems and values == {"lr": 1e-4, "num_epochs": 3}


def test_null_is_taken_only_where_the_parameter_documents_none():
    """`-p gene_encoder None` (image-only pre-training) is documented in 04's parameters cell and
    must pass both checks (the runner's and the notebook's hidden cell); `profile` is not."""
    import nbformat

    from gimplib.book.params import check_parameter_types, declared_parameters

    path = ROOT / "notebooks" / "04_pretrain.ipynb"
    declared = declared_parameters(path)
    values, problems = check_parameter_types({"gene_encoder": None, "margin": 0.4}, declared, "04_pretrain")
    assert not problems and values["gene_encoder"] is None
    _, problems = check_parameter_types({"profile": None}, declared, "04_pretrain")
    assert problems and "parameter profile = null" in problems[0]
    cells = nbformat.read(path, as_version=4).cells
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    check = next(c for c in cells if "check_notebook_parameters(" in c.source)
    kernel: dict = {}
    exec(params.source, kernel)  # the kernel after the parameters cell ...
    kernel["gene_encoder"] = None  # ... and papermill's injected -p gene_encoder None
    exec(check.source, kernel)  # the hidden check cell: accepted
    kernel["profile"] = None
    with pytest.raises(ValueError, match="parameter profile = null"):
        exec(check.source, kernel)


def test_every_parameter_set_has_values_of_the_declared_types():
    from gimplib.book.params import check_parameter_types, declared_parameters, load_param_set, notebook_parameters, stage_notebooks

    for name in ("smoke", "demo", "paper"):
        ps = load_param_set(name, ROOT / "notebooks" / "params")
        for nb in stage_notebooks(ROOT / "notebooks"):
            d = declared_parameters(nb)
            assert check_parameter_types(notebook_parameters(ps, nb.stem, None, d), d, nb.stem)[1] == []


def test_runner_unknown_override(tmp_path):
    rc, _, err = book(["--params", "smoke", "--only", "02", "-p", "num_epoch=3"], tmp_path)
    assert rc == 2 and "override 'num_epoch' is a parameter of none of ['02_genes']" in err


def test_runner_unknown_parameter_set(tmp_path):
    rc, _, err = book(["--params", "smok"], tmp_path)
    assert rc == 2 and "smok" in err and "known sets: ['demo', 'paper', 'smoke']" in err


def test_runner_only_matches_nothing(tmp_path):
    rc, _, err = book(["--params", "smoke", "--only", "99"], tmp_path)
    assert rc == 2 and "--only ['99'] matches no notebook" in err


def test_runner_missing_data_dir(tmp_path):
    rc, _, err = book(["--params", "smoke", "--data-dir", tmp_path / "nowhere"], tmp_path)
    assert rc == 2 and "nowhere: folder not found" in err


def test_runner_override_without_equals(tmp_path):
    rc, _, err = book(["--params", "smoke", "-p", "seed"], tmp_path)
    assert rc == 2 and "expected NAME=VALUE, got 'seed'" in err


@pytest.mark.parametrize("text,message", [
    ("common:\n  seed: [1\n", "not valid YAML"),
    ("common: 3\n", "section 'common' must be a mapping"),
    ("common:\n  sed: 1\n", "key 'sed' in section 'common' is not a parameter"),
    ("genes:\n  lr: 1\n", "section 'genes' is neither 'common' nor a notebook stem"),
], ids=["yaml", "not-mapping", "typo", "section"])
def test_runner_bad_parameter_files(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    rc, _, err = book(["--params", path], tmp_path)
    assert rc == 2 and message in err and "mine.yaml" in err


def test_papermill_f_reads_the_files_the_runner_writes(tiny, tmp_path):
    rc, stdout, _ = book(["--params", "smoke", "--only", "02", "--data-dir", tiny, "--papermill-files", tmp_path / "pm"],
                         tmp_path)
    assert rc == 0 and "-f" in stdout
    flat = tmp_path / "pm" / "02_genes.yaml"
    import yaml

    params = yaml.safe_load(flat.read_text())
    assert params["data_dir"] == str(tiny) and all(k.isidentifier() for k in params)
    out = tmp_path / "02.ipynb"
    subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "02_genes.ipynb"), str(out), "-f",
                    str(flat), "--prepare-only"], check=True, capture_output=True, cwd=tmp_path)
    injected = [c for c in json.loads(out.read_text())["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    compile("".join(injected[0]["source"]), "injected", "exec")  # valid Python (the sectioned sets are not)
    assert f"data_dir = \"{tiny}\"" in "".join(injected[0]["source"])


def test_papermill_p_is_type_checked_for_every_parameter(tiny, tmp_path):
    """A direct `papermill -p` with a wrong type stops in the notebook's hidden check cell,
    before the set-up cell writes anything, with the runner's message."""
    out = tmp_path / "02.ipynb"
    run = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "02_genes.ipynb"), str(out),
                          "-p", "data_dir", str(tiny), "-p", "workdir", str(tmp_path / "work"),
                          "-p", "fragment_size", "big", "-p", "clip", "high"],
                         capture_output=True, text=True, cwd=tmp_path)
    text = run.stdout + run.stderr
    assert run.returncode != 0
    assert "02_genes: parameter fragment_size = 'big' (str), expected an integer like its default" in text
    assert "parameter clip = 'high' (str), expected a number like its default; e.g. -p clip=5.0" in text
    assert not (tmp_path / "work").exists()  # nothing written

    from gimplib.book.params import check_notebook_parameters

    namespace = {"lr": "1e-4", "num_epochs": "3", "seeds": [0, 1]}
    check_notebook_parameters(namespace, {"lr": 3e-4, "num_epochs": 15, "seeds": [0]}, "02_genes")
    assert namespace == {"lr": 1e-4, "num_epochs": 3, "seeds": [0, 1]}  # safe conversions done in place


def test_rerun_line_names_data_dir_workdir_and_overrides():
    from gimplib.book.runner import _rerun_command

    line = _rerun_command("paper", "04_pretrain", "/data/my cohort", "/scratch/w", {"seed": 1, "overwrite": True})
    assert line == ("python -m gimplib.book --params paper --only 04 --data-dir '/data/my cohort' "
                    "--workdir /scratch/w -p seed=1 -p overwrite=true")


# --------------------------------------------------------------------------- around long work


def test_outputs_follow_the_users_umask(tmp_path):
    from gimplib.utils import save_json

    old = os.umask(0o022)
    try:
        path = save_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_synthetic_cohort_folder_follows_the_users_umask(tiny):
    assert tiny.stat().st_mode & 0o777 == 0o777 & ~_umask()
    assert (tiny / "dataset.csv").stat().st_mode & 0o044  # readable by group/others under a usual umask


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bench_help_lists_the_benchmarks_and_exits_0():
    from gimplib.bench.__main__ import main

    rc, out, _ = run_cli(main, ["--help"])
    assert rc == 0 and all(name in out for name in ("io", "step", "slide", "extract"))
    rc, _, err = run_cli(main, ["iox"])
    assert rc == 2 and "unknown benchmark 'iox'" in err


def _option_blocks(text: str) -> list[str]:
    blocks, cur = [], None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            if cur:
                blocks.append(cur)
            cur = line
        elif cur is not None and line.startswith("    "):
            cur += " " + line.strip()
        else:
            if cur:
                blocks.append(cur)
            cur = None
    if cur:
        blocks.append(cur)
    return [b for b in blocks if "--help" not in b]


@pytest.mark.parametrize("module", ["gimplib.data.wsi.cli", "gimplib.train.cli", "gimplib.book.runner",
                                    "gimplib.data.synthetic"])
def test_every_flag_documents_its_default(module):
    import importlib

    rc, out, _ = run_cli(importlib.import_module(module).main, ["--help"])
    assert rc == 0
    missing = [b.split()[0] for b in _option_blocks(out) if "default" not in b.lower()]
    assert not missing, f"{module}: flags without a default in --help: {missing}"


# --------------------------------------------------------------------------- through the notebooks (slow tier)


@pytest.mark.notebooks
@pytest.mark.timeout(900)
def test_runner_reuses_with_a_date_then_stops_when_the_genes_change(tiny, tmp_path, capfd):
    import nbformat

    from gimplib.book import NotebookFailed, run_book

    data, work = copy_of(tiny, tmp_path), tmp_path / "work"
    kw = dict(root=ROOT, output=tmp_path / "book", workdir=work, data_dir=data, only=["02"], build=False)
    over = {"num_epochs": 1, "n_folds": 0}
    run_book("smoke", overrides=over, **kw)
    run_book("smoke", overrides=over, **kw)
    nb = nbformat.read(tmp_path / "book" / "_build" / "site" / "notebooks" / "02_genes.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert re.search(r"reusing the finished run in .* \(finished \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    banner = "".join(c.source for c in nb.cells if "gimplib-banner" in c.metadata.get("tags", []))
    assert f"--data-dir {data}" in banner and f"--workdir {work}" in banner and "-p num_epochs=1" in banner
    assert re.search(r"\d+ of its training runs were reused, unchanged, from earlier runs \(finished \d{4}-", banner)
    genes = pd.read_parquet(data / "genes.parquet")
    (genes * 2 + 1).to_parquet(data / "genes.parquet")
    with pytest.raises(NotebookFailed, match=r"(?s)made from other inputs.*the gene table's values changed.*-p overwrite=true"):
        run_book("smoke", overrides=over, **kw)
    captured = capfd.readouterr()
    logs = captured.err + captured.out
    assert "without encryption" not in logs and "IProgress not found" not in logs
    assert "KeyboardInterrupt caught in kernel" not in logs


@pytest.mark.notebooks
def test_runner_streams_training_bars_to_the_terminal_not_into_the_book(tmp_path):
    run = subprocess.run([sys.executable, "-m", "gimplib.book", "--params", "smoke", "--only", "01,02", "--no-build",
                          "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert re.search(r"genes \d+/\d+:", run.stderr)  # the epochs advance on the terminal
    nb = json.loads((tmp_path / "out" / "_build" / "site" / "notebooks" / "02_genes.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    assert "it/s" not in text and "genes 1/" not in text  # and no bar text reaches the book
