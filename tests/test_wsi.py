"""Whole-slide tiling and features: real Aperio slide, pyramidal TIFFs written here, bad input.

The ResNet runs on a handful of patches with random weights (no download, ever).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

openslide = pytest.importorskip("openslide", reason="the wsi extra (openslide-python, openslide-bin) is not installed")
tifffile = pytest.importorskip("tifffile", reason="the wsi extra (tifffile) is not installed")
pytest.importorskip("torchvision", reason="the wsi extra (torchvision) is not installed")

from gimplib.data import load_cohort, read_bag  # noqa: E402
from gimplib.data.wsi import (  # noqa: E402
    ClamParams,
    ExtractConfig,
    PatchDataset,
    ResNet50Trunc,
    TissueParams,
    build_encoder,
    choose_level,
    main,
    open_slide,
    patch_grid,
    patch_score_image,
    patch_size_level0,
    plot_attention_heatmap,
    process_slide,
    process_slides,
    read_patches_h5,
    read_slide_info,
    segment_tissue,
    slide_tissue_mask,
)
from gimplib.data.wsi.tissue import otsu_threshold  # noqa: E402
from gimplib.utils import DataError  # noqa: E402

CLAM_ATTRS = {"patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "name", "save_path"}
PINK = (200, 100, 180)


@pytest.fixture(scope="module")
def cmu_tissue(svs: Path):
    slide = open_slide(svs)
    try:
        info = read_slide_info(slide, svs)
        tissue = slide_tissue_mask(slide, patch_area_level0=256.0**2)
    finally:
        slide.close()
    return info, tissue


def write_pyramid(path: Path, image: np.ndarray, mpp: float | None = 0.5, levels: int = 3) -> Path:
    """A tiled pyramidal TIFF (generic-tiff for OpenSlide): level k is image[::2**k, ::2**k]."""
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            kwargs = {}
            if mpp is not None:
                res = 1e4 / (mpp * 2**k)  # pixels per centimetre
                kwargs = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
            tw.write(
                np.ascontiguousarray(image[:: 2**k, :: 2**k]), tile=(256, 256), photometric="rgb",
                compression="zlib", subfiletype=0 if k == 0 else 1, **kwargs,
            )
    return path


def tissue_image(w: int = 2048, h: int = 1536, seed: int = 0) -> np.ndarray:
    """White background, a textured pink 'tissue' block on the left half."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 250, np.uint8)
    block = np.array(PINK, np.int16) + rng.integers(-30, 30, size=(h - 256, w // 2 - 128, 3))
    img[128 : h - 128, 128 : w // 2] = np.clip(block, 0, 255).astype(np.uint8)
    return img


# ---------------------------------------------------------------- segmentation (no slide needed)


def test_segment_tissue_keeps_regions_fills_small_holes_drops_specks():
    img = np.full((200, 300, 3), 245, np.uint8)
    img[20:180, 20:180] = PINK  # tissue region, area 25,600 px
    img[60:120, 60:120] = 245  # big hole, 3,600 px: stays background
    img[150:154, 150:154] = 245  # small hole, 16 px: filled
    img[100:104, 250:254] = PINK  # speck, 16 px: dropped
    mask = segment_tissue(img, area_unit=100.0, a_t=1.0, a_h=1.0, close=0, mthresh=1)
    assert mask[100, 100] == 0 == mask[90, 90]  # inside the big hole
    assert mask[151, 151] == 1  # small hole filled
    assert mask[101, 251] == 0  # speck dropped
    assert mask[30, 30] == 1 and mask[5, 5] == 0
    # with max_n_holes=0 every hole is filled, as in CLAM
    assert segment_tissue(img, area_unit=100.0, a_t=1.0, a_h=1.0, close=0, mthresh=1, max_n_holes=0)[90, 90] == 1
    # a region must be larger than a_t units
    assert not segment_tissue(img, area_unit=100.0, a_t=300.0, close=0, mthresh=1).any()


def test_otsu_threshold_splits_two_modes():
    values = np.concatenate([np.full(500, 10), np.full(300, 120)]).astype(np.uint8)
    t = otsu_threshold(values)
    assert 10 <= t < 120


def test_choose_level_never_upsamples():
    ds = (1.0, 4.0002, 16.001, 32.0)
    assert choose_level(ds, 1.0) == 0
    assert choose_level(ds, 2.0) == 0  # 40x slide, 20x patches: read level 0 and shrink
    assert choose_level(ds, 4.0) == 1  # 4.0002 counts as 4
    assert choose_level(ds, 20.0) == 2
    assert choose_level(ds, 100.0) == 3


# ---------------------------------------------------------------- the real Aperio slide


def test_real_slide_metadata(cmu_tissue):
    info, _ = cmu_tissue
    assert info.dimensions == (2220, 2967)
    assert info.objective_power == 20 and info.mpp == pytest.approx(0.499)


def test_real_slide_tissue_and_background_told_apart(cmu_tissue):
    info, tissue = cmu_tissue
    mask, thumb = tissue.mask, tissue.thumbnail
    assert mask.shape == thumb.shape[:2]
    assert 0.2 < tissue.tissue_fraction < 0.7
    # stained tissue is saturated, glass is not
    sat = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(thumb).convert("HSV"))[..., 1]
    assert np.median(sat[mask]) > 40 > np.median(sat[~mask])
    grid = patch_grid(info, tissue)
    assert grid.grid_shape == (8, 11)  # whole 256 px patches of a 2220 x 2967 slide
    kept = {tuple(c) for c in grid.coords.tolist()}
    assert 20 < len(kept) < 88
    assert (0, 0) not in kept and (0, 2560) not in kept  # glass in the left corners
    assert (768, 1536) in kept and (1024, 2304) in kept  # the tissue strip in the middle
    assert (grid.tissue >= 0.25).all()


def test_real_slide_coords_inside_slide_in_clam_order(cmu_tissue):
    info, tissue = cmu_tissue
    grid = patch_grid(info, tissue, min_tissue=0.0)
    w, h = info.dimensions
    assert len(grid) == 88  # min_tissue=0 keeps the whole grid
    assert (grid.coords >= 0).all() and (grid.coords[:, 0] + 256 <= w).all() and (grid.coords[:, 1] + 256 <= h).all()
    assert (grid.coords % 256 == 0).all()
    order = np.lexsort((grid.coords[:, 1], grid.coords[:, 0]))  # x outer, y inner (meshgrid 'ij')
    assert (order == np.arange(len(grid))).all()
    assert grid.patch_level == 0 and grid.patch_size == 256 and grid.downsample == (1.0, 1.0)


def test_real_slide_to_cohort_folder_with_cli_resume_and_settings(svs: Path, tmp_path: Path):
    out = tmp_path / "cohort"
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": [svs.stem], "label": ["LUSC"]}).to_csv(labels, index=False)
    # CLAM mode (the default) with the TCGA preset's areas lowered: the unmodified preset keeps nothing on this small region
    argv = [str(svs), str(out), "--random-weights", "--max-patches", "3", "--batch-size", "2", "--quiet", "--labels", str(labels),
            "--a-t", "4", "--a-h", "1"]
    assert main(argv) == 0
    h5 = out / "h5_files" / f"{svs.stem}.h5"
    with h5py.File(out / "patches" / f"{svs.stem}.h5", "r") as f:
        assert CLAM_ATTRS <= set(f["coords"].attrs)
        assert f["coords"].attrs["name"] == svs.stem and f["coords"].attrs["patch_size"] == 256
    bag = read_bag(h5)
    assert bag.feats.shape == (3, 1024) and bag.feats.dtype == np.float32 and np.isfinite(bag.feats).all()
    assert bag.feats.std(axis=0).max() > 0  # three different patches, three different rows
    pt = torch.load(out / "pt_files" / f"{svs.stem}.pt", weights_only=True)
    assert torch.allclose(pt, torch.from_numpy(bag.feats))
    assert (out / "masks" / f"{svs.stem}.png").is_file()
    settings = __import__("json").loads((out / "extract_settings.json").read_text())
    assert settings["encoder"] == "random(seed=0)" and settings["random_weights"] is True
    status = pd.read_csv(out / "extract_status.csv")
    assert status.status.tolist() == ["done"] and status.n_patches.tolist() == [3]
    dataset = pd.read_csv(out / "dataset.csv")
    assert dataset.to_dict("records") == [{"case_id": svs.stem, "slide_id": svs.stem, "label": "LUSC"}]
    cohort = load_cohort(out, require=("slides",), verbose=False)  # read unchanged by the cohort loader
    assert cohort.slides.slide_id.tolist() == [svs.stem] and cohort.feat_dim == 1024
    assert cohort.slides.n_patches.tolist() == [3] and cohort.label_names == ["LUSC"]
    # resume: done slides are skipped, not recomputed
    mtime = h5.stat().st_mtime_ns
    clam = ClamParams.from_preset("tcga", a_t=4, a_h=1)
    again = process_slides(svs, out, ExtractConfig(random_weights=True, max_patches=3, clam=clam), progress=False)
    assert again.status.tolist() == ["skipped"] and h5.stat().st_mtime_ns == mtime
    # other settings into the same folder are refused, naming the setting
    with pytest.raises(DataError, match="max_patches"):
        process_slides(svs, out, ExtractConfig(random_weights=True, max_patches=5, clam=clam), progress=False)
    with pytest.raises(DataError, match="mode"):
        process_slides(svs, out, ExtractConfig(random_weights=True, max_patches=3, mode="field"), progress=False)


# ---------------------------------------------------------------- the encoder


def test_encoder_loads_torchvision_weights_and_truncates_after_layer3(tmp_path: Path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    net = resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)
    model, desc = build_encoder(weights=path)
    assert desc == f"file:{path}"
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = (x - model.mean) / model.std
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            ref = getattr(net, name)(ref)
        ref = ref.mean(dim=(2, 3))
        got = model(x)
    assert got.shape == (2, ResNet50Trunc.feat_dim) == (2, 1024)
    assert torch.allclose(got, ref, atol=1e-5)
    # uint8 input is scaled to [0, 1] first
    x8 = (x * 255).round().to(torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(model(x8), model(x8.float() / 255), atol=1e-5)


def test_encoder_missing_weights_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.pth.*--random-weights"):
        build_encoder(weights=tmp_path / "nope.pth")


# ---------------------------------------------------------------- pyramidal TIFFs written here


def test_pyramid_level_chosen_for_target_magnification(tmp_path: Path):
    img = tissue_image()
    path = write_pyramid(tmp_path / "pyr.tif", img, mpp=0.5)  # 20x / 10x / 5x
    slide = open_slide(path)
    try:
        info = read_slide_info(slide, path)
        tissue = slide_tissue_mask(slide, patch_area_level0=256.0**2, params=TissueParams(a_t=1.0))
    finally:
        slide.close()
    assert info.level_count == 3 and info.mpp == pytest.approx(0.5)
    expect = {20.0: (0, 256, 256), 10.0: (1, 256, 512), 5.0: (2, 256, 1024)}
    for mag, (level, read, size0) in expect.items():
        grid = patch_grid(info, tissue, target_magnification=mag)
        assert (grid.patch_level, grid.patch_size, grid.patch_size_level0) == (level, read, size0), mag
        assert len(grid) > 0
        assert (grid.coords[:, 0] < 1024).all()  # only the tissue half
    # 10x patches are read from level 1 pixel for pixel
    grid = patch_grid(info, tissue, target_magnification=10.0)
    ds = PatchDataset(path, grid.coords[:2], level=grid.patch_level, read_size=grid.patch_size, out_size=256)
    x, y = grid.coords[1]
    expected = img[::2, ::2][y // 2 : y // 2 + 256, x // 2 : x // 2 + 256]
    assert np.array_equal(np.asarray(ds.read(1)), expected)
    with pytest.raises(DataError, match="pyr.tif.*upsampling"):
        patch_grid(info, tissue, target_magnification=40.0)
    # called a 40x scan, its level 1 is 20x: 512 level-0 pixels per patch, read at level 1
    grid = patch_grid(info, tissue, target_magnification=20.0, slide_magnification=40.0)
    assert (grid.patch_level, grid.patch_size, grid.patch_size_level0) == (1, 256, 512)
    # and 20x patches of a '30x' scan come from level 0, 341 px shrunk later (no level at 1.5)
    grid = patch_grid(info, tissue, target_magnification=20.0, slide_magnification=30.0)
    assert (grid.patch_level, grid.patch_size, grid.patch_size_level0) == (0, 384, 384)


def test_slide_without_mpp_needs_a_magnification(tmp_path: Path):
    path = write_pyramid(tmp_path / "nompp.tif", tissue_image(1024, 768), mpp=None, levels=2)
    config = ExtractConfig(mode="field", features=False, tissue=TissueParams(a_t=1.0))
    with pytest.raises(DataError, match=r"nompp\.tif.*magnification"):
        process_slide(path, tmp_path / "out", config)
    config = ExtractConfig(mode="field", features=False, slide_magnification=20.0, tissue=TissueParams(a_t=1.0))
    result = process_slide(path, tmp_path / "out", config)
    assert result["n_patches"] > 0
    coords, attrs = read_patches_h5(tmp_path / "out" / "patches" / "nompp.h5")
    assert len(coords) == result["n_patches"] and attrs["level0_magnification"] == 20.0


def test_blank_slide_has_no_tissue(tmp_path: Path):
    path = write_pyramid(tmp_path / "blank.tif", np.full((1024, 1024, 3), 250, np.uint8), levels=1)
    with pytest.raises(DataError, match=r"blank\.tif.*no tissue"):
        process_slide(path, tmp_path / "out", ExtractConfig(mode="field", features=False))
    with pytest.raises(DataError, match=r"blank\.tif.*no patch in CLAM mode \(0 tissue contour"):
        process_slide(path, tmp_path / "out", ExtractConfig(features=False))
    assert (tmp_path / "out" / "masks" / "blank.png").is_file()  # kept, to see why
    assert not (tmp_path / "out" / "patches" / "blank.h5").exists()


def test_unreadable_slide_is_reported_and_the_rest_go_on(tmp_path: Path):
    src = tmp_path / "slides"
    src.mkdir()
    (src / "broken.svs").write_bytes(b"this is not a slide" * 100)
    write_pyramid(src / "good.tif", tissue_image(1024, 768), levels=2)
    with pytest.raises(DataError, match=r"broken\.svs"):
        process_slide(src / "broken.svs", tmp_path / "x", ExtractConfig(features=False))
    out = tmp_path / "out"
    argv = [str(src), str(out), "--mode", "field", "--patch-only", "--a-t", "1", "--max-patches", "2", "--quiet"]
    assert main(argv) == 1  # one slide failed
    status = pd.read_csv(out / "extract_status.csv", keep_default_na=False).set_index("slide_id")
    assert status.loc["good", "status"] == "done" and status.loc["good", "n_patches"] == 2
    assert status.loc["broken", "status"] == "failed" and "broken.svs" in status.loc["broken", "error"]
    assert not (out / "patches" / "broken.h5").exists()
    assert not (out / "h5_files").exists()
    # CLAM's two steps: patch first, embed later into the same folder
    config = ExtractConfig(mode="field", tissue=TissueParams(a_t=1.0), max_patches=2, random_weights=True, batch_size=2)
    again = process_slides(src / "good.tif", out, config, progress=False)
    assert again.status.tolist() == ["done"]
    assert read_bag(out / "h5_files" / "good.h5").feats.shape == (2, 1024)
    assert patch_size_level0(out / "h5_files" / "good.h5") == 256


# ---------------------------------------------------------------- heatmaps


def test_patch_score_image_places_and_averages_scores():
    coords = np.array([[0, 0], [100, 0], [50, 0]])
    img = patch_score_image(coords, np.array([1.0, 3.0, 5.0]), 100, canvas=(30, 20), scale=0.1)
    assert img.shape == (20, 30)
    assert img[5, 2] == 1.0  # patch 0 alone
    assert img[5, 7] == 3.0  # patches 0 and 2 overlap: (1 + 5) / 2
    assert img[5, 12] == 4.0  # patches 1 and 2: (3 + 5) / 2
    assert img[5, 17] == 3.0  # patch 1 alone
    assert np.isnan(img[15, 5])  # below every patch


def test_patch_size_level0_from_attributes_or_coords(tmp_path: Path):
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:  # CLAM: 256 px read at a level downsampled 4x
        ds = f.create_dataset("coords", data=np.array([[0, 0], [1024, 0], [0, 2048]]))
        ds.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])})
    assert patch_size_level0(clam) == 1024
    bare = tmp_path / "bare.h5"
    with h5py.File(bare, "w") as f:
        f.create_dataset("coords", data=np.array([[512, 0], [0, 0], [1024, 512]]))
    assert patch_size_level0(bare) == 512


def test_attention_heatmap_on_slide_thumbnail_and_blank_canvas(svs: Path, cmu_tissue):
    info, tissue = cmu_tissue
    grid = patch_grid(info, tissue)
    scores = np.linspace(0, 1, len(grid))
    fig = plot_attention_heatmap(svs, grid.coords, scores, 256, title="CMU-1")
    ax = fig.axes[0]
    assert len(ax.images) == 2 and ax.get_title() == "CMU-1" and len(fig.axes) == 2  # + colorbar
    fig = plot_attention_heatmap(tissue.thumbnail, grid.coords, scores, 256, slide_dims=info.dimensions, colorbar=False)
    heat = fig.axes[0].images[1].get_array()
    assert heat.shape == tissue.thumbnail.shape[:2] and heat.mask.any() and (~heat.mask).any()
    fig = plot_attention_heatmap(None, grid.coords, scores, 256, normalize="minmax")  # synthetic cohort: no image
    assert fig.axes[0].images[1].get_array().max() == pytest.approx(1.0)
    with pytest.raises(DataError, match="slide_dims"):
        plot_attention_heatmap(tissue.thumbnail, grid.coords, scores, 256)
    with pytest.raises(DataError, match="one per patch"):
        plot_attention_heatmap(None, grid.coords, scores[:-1], 256)
