"""The synthetic TCGA-like cohort: layout, determinism, realism and signal strength."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from gimplib.data.bags import read_bag
from gimplib.data.synthetic import (
    KNOBS,
    MARKER_GENES,
    PRESETS,
    generate_cohort,
    main,
)
from gimplib.utils import DataError, load_json

# Mid-sized cohort for statistical checks: many patients, small bags (fast to write and read).
MID = dict(n_patients=200, min_patches=32, max_patches=128)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("smoke") / "cohort", preset="smoke", seed=0, progress=False)


@pytest.fixture(scope="module")
def mid(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("mid")
    return {s: generate_cohort(root / f"seed{s}", preset="smoke", seed=s, progress=False, **MID) for s in (0, 1)}


def _slide_means(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    ds = pd.read_csv(path / "dataset.csv")
    means = np.stack([read_bag(path / "h5_files" / f"{s}.h5").feats.mean(0) for s in ds.slide_id])
    return ds, means


def _log_genes(path: Path) -> pd.DataFrame:
    return np.log2(pd.read_parquet(path / "genes.parquet") + 1.0)


def test_layout_and_formats(smoke):
    ds = pd.read_csv(smoke / "dataset.csv")
    assert list(ds.columns) == ["case_id", "slide_id", "label"]
    assert set(ds.label) == {"LUAD", "LUSC"}
    assert len(ds) >= PRESETS["smoke"]["n_patients"] == ds.case_id.nunique()
    for slide_id in ds.slide_id:
        path = smoke / "h5_files" / f"{slide_id}.h5"
        with h5py.File(path) as f:
            feats, coords = f["features"], f["coords"]
            assert feats.dtype == np.float32 and feats.shape[1] == 1024
            assert coords.dtype.kind == "i" and coords.shape == (feats.shape[0], 2)
            assert PRESETS["smoke"]["min_patches"] <= feats.shape[0] <= PRESETS["smoke"]["max_patches"]
            assert coords.attrs["patch_size"] == 256 and coords.attrs["patch_level"] == 0
            assert feats.maxshape == (None, 1024)  # CLAM's resizable datasets
        bag = read_bag(path)
        assert bag.feats.min() >= 0.0 and np.isfinite(bag.feats).all()
        assert (bag.feats == 0).mean() < 0.5  # non-negative, not degenerate
    genes = pd.read_parquet(smoke / "genes.parquet")
    assert genes.index.name == "case_id" and sorted(genes.index) == sorted(ds.case_id.unique())
    assert genes.shape[1] == PRESETS["smoke"]["n_genes"] and genes.columns.is_unique
    assert all(re.fullmatch(r"ENSG\d{11}", g) for g in genes.columns)
    assert genes.dtypes.eq(np.float32).all() and (genes.to_numpy() >= 0).all()
    symbols = pd.read_csv(smoke / "gene_symbols.csv")
    assert list(symbols.columns) == ["gene_id", "gene_symbol"]
    assert list(symbols.gene_id) == list(genes.columns)
    sym = dict(zip(symbols.gene_id, symbols.gene_symbol))
    for gene_id, (symbol, _) in MARKER_GENES.items():
        assert sym[gene_id] == symbol
    meta = load_json(smoke / "cohort.json")
    assert meta["preset"] == "smoke" and meta["seed"] == 0
    assert set(KNOBS) - {"chunk_rows"} <= set(meta["settings"])
    assert {"site", "tumour_fraction", "n_patches", "region_sizes"} <= set(meta["slides"][0])
    assert {"site", "purity", "image_phenotype", "gene_phenotype"} <= set(meta["patients"][0])
    assert not list(smoke.parent.glob(".*tmp*"))  # the temp build folder was renamed away


def test_gene_values_look_like_fpkm(smoke):
    v = pd.read_parquet(smoke / "genes.parquet").to_numpy()
    # Real GDC HTSeq-FPKM files (../shared/data): 42-50% zeros, median ~0.04, max in the thousands.
    assert 0.3 < (v == 0).mean() < 0.6
    assert np.median(v) < 0.5 and v.max() > 1_000


def test_deterministic_by_seed(smoke, tmp_path):
    again = generate_cohort(tmp_path / "again", preset="smoke", seed=0, progress=False)
    other = generate_cohort(tmp_path / "other", preset="smoke", seed=1, progress=False)
    for name in ("dataset.csv", "gene_symbols.csv", "cohort.json"):
        assert (smoke / name).read_bytes() == (again / name).read_bytes(), name
    pd.testing.assert_frame_equal(pd.read_parquet(smoke / "genes.parquet"), pd.read_parquet(again / "genes.parquet"))
    for path in sorted((smoke / "h5_files").glob("*.h5")):
        a, b = read_bag(path), read_bag(again / "h5_files" / path.name)
        np.testing.assert_array_equal(a.feats, b.feats)
        np.testing.assert_array_equal(a.coords, b.coords)
    assert (smoke / "dataset.csv").read_text() != (other / "dataset.csv").read_text()


def test_chunked_writing_gives_the_same_bags(tmp_path):
    kw = dict(preset="smoke", seed=3, n_patients=2, min_patches=5000, max_patches=9000, n_genes=100,
              n_modules=4, progress=False)
    whole = generate_cohort(tmp_path / "whole", **kw)
    chunked = generate_cohort(tmp_path / "chunked", chunk_rows=1000, **kw)
    for path in sorted((whole / "h5_files").glob("*.h5")):
        a, b = read_bag(path), read_bag(chunked / "h5_files" / path.name)
        np.testing.assert_array_equal(a.feats, b.feats)
        np.testing.assert_array_equal(a.coords, b.coords)
        with h5py.File(chunked / "h5_files" / path.name) as f:
            assert f["features"].maxshape == (None, 1024) and f["coords"].attrs["patch_size"] == 256


def test_tcga_style_ids(mid):
    ds = pd.read_csv(mid[0] / "dataset.csv")
    meta = load_json(mid[0] / "cohort.json")
    site_of = {p["case_id"]: p["site"] for p in meta["patients"]}
    for case_id, slide_id in zip(ds.case_id, ds.slide_id):
        assert re.fullmatch(r"TCGA-[0-9A-Z]{2}-[0-9A-Z]{4}", case_id), case_id
        assert case_id.split("-")[1] == site_of[case_id]
        assert re.fullmatch(re.escape(case_id) + r"-01Z-00-DX[12]", slide_id), slide_id
        assert slide_id[:12] == case_id  # the patient id is the barcode's first 12 characters
    per_case = ds.groupby("case_id").slide_id.count()
    assert per_case.max() == 2 and 0.03 < (per_case == 2).mean() < 0.3
    assert ds.slide_id.is_unique
    labels = ds.drop_duplicates("case_id").label.value_counts()
    assert abs(labels["LUAD"] - labels["LUSC"]) <= 2
    assert ds.case_id.str[5:7].nunique() >= 10  # many tissue-source sites


def test_paper_preset_shortened(tmp_path):
    assert PRESETS["paper"]["n_patients"] == 946 and PRESETS["paper"]["n_genes"] == 60_480
    assert (PRESETS["paper"]["min_patches"], PRESETS["paper"]["max_patches"]) == (485, 148_569)
    out = generate_cohort(tmp_path / "paper", preset="paper", n_patients=4, max_patches=1500, n_genes=3000,
                          n_modules=20, progress=False)
    meta = load_json(out / "cohort.json")
    assert meta["preset"] == "paper" and meta["settings"]["n_patients"] == 4
    assert all(485 <= s["n_patches"] <= 1500 for s in meta["slides"])
    assert pd.read_parquet(out / "genes.parquet").shape == (4, 3000)


def _regions(path: Path, slide: dict):
    coords = read_bag(path / "h5_files" / f"{slide['slide_id']}.h5").coords
    bounds = np.cumsum([0, *slide["region_sizes"]])
    return [coords[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def test_coords_follow_clam_order(mid):
    meta = load_json(mid[0] / "cohort.json")
    n_regions = [len(s["region_sizes"]) for s in meta["slides"]]
    assert set(n_regions) == {1, 2, 3}
    for slide in meta["slides"][:60]:
        regions = _regions(mid[0], slide)
        assert sum(map(len, regions)) == slide["n_patches"]
        all_coords = np.concatenate(regions)
        assert len(np.unique(all_coords, axis=0)) == len(all_coords)
        for xy in regions:
            # CLAM's process_contour: meshgrid(x_range, y_range, indexing="ij") over the
            # contour's bounding box from its corner, flattened, filtered to the contour.
            x0, y0 = xy.min(0)
            assert ((xy - [x0, y0]) % 256 == 0).all()
            xs = np.arange(x0, xy[:, 0].max() + 1, 256)
            ys = np.arange(y0, xy[:, 1].max() + 1, 256)
            gx, gy = np.meshgrid(xs, ys, indexing="ij")
            candidates = np.stack([gx.ravel(), gy.ravel()], 1)
            inside = {tuple(c) for c in xy.tolist()}
            expected = np.array([c for c in candidates.tolist() if tuple(c) in inside])
            np.testing.assert_array_equal(xy, expected)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_neighbouring_patches_are_more_alike(mid):
    meta = load_json(mid[0] / "cohort.json")
    rng = np.random.default_rng(0)
    gaps, raw_gaps = [], []
    for slide in meta["slides"][:30]:
        feats = read_bag(mid[0] / "h5_files" / f"{slide['slide_id']}.h5").feats
        feats_mean = feats.mean(0)
        feats = feats - feats_mean  # centred too: raw non-negative features all look alike
        coords = np.concatenate(_regions(mid[0], slide))
        index = {tuple(c): i for i, c in enumerate(coords.tolist())}
        pairs = [(i, index[(x + 256, y)]) for i, (x, y) in enumerate(coords.tolist()) if (x + 256, y) in index]
        pairs += [(i, index[(x, y + 256)]) for i, (x, y) in enumerate(coords.tolist()) if (x, y + 256) in index]
        a, b = np.array(pairs).T
        r = rng.integers(0, len(feats), (2, len(pairs)))
        gaps.append(_cos(feats[a], feats[b]).mean() - _cos(feats[r[0]], feats[r[1]]).mean())
        raw = feats + feats_mean
        raw_gaps.append(_cos(raw[a], raw[b]).mean() - _cos(raw[r[0]], raw[r[1]]).mean())
    assert np.mean(gaps) > 0.2 and np.mean(np.array(gaps) > 0) > 0.9, gaps
    assert np.mean(raw_gaps) > 0.03 and np.mean(np.array(raw_gaps) > 0) > 0.9, raw_gaps


def test_tumour_fraction_range_and_purity_coupling(mid):
    meta = load_json(mid[0] / "cohort.json")
    tf = np.array([s["tumour_fraction"] for s in meta["slides"]])
    assert tf.min() >= 0.02 and tf.max() <= 0.60
    assert tf.min() < 0.05 and tf.max() > 0.4  # the whole range is used
    purity = {p["case_id"]: p["purity"] for p in meta["patients"]}
    rho = np.corrcoef(tf, [purity[s["case_id"]] for s in meta["slides"]])[0, 1]
    assert rho > 0.7  # the RNA purity and the slide's tumour share come from one latent


def test_class_evidence_grows_with_tumour_fraction(mid):
    from scipy.stats import spearmanr
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.preprocessing import StandardScaler

    ds, means = _slide_means(mid[0])
    tf = np.array([s["tumour_fraction"] for s in load_json(mid[0] / "cohort.json")["slides"]])
    y = (ds.label == "LUSC").to_numpy()
    x = StandardScaler().fit_transform(means) / np.sqrt(means.shape[1])
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    score = cross_val_predict(LogisticRegression(C=1.0, max_iter=3000), x, y, cv=cv, method="decision_function")
    margin = np.where(y, score, -score)
    low = tf < np.median(tf)
    assert spearmanr(tf, margin).statistic > 0.3
    assert (margin[~low] > 0).mean() > (margin[low] > 0).mean() + 0.1


def test_site_codes_shift_features(mid):
    ds, means = _slide_means(mid[0])
    site = ds.case_id.str[5:7].to_numpy()

    def r2(groups):
        centred = means - means.mean(0)
        within = sum(((means[groups == g] - means[groups == g].mean(0)) ** 2).sum() for g in np.unique(groups))
        return 1 - within / (centred**2).sum()

    shuffled = [r2(np.random.default_rng(k).permutation(site)) for k in range(5)]
    assert r2(site) > max(shuffled) + 0.1


def test_markers_follow_the_class(mid):
    for path in mid.values():
        genes = _log_genes(path)
        label = pd.read_csv(path / "dataset.csv").drop_duplicates("case_id").set_index("case_id").label
        lusc = label.loc[genes.index].to_numpy() == "LUSC"
        for gene_id, (symbol, programme) in MARKER_GENES.items():
            diff = genes[gene_id][lusc].mean() - genes[gene_id][~lusc].mean()
            assert (diff > 0.5) if programme == "LUSC" else (diff < -0.5), (symbol, diff)


def test_gene_correlations_have_block_structure(mid):
    genes = _log_genes(mid[0])
    modules = load_json(mid[0] / "cohort.json")["gene_modules"]["modules"]
    # generic modules only (the class programmes also correlate through the label)
    groups = [ids for k, ids in modules.items() if int(k) >= 3 and len(ids) >= 5][:6]
    cols = [g for ids in groups for g in ids]
    corr = np.corrcoef(genes[cols].to_numpy().T)
    member = np.concatenate([[k] * len(ids) for k, ids in enumerate(groups)])
    same = member[:, None] == member[None, :]
    off_diag = ~np.eye(len(cols), dtype=bool)
    within, between = corr[same & off_diag].mean(), corr[~same].mean()
    assert within > 0.25 and abs(between) < 0.05, (within, between)


def _modality_accuracies(path: Path) -> tuple[float, float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.preprocessing import StandardScaler

    ds, means = _slide_means(path)
    feats = pd.DataFrame(means).groupby(ds.case_id.to_numpy()).mean()  # mean-pool per patient
    genes = _log_genes(path).loc[feats.index]
    y = (ds.drop_duplicates("case_id").set_index("case_id").label.loc[feats.index] == "LUSC").to_numpy()

    # Each block standardised and scaled by 1/sqrt(width), so neither dominates the penalty.
    def block(x):
        return StandardScaler().fit_transform(x) / np.sqrt(x.shape[1])

    x_img, x_gene = block(feats.to_numpy()), block(genes.to_numpy())
    cv = StratifiedKFold(5, shuffle=True, random_state=0)

    def acc(x):
        return cross_val_score(LogisticRegression(C=1.0, max_iter=3000), x, y, cv=cv).mean()

    return acc(x_img), acc(x_gene), acc(np.hstack([x_img, x_gene]))


@pytest.mark.parametrize("seed", [0, 1])
def test_default_knobs_each_modality_imperfect_both_better(mid, seed):
    img, gene, both = _modality_accuracies(mid[seed])
    assert 0.65 < img < 0.97 and 0.65 < gene < 0.97, (img, gene)
    assert both >= max(img, gene), (img, gene, both)


def test_signal_knobs_move_accuracy(tmp_path):
    kw = dict(preset="smoke", seed=0, progress=False, **{**MID, "n_patients": 120})
    weak = generate_cohort(tmp_path / "weak", image_signal=0.0, gene_signal=3.0, **kw)
    img, gene, _ = _modality_accuracies(weak)
    assert img < 0.65 and gene > 0.9, (img, gene)


def test_reuse_mismatch_and_overwrite(tmp_path):
    out = generate_cohort(tmp_path / "c", preset="smoke", n_patients=4, progress=False)
    stamp = (out / "cohort.json").stat().st_mtime_ns
    assert generate_cohort(out, preset="smoke", n_patients=4, progress=False) == out
    assert (out / "cohort.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(DataError, match=r"c: holds a different cohort.*seed: 0 != requested 5"):
        generate_cohort(out, preset="smoke", n_patients=4, seed=5, progress=False)
    with pytest.raises(DataError, match="n_patients: 4 != requested 6"):
        generate_cohort(out, preset="smoke", n_patients=6, progress=False)
    generate_cohort(out, preset="smoke", n_patients=6, overwrite=True, progress=False)
    assert load_json(out / "cohort.json")["n_patients"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp or old folders left
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="junk exists but holds no cohort.json"):
        generate_cohort(tmp_path / "junk", preset="smoke", progress=False)
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown synthetic-cohort setting.*'n_patient'"):
        generate_cohort("/nonexistent/never", preset="smoke", n_patient=3)
    with pytest.raises(ValueError, match="unknown preset 'tiny'"):
        generate_cohort("/nonexistent/never", preset="tiny")
    with pytest.raises(ValueError, match="min_patches <= max_patches"):
        generate_cohort("/nonexistent/never", preset="smoke", min_patches=500, max_patches=100)
    assert not Path("/nonexistent/never").exists()


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main([str(out), "--preset", "smoke", "--n-patients", "4", "--image-signal", "2.5", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_patients"] == 4 and printed["out_dir"] == str(out)
    assert load_json(out / "cohort.json")["settings"]["image_signal"] == 2.5
    assert main([str(out), "--preset", "smoke", "--n-patients", "5", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_loads_with_load_cohort(smoke):
    from gimplib.data import load_cohort

    cohort = load_cohort(smoke, verbose=False)
    ds = pd.read_csv(smoke / "dataset.csv")
    assert cohort.label_names == ["LUAD", "LUSC"] and cohort.feat_dim == 1024
    assert len(cohort.cases) == ds.case_id.nunique() and len(cohort.slides) == len(ds)
    assert cohort.genes.shape == (len(cohort.cases), PRESETS["smoke"]["n_genes"])
    lusc = cohort.cases.label == "LUSC"
    assert (cohort.cases.y[lusc] == 1).all() and (cohort.cases.y[~lusc] == 0).all()
