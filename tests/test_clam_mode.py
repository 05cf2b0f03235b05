"""CLAM mode: the same coordinates as CLAM's create_patches_fp.py, the same features as its extract_features_fp.py.

The golden data in ``tests/fixtures/clam`` is CLAM's own output (see its README): on the real
CMU slide (skips without ``../shared``) and on a 3-level TIFF these tests write themselves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

openslide = pytest.importorskip("openslide", reason="the wsi extra (openslide-python, openslide-bin) is not installed")
pytest.importorskip("cv2", reason="the wsi extra (opencv-python-headless) is not installed")
pytest.importorskip("tifffile", reason="the wsi extra (tifffile) is not installed")
pytest.importorskip("torchvision", reason="the wsi extra (torchvision) is not installed")

from _clam_tiff import clam_test_image, write_clam_test_tiff  # noqa: E402

from gimplib.data import read_bag  # noqa: E402
from gimplib.data.wsi import (  # noqa: E402
    ClamParams,
    ExtractConfig,
    PatchDataset,
    build_encoder,
    clam_patch_grid,
    extract_features,
    main,
    open_slide,
    process_slide,
    read_patches_h5,
    read_slide_info,
)
from gimplib.data.wsi.clam import clam_level_downsamples, clam_patch_coords, clam_segment  # noqa: E402
from gimplib.utils import DataError  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "clam"
RECORD = json.loads((FIXTURES / "clam_runs.json").read_text())
CMU_RUNS = sorted(k for k, v in RECORD["runs"].items() if v["slide"] == "CMU-1-Small-Region.svs")
TIFF_RUNS = sorted(k for k, v in RECORD["runs"].items() if v["slide"] == "clam_pyramid.tif")
CLAM_ATTRS = ("patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "name")


def clam_coords(name: str) -> np.ndarray:
    lines = (FIXTURES / name).read_text().split()
    assert lines[0] == "x,y", name
    return np.array([[int(v) for v in line.split(",")] for line in lines[1:]], dtype=np.int64).reshape(-1, 2)


def run_params(name: str) -> ClamParams:
    run = RECORD["runs"][name]
    return ClamParams.from_preset(run["preset"], **run["overrides"])


@pytest.fixture(scope="module")
def tiff(tmp_path_factory) -> Path:
    path = write_clam_test_tiff(tmp_path_factory.mktemp("clam") / "clam_pyramid.tif")
    slide = open_slide(path)
    try:  # the pixels CLAM saw
        assert slide.level_dimensions == ((3000, 2000), (1500, 1000), (750, 500))
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (3000, 2000)).convert("RGB")), clam_test_image())
    finally:
        slide.close()
    return path


def grid_of(path: Path, params: ClamParams, patch_level: int = 0):
    slide = open_slide(path)
    try:
        return clam_patch_grid(slide, read_slide_info(slide, path), params, patch_level=patch_level)
    finally:
        slide.close()


# ---------------------------------------------------------------- golden: CLAM's coordinates


@pytest.mark.parametrize("name", CMU_RUNS)
def test_cmu_slide_coords_equal_clams(svs: Path, tmp_path: Path, name: str):
    run = RECORD["runs"][name]
    expected = clam_coords(name)
    assert len(expected) == run["n_patches"]
    config = ExtractConfig(clam=run_params(name), patch_level=run["patch_level"], features=False)
    if run["n_patches"] == 0:  # CLAM keeps nothing here and writes no file: so do we, saying why
        with pytest.raises(DataError, match=r"CMU-1-Small-Region\.svs: no patch in CLAM mode"):
            process_slide(svs, tmp_path, config)
        assert not (tmp_path / "patches" / f"{svs.stem}.h5").exists()
        return
    process_slide(svs, tmp_path, config)
    coords, attrs = read_patches_h5(tmp_path / "patches" / f"{svs.stem}.h5")
    assert np.array_equal(coords, expected)  # the same patches, in the same order
    for key in CLAM_ATTRS:
        assert np.array_equal(np.asarray(attrs[key]), np.asarray(run["clam_attrs"][key])), key


def test_cmu_slide_issue_numbers(svs: Path):
    """The figures of issue 18: TCGA keeps 0; with a_t 4, a_h 1 CLAM keeps 50 (45 without padding)."""
    assert len(grid_of(svs, ClamParams.from_preset("tcga"))[0]) == 0
    grid, seg = grid_of(svs, ClamParams.from_preset("tcga", a_t=4, a_h=1))
    assert len(grid) == 50 and len(seg.contours) == 1
    assert tuple(grid.coords.min(axis=0)) == (50, 65)  # the grid starts at the contour's bounding box
    nopad = grid_of(svs, ClamParams.from_preset("tcga", a_t=4, a_h=1, use_padding=False))[0]
    assert len(nopad) == 45 and (nopad.coords + 256 <= np.array([2220, 2967])).all()
    assert (grid.coords + 256 > np.array([2220, 2967])).any(axis=1).sum() == 5  # hang past the slide
    assert {tuple(c) for c in nopad.coords.tolist()} <= {tuple(c) for c in grid.coords.tolist()}


@pytest.mark.parametrize("name", TIFF_RUNS)
def test_written_pyramid_coords_equal_clams(tiff: Path, name: str):
    run = RECORD["runs"][name]
    grid, _ = grid_of(tiff, run_params(name), patch_level=run["patch_level"])
    assert np.array_equal(grid.coords, clam_coords(name))
    if run["n_patches"]:
        attrs = grid.attrs("clam_pyramid", "x")
        for key in CLAM_ATTRS:
            assert np.array_equal(np.asarray(attrs[key]), np.asarray(run["clam_attrs"][key])), key


def test_patch_level_reads_patch_size_at_that_level(tiff: Path, tmp_path: Path):
    grid, _ = grid_of(tiff, ClamParams.from_preset("bwh_biopsy"), patch_level=1)
    assert (grid.patch_level, grid.patch_size, grid.patch_size_level0, grid.downsample) == (1, 256, 512, (2.0, 2.0))
    ds = PatchDataset(tiff, grid.coords[:1], level=1, read_size=256, out_size=None)
    x, y = grid.coords[0]
    img = clam_test_image()[::2, ::2]
    assert np.array_equal(np.asarray(ds.read(0)), img[y // 2 : y // 2 + 256, x // 2 : x // 2 + 256])


def test_keep_and_exclude_contour_ids(tiff: Path):
    params = ClamParams.from_preset("bwh_biopsy")
    slide = open_slide(tiff)
    try:
        seg = clam_segment(slide, params)
        full, owner = clam_patch_coords(seg, level_downsamples=clam_level_downsamples(slide), slide_dim=(3000, 2000))
        only1 = clam_patch_grid(slide, read_slide_info(slide, tiff), params.replace(exclude_ids=(0,)))[0]
        keep0 = clam_patch_grid(slide, read_slide_info(slide, tiff), params.replace(keep_ids=(0,)))[0]
        with pytest.raises(DataError, match=r"clam_pyramid\.tif: keep_ids \[5\]"):
            clam_segment(slide, params.replace(keep_ids=(5,)), name=tiff)
    finally:
        slide.close()
    assert len(seg.contours) == 2 and sorted(set(owner.tolist())) == [0, 1]
    assert np.array_equal(only1.coords, full[owner == 1])
    assert np.array_equal(keep0.coords, full[owner == 0])


def test_mask_png_is_the_kept_contours_minus_holes(tiff: Path, tmp_path: Path):
    params = ClamParams.from_preset("bwh_biopsy")
    process_slide(tiff, tmp_path, ExtractConfig(clam=params, features=False))
    from PIL import Image

    mask = np.asarray(Image.open(tmp_path / "masks" / "clam_pyramid.png")) > 0
    assert mask.shape == (500, 750)  # level 2, the one nearest 64x
    assert mask[450, 100] and mask[100, 600] and mask[375, 612]  # regions A, B and C
    big_holes = [mask[137, 150], mask[143, 318], mask[337, 175]]  # A's three holes over a_h
    assert sum(big_holes) == 1 and not big_holes[1]  # max_n_holes=2: the largest two stay background
    assert mask[318, 318]  # the small hole is under a_h: tissue
    assert not mask[65, 465]  # the speck is under a_t


# ---------------------------------------------------------------- features on CLAM's coordinates


def _weights_match_record() -> str | None:
    rec = RECORD["weights"]
    if torch.__version__ != rec["torch"]:
        return f"torch {torch.__version__}, the features were recorded with {rec['torch']}"
    model, _ = build_encoder(random_weights=True, seed=0)
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().numpy().tobytes())
    if h.hexdigest() != rec["sha256_of_state"]:
        return "this torch's seeded random ResNet50 differs from the one CLAM was run with"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tcga_at4_ah1_224", "tcga_at4_ah1_nopad_none"])
def test_features_bit_identical_to_clams(svs: Path, tmp_path: Path, run: str):
    why = _weights_match_record()
    if why:
        pytest.skip(why)
    rec = RECORD["features"][run]
    config = ExtractConfig(
        clam=run_params(rec["coords"]), random_weights=True, seed=0, out_size=rec["target_patch_size"], batch_size=64
    )
    process_slide(svs, tmp_path, config)
    with h5py.File(tmp_path / "h5_files" / f"{svs.stem}.h5", "r") as f:
        feats, coords = f["features"][:], f["coords"][:]
    assert coords.dtype == np.int32 and np.array_equal(coords, clam_coords(rec["coords"]))  # CLAM's h5_files: int32
    assert list(feats.shape) == rec["shape"] and feats.dtype == np.float32
    first8 = np.load(FIXTURES / rec["first8"])
    assert np.abs(feats[:, :8] - first8).max() == 0
    assert hashlib.sha256(np.ascontiguousarray(feats).tobytes()).hexdigest() == rec["sha256"]
    assert read_bag(tmp_path / "h5_files" / f"{svs.stem}.h5").feats.shape == feats.shape


def test_padded_patch_is_black_past_the_border(svs: Path):
    ds = PatchDataset(svs, np.array([[2000, 2800]]), level=0, read_size=256, out_size=None)
    img = np.asarray(ds.read(0))
    assert (img[:, 220:] == 0).all() and (img[167:, :] == 0).all()  # past x=2220 and y=2967
    assert img[:160, :210].mean() > 100  # the slide itself
    white = np.asarray(PatchDataset(svs, np.array([[2000, 2800]]), level=0, read_size=256, out_size=None, fill="white").read(0))
    assert (white[:, 220:] == 255).all()
    with pytest.raises(DataError, match="fill='grey'"):
        PatchDataset(svs, np.zeros((1, 2)), level=0, read_size=256, fill="grey")


def test_half_is_a_no_op_on_cpu_and_target_size_none_keeps_256(svs: Path):
    model, _ = build_encoder(random_weights=True, seed=0)
    coords = clam_coords("cmu_tcga_at4_ah1_l0.csv")[:2]
    kwargs = dict(level=0, read_size=256, device="cpu")
    full = extract_features(svs, coords, model, half=False, **kwargs)
    assert np.array_equal(extract_features(svs, coords, model, half=True, **kwargs), full)  # fp16 autocast: CUDA only
    raw = PatchDataset(svs, coords, level=0, read_size=256, out_size=None)
    assert raw[0].shape == (3, 256, 256) and PatchDataset(svs, coords, level=0, read_size=256)[0].shape == (3, 224, 224)
    assert not np.array_equal(extract_features(svs, coords, model, out_size=None, **kwargs), full)


# ---------------------------------------------------------------- presets, settings and the command line


def test_presets_by_name_and_from_a_clam_csv(tmp_path: Path):
    tcga = ClamParams.from_preset("tcga")
    assert (tcga.sthresh, tcga.mthresh, tcga.close, tcga.a_t, tcga.a_h, tcga.max_n_holes) == (8, 7, 4, 16, 4, 8)
    assert tcga.use_padding and tcga.contour_fn == "four_pt" and tcga.seg_level == -1 and tcga == ClamParams()
    assert ClamParams.from_preset("bwh_biopsy.csv") == ClamParams.from_preset("bwh_biopsy")
    csv = tmp_path / "mine.csv"
    csv.write_text(
        "seg_level,sthresh,mthresh,close,use_otsu,a_t,a_h,max_n_holes,vis_level,line_thickness,white_thresh,"
        "black_thresh,use_padding,contour_fn,keep_ids,exclude_ids\n"
        "-1,8,7,4,TRUE,4,1,8,-1,100,5,50,FALSE,center,none,\"1,2\"\n"
    )
    mine = ClamParams.from_preset(csv, a_h=2)
    assert mine.use_otsu and not mine.use_padding and mine.contour_fn == "center"
    assert (mine.a_t, mine.a_h, mine.keep_ids, mine.exclude_ids) == (4.0, 2, (), (1, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(preset="tcga2"), "CLAM preset 'tcga2'"),
        (dict(contour_fn="six_pt"), "contour_fn='six_pt'"),
        (dict(mthresh=4), "mthresh=4"),
        (dict(sthresh=300), "sthresh=300"),
        (dict(a_t=-1), "must be >= 0"),
        (dict(colour="red"), r"unknown setting\(s\) \['colour'\]"),
    ],
)
def test_bad_clam_settings_are_named(kwargs: dict, match: str):
    preset = kwargs.pop("preset", "tcga")
    with pytest.raises(DataError, match=match):
        ClamParams.from_preset(preset, **kwargs)


def test_bad_csv_preset_is_named(tmp_path: Path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sthresh,use_padding\n8,maybe\n")
    with pytest.raises(DataError, match=r"bad\.csv: use_padding='maybe'"):
        ClamParams.from_preset(bad)
    bad.write_text("sthresh,a_t\neight,1\n")
    with pytest.raises(DataError, match=r"bad\.csv"):
        ClamParams.from_preset(bad)


def test_bad_extract_settings_are_named(svs: Path, tmp_path: Path):
    with pytest.raises(DataError, match="mode='trident'"):
        ExtractConfig(mode="trident")
    with pytest.raises(DataError, match="patch_level=-1"):
        ExtractConfig(patch_level=-1)
    with pytest.raises(DataError, match=r"CMU-1-Small-Region\.svs: patch_level 2 asked for; it has 1 level"):
        process_slide(svs, tmp_path, ExtractConfig(patch_level=2, features=False))
    with pytest.raises(DataError, match=r"CMU-1-Small-Region\.svs: seg_level 3 asked for; it has 1 level"):
        process_slide(svs, tmp_path, ExtractConfig(clam=ClamParams(seg_level=3), features=False))
    with pytest.raises(DataError, match="out_size=0"):
        ExtractConfig(out_size=0)


def test_cli_preset_and_mode_options(svs: Path, tmp_path: Path, capsys):
    out = tmp_path / "cohort"
    assert main([str(svs), str(out), "--preset", "bwh_biopsy", "--patch-only", "--quiet"]) == 0
    coords, attrs = read_patches_h5(out / "patches" / f"{svs.stem}.h5")
    assert np.array_equal(coords, clam_coords("cmu_bwh_biopsy_l0.csv")) and attrs["patch_mode"] == "clam"
    settings = json.loads((out / "extract_settings.json").read_text())
    assert settings["mode"] == "clam" and settings["clam"]["sthresh"] == 15 and settings["half"] is False
    out2 = tmp_path / "nopad"
    argv = [str(svs), str(out2), "--a-t", "4", "--a-h", "1", "--no-padding", "--patch-only", "--quiet"]
    assert main(argv) == 0
    assert np.array_equal(read_patches_h5(out2 / "patches" / f"{svs.stem}.h5")[0], clam_coords("cmu_tcga_at4_ah1_nopad_l0.csv"))
    assert main([str(svs), str(tmp_path / "x"), "--patch-only", "--quiet"]) == 1  # TCGA keeps nothing here
    for argv in (["--mode", "field", "--preset", "tcga"], ["--min-tissue", "0.5"], ["--target-patch-size", "0"]):
        with pytest.raises(SystemExit):
            main([str(svs), str(tmp_path / "y"), *argv])
    assert "apply to --mode" in capsys.readouterr().err
    assert main([str(svs), str(tmp_path / "z"), "--preset", "nope", "--patch-only", "--quiet"]) == 2
