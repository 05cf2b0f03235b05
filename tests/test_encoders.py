"""gimp-extract --encoder: every foundation model built by timm with random weights (never downloaded),
its width, its h5 attributes and settings, the refusal without a weights file, and TRIDENT's output read back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("timm", reason="the wsi extra (timm) is not installed")
openslide = pytest.importorskip("openslide", reason="the wsi extra (openslide) is not installed")
pytest.importorskip("cv2", reason="the wsi extra (opencv-python-headless) is not installed")
pytest.importorskip("tifffile", reason="the wsi extra (tifffile) is not installed")

from _clam_tiff import write_clam_test_tiff  # noqa: E402

from gimplib.data.bags import read_bag  # noqa: E402
from gimplib.data.wsi import ClamParams, ExtractConfig, build_encoder, main, patch_size_level0, process_slides  # noqa: E402
from gimplib.data.wsi.encoders import ENCODERS, _create, build_timm_encoder, encoder_spec  # noqa: E402
from gimplib.predict import bag_encoder, find_bags  # noqa: E402
from gimplib.utils import DataError, sha256_file  # noqa: E402

SMALL_TISSUE = dict(a_t=1, a_h=1)  # the test TIFF's regions are under the TCGA preset's 16 tiles
FOUNDATION = [n for n, s in ENCODERS.items() if s.arch != "resnet50_trunc"]
# published sizes (millions of parameters) of the full architectures, from the model cards / papers
PARAMS_M = {"uni_v1": 303.4, "uni_v2": 681.4, "virchow2": 631.2, "gigapath": 1135.0, "hoptimus0": 1134.8}


@pytest.fixture(scope="module")
def tiff(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    write_clam_test_tiff(folder / "slide_a.tif", seed=0)
    return folder


@pytest.mark.parametrize("name", FOUNDATION)
def test_full_architecture_on_meta_device(name):
    """The full model of each card, built without memory: parameter count and width."""
    spec = encoder_spec(name)
    with torch.device("meta"):
        model = _create(spec, {})
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - PARAMS_M[name]) < 1.0, f"{name}: {n:.1f}M parameters"
    width = model.num_features * (2 if spec.pool == "cls+mean" else 1)
    assert width == spec.feat_dim


@pytest.mark.parametrize("name", FOUNDATION)
def test_random_weights_width_on_two_patches(name):
    """Same widths, one block deep (the full depth is checked on the meta device above)."""
    model, desc = build_encoder(name=name, random_weights=True, seed=0, depth=1)
    assert desc == "random(seed=0)" and model.feat_dim == encoder_spec(name).feat_dim
    patches = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        out = model(patches)
    assert out.shape == (2, encoder_spec(name).feat_dim) and torch.isfinite(out).all()
    again, _ = build_encoder(name=name, random_weights=True, seed=0, depth=1)
    with torch.no_grad():
        assert torch.equal(again(patches), out)  # seeded


def test_patch_preparation_follows_the_cards():
    giga = build_timm_encoder("gigapath", random_weights=True, depth=1)
    x = giga.prepare(torch.full((1, 3, 512, 512), 255, dtype=torch.uint8))
    assert x.shape == (1, 3, 224, 224)  # resize 256, centre crop 224
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor(giga.spec.mean)) / torch.tensor(giga.spec.std))
    hopt = build_timm_encoder("hoptimus0", random_weights=True, depth=1)
    assert hopt.prepare(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)).shape == (1, 3, 224, 224)
    assert encoder_spec("hoptimus0").mean == (0.707223, 0.578729, 0.703617)


@pytest.mark.parametrize("name", FOUNDATION)
def test_refuses_without_weights_file(name, tmp_path):
    with pytest.raises(DataError, match=f"no weights file given.*{encoder_spec(name).weights_from}"):
        build_encoder(name=name)
    with pytest.raises(DataError, match="nope.bin not found"):
        build_encoder(name=name, weights=tmp_path / "nope.bin")
    with pytest.raises(DataError, match="random weights only"):
        build_timm_encoder(name, weights=tmp_path / "nope.bin", depth=1)


def test_unknown_encoder_and_foreign_weights(tmp_path):
    with pytest.raises(DataError, match="unknown patch encoder 'conch'"):
        ExtractConfig(encoder_name="conch")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="not the uni_v1 architecture"):
        build_encoder(name="uni_v1", weights=tmp_path / "other.pth")


def test_cli_refuses_missing_weights(tiff, tmp_path, capsys):
    rc = main([str(tiff), str(tmp_path / "out"), "--encoder", "virchow2", "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "virchow2" in err and "huggingface.co/paige-ai/Virchow2" in err and "nothing is downloaded" in err
    assert not (tmp_path / "out" / "h5_files").exists()


@pytest.mark.parametrize("name", ["uni_v2", "virchow2"])
def test_extraction_records_encoder(name, tiff, tmp_path):
    config = ExtractConfig(encoder_name=name, random_weights=True, clam=ClamParams(**SMALL_TISSUE), patch_level=1, max_patches=3, batch_size=3,
                           device="cpu")
    small, _ = build_encoder(name=name, random_weights=True, depth=1)
    status = process_slides(tiff, tmp_path, config, progress=False, encoder=small)
    assert status.status.tolist() == ["done"]
    spec = encoder_spec(name)
    bag = read_bag(tmp_path / "h5_files" / "slide_a.h5")
    assert bag.feats.shape == (3, spec.feat_dim) and np.isfinite(bag.feats).all()
    with h5py.File(tmp_path / "h5_files" / "slide_a.h5") as f:
        attrs = dict(f["coords"].attrs)
        assert f["features"].attrs["encoder"] == name  # where TRIDENT names it
    assert attrs["encoder"] == name and attrs["weights_sha256"] == "random(seed=0)"
    assert attrs["patch_size_level0"] == 512 and attrs["overlap"] == 0  # 256 px at level 1 (2x)
    assert spec.interpolation in attrs["resize"] and "0.485" in attrs["normalization"]
    settings = json.loads((tmp_path / "extract_settings.json").read_text())
    assert settings["encoder_name"] == name and settings["weights_sha256"] == "random(seed=0)"
    assert settings["encoder_transform"]["feat_dim"] == spec.feat_dim and settings["out_size"] is None
    assert bag_encoder(tmp_path) == {"name": name, "weights_sha256": "random(seed=0)",
                                     "source": str(tmp_path / "extract_settings.json")}
    # another encoder into the same folder is refused
    other = ExtractConfig(random_weights=True, clam=ClamParams(**SMALL_TISSUE), patch_level=1, max_patches=3, device="cpu")
    with pytest.raises(DataError, match="encoder_name"):
        process_slides(tiff, tmp_path, other, progress=False)


def test_resnet_weights_hash_recorded(tiff, tmp_path):
    """ResNet50-trunc from a weights file: its sha256 goes into the settings and every bag."""
    from gimplib.data.wsi.features import ResNet50Trunc

    torch.manual_seed(0)
    path = tmp_path / "r50.pth"
    torch.save(ResNet50Trunc().state_dict(), path)
    config = ExtractConfig(weights=str(path), clam=ClamParams(**SMALL_TISSUE), patch_level=2, max_patches=2, device="cpu")
    process_slides(tiff, tmp_path / "out", config, progress=False)
    with h5py.File(tmp_path / "out" / "h5_files" / "slide_a.h5") as f:
        assert f["coords"].attrs["weights_sha256"] == sha256_file(path)
        assert f["coords"].attrs["encoder"] == "resnet50_trunc" and f["features"].shape[1] == 1024
    assert bag_encoder(tmp_path / "out")["weights_sha256"] == sha256_file(path)
    # gimp-predict's heatmap over the raw slide's thumbnail (the coordinates canvas without it)
    from gimplib.predict import _slide_file, _write_heatmap

    bag = read_bag(tmp_path / "out" / "h5_files" / "slide_a.h5")
    slide = _slide_file(tiff, "slide_a")
    assert slide == tiff / "slide_a.tif"
    kind = _write_heatmap(tmp_path / "pred", "slide_a", tmp_path / "out" / "h5_files" / "slide_a.h5", bag.coords,
                          np.arange(len(bag), dtype=float), slide, "slide_a")
    assert kind == "thumbnail" and (tmp_path / "pred" / "heatmaps" / "slide_a.png").is_file()


def test_reads_trident_output(tmp_path):
    """TRIDENT's layout: <job>/20x_256px_0px_overlap/features_<encoder>/<slide>.h5 with its attributes."""
    folder = tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with h5py.File(folder / "TCGA-AA-0001-01Z-00-DX1.h5", "w") as f:
        f.create_dataset("features", data=rng.normal(size=(5, 1024)).astype(np.float32))
        f["features"].attrs.update({"name": "TCGA-AA-0001-01Z-00-DX1", "savetodir": str(folder), "encoder": "uni_v1"})
        f.create_dataset("coords", data=np.arange(10, dtype=np.int64).reshape(5, 2) * 512)
        f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                                  "target_magnification": 20, "overlap": 0, "name": "TCGA-AA-0001-01Z-00-DX1"})
    bags = find_bags(folder)
    assert list(bags) == ["TCGA-AA-0001-01Z-00-DX1"]
    bag = read_bag(bags["TCGA-AA-0001-01Z-00-DX1"])
    assert bag.feats.shape == (5, 1024) and bag.coords.shape == (5, 2)
    assert patch_size_level0(bags["TCGA-AA-0001-01Z-00-DX1"]) == 512
    assert bag_encoder(folder)["name"] == "uni_v1"


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUNDATION)
def test_full_size_random_weights(name):
    """The full model with random weights on one patch; opt-in (GIMP_FULL_ENCODERS=1): ViT-g takes ~4.5 GB."""
    if os.environ.get("GIMP_FULL_ENCODERS") != "1":
        pytest.skip("full-size ViT-L/H/g builds take 5-60 s and up to 4.5 GB each; set GIMP_FULL_ENCODERS=1")
    need = PARAMS_M[name] * 4e6 / 2**30 * 1.5
    if _available_gb() < need:
        pytest.skip(f"{name} needs about {need:.1f} GB of free memory")
    start = time.perf_counter()
    model = build_timm_encoder(name, random_weights=True)
    with torch.no_grad():
        out = model(torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8))
    assert out.shape == (1, encoder_spec(name).feat_dim) and torch.isfinite(out).all()
    print(f"{name}: built and ran one patch in {time.perf_counter() - start:.1f} s")


def test_predict_from_raw_slides(tmp_path):
    """Raw slides -> bags -> a trained run -> gimp-predict --extract on a new slide, with the run's settings."""
    import pandas as pd

    from gimplib.data.cohort import load_cohort
    from gimplib.predict import main as predict_main
    from gimplib.train import train_baseline

    slides, new = tmp_path / "slides", tmp_path / "new"
    slides.mkdir()
    new.mkdir()
    for k in range(4):
        write_clam_test_tiff(slides / f"slide_{k}.tif", seed=k)
    (new / "patient_9.tif").write_bytes((slides / "slide_3.tif").read_bytes())
    labels = pd.DataFrame({"slide_id": [f"slide_{k}" for k in range(4)], "label": ["LUAD", "LUSC"] * 2})
    config = ExtractConfig(random_weights=True, clam=ClamParams(**SMALL_TISSUE), patch_level=2, max_patches=4,
                           device="cpu")
    process_slides(slides, tmp_path / "cohort", config, labels=labels, progress=False)
    cohort = load_cohort(tmp_path / "cohort", verbose=False)
    split = {"train": ["slide_0", "slide_1"], "val": ["slide_2"], "test": ["slide_3"]}
    run = train_baseline("abmil", cohort, split, out_dir=tmp_path / "abmil", model_kwargs=dict(embed_dim=16, attn_dim=8),
                         num_epochs=1, device="cpu", progress=False, n_boot=0)
    out = tmp_path / "pred"
    assert predict_main([str(run.out_dir), "-o", str(out), "--slides", str(new), "--extract", "--heatmaps",
                         "--quiet", "--device", "cpu"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert table.case_id.tolist() == ["patient_9"] and table.modalities.tolist() == ["image"]
    info = json.loads((out / "predict_info.json").read_text())
    assert info["heatmaps"] == {"patient_9": "thumbnail"} and info["extraction"]["encoder"] == "resnet50_trunc"
    assert info["encoder_check"] == "encoder 'resnet50_trunc' as in training (same weights)"
    # the same slide gives the same features as in training: the settings were reproduced
    assert np.allclose(read_bag(out / "bags" / "h5_files" / "patient_9.h5").feats,
                       read_bag(tmp_path / "cohort" / "h5_files" / "slide_3.h5").feats, atol=1e-5)
    own = run.predictions.set_index("case_id").loc["slide_3", ["prob_0", "prob_1"]].to_numpy(dtype=float)
    assert np.allclose(table[["prob_LUAD", "prob_LUSC"]].to_numpy()[0], own, atol=1e-5)
