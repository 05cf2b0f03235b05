"""The synthetic TCGA-like NSCLC cohort: the project's embedded default data.

Every demo result in the book runs on a cohort written by :func:`generate_cohort`, in the
same CLAM layout a researcher's real data uses (``dataset.csv``, ``h5_files/``, a gene
table), so nothing downstream knows it is synthetic. The generative story, per patient:

* a class (LUAD or LUSC), a tissue-source site (real TCGA site codes, each carrying a
  stain/batch effect; sites lean towards one class as in TCGA) and a latent tumour
  content ``pi``;
* two correlated latent phenotypes: how squamous the tumour *looks*
  (``alpha = +-image_signal + e_img``) and how squamous it *expresses*
  (``u = +-gene_signal + e_gene``), with ``corr(e_img, e_gene) = latent_corr``;
* one or two slides. Each is 1 to 3 tissue regions (blobs) on CLAM's 256-px grid; smooth
  random fields decide, patch by patch, a soft mix of tissue types (stroma, alveolar,
  immune, necrosis, blood, bronchus) and which patches are tumour (the top ``tf`` share of
  a smooth tumour field, ``tf`` in 2%..60% from ``pi``). Tumour patches mix a LUAD-like and
  a LUSC-like prototype by ``sigmoid(alpha + heterogeneity * smooth field)``, so the class
  evidence lives mostly in tumour patches and neighbouring patches look alike;
* an FPKM-like expression profile: log-normal baselines with many zeros, co-expressed
  modules (block-structured correlations), a LUSC and a LUAD programme (containing the real
  markers KRT5, TP63, SOX2 / NKX2-1, NAPSA, SFTPC under their Ensembl ids) driven by
  ``purity * u``, where the RNA purity follows the same ``pi`` as the slides' tumour
  fraction. The two modalities are coupled, and each alone is imperfect.

Feature vectors imitate ResNet50-trunc (CLAM) output: 1024-d, non-negative, skewed, with
all tissue prototypes sharing one per-dimension scale (real patch features are highly
correlated across tissue types).

Coordinates follow CLAM's ``WholeSlideImage.process_contour``: for each tissue contour in
turn, candidates come from ``np.meshgrid(x_range, y_range, indexing="ij")`` flattened, so
within a region rows run with x as the outer and y as the inner (fastest) loop, starting
at the contour's bounding-box corner (not a slide-wide multiple of 256).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from gimplib.data.bags import write_bag
from gimplib.utils import DataError, load_json, save_json

__all__ = [
    "KNOBS",
    "LABEL_NAMES",
    "MARKER_GENES",
    "PRESETS",
    "TISSUE_TYPES",
    "generate_cohort",
    "main",
    "tumour_masks",
]

FORMAT_VERSION = 1
FEAT_DIM = 1024
PATCH_SIZE = 256
LABEL_NAMES = ["LUAD", "LUSC"]
TISSUE_TYPES = ["stroma", "alveolar", "immune", "necrosis", "blood", "bronchus"]
# Rows per feature-noise RNG block: a bag's contents do not depend on how it is chunked.
_NOISE_BLOCK = 4096

#: Sizes of the three presets. ``paper`` matches the paper's cohort (TCGA-NSCLC).
#:
#: The ``demo`` preset (the book's cohort) is also made *harder* than the knobs' defaults, in
#: the ways real slides are hard, so that the systems of the paper's tables can be told apart
#: on it: class evidence in a minority of patches (tumour in 2-35 % of a slide, so a 256-patch
#: window often misses it), weaker patient-level phenotypes and noisier genes; the site effects
#: stay. The difficulty was set once, from the generative model itself and not from any
#: system's score: the latent image phenotype alone separates the classes with a Bayes accuracy
#: of Phi(1.0) = 0.84, the latent expression programme alone with Phi(1.2) = 0.88, and both
#: together (noise correlation 0.1) with about Phi(1.49) = 0.93. No classifier can beat those
#: ceilings except through the site leakage (as in TCGA, sites lean towards one class).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(n_patients=24, min_patches=64, max_patches=400, n_genes=600, n_modules=12),
    "demo": dict(n_patients=160, min_patches=200, max_patches=4000, n_genes=2000, n_modules=24,
                 image_signal=1.0, gene_signal=1.2, gene_noise=0.7, max_tumour_fraction=0.35),
    "paper": dict(n_patients=946, min_patches=485, max_patches=148_569, n_genes=60_480, n_modules=240),
}

#: Knobs shared by every preset (any of them, or a preset size, can be overridden).
KNOBS: dict[str, Any] = dict(
    frac_lusc=476 / 946,  # share of LUSC patients (paper: 476 of 946)
    frac_two_slides=0.12,  # share of patients with a second diagnostic slide (DX2)
    image_signal=1.5,  # class separation of the tumour's look, in SDs of patient-level noise
    tumour_contrast=1.0,  # distance between the LUAD-like and LUSC-like tumour prototypes
    heterogeneity=0.5,  # within-slide spread of the tumour's look (smooth field)
    patch_noise=0.35,  # per-patch feature noise, relative to the per-dimension scale
    site_effect=1.0,  # strength of the site (stain/batch) shift of features
    site_label_purity=0.7,  # P(a patient comes from one of its class's sites); 0.5 = none
    min_tumour_fraction=0.02,  # per-slide tumour fraction range
    max_tumour_fraction=0.60,
    smoothness=3.0,  # correlation length of the tissue maps, in patches
    gene_signal=1.5,  # class separation of the expression programme, same units
    gene_noise=0.5,  # per-gene, per-patient log-scale noise SD
    latent_corr=0.1,  # correlation of the image and gene phenotype noises
    chunk_rows=32_768,  # bags longer than this are generated and written in chunks
)

# Settings that change how, not what, is written (left out of the reuse check).
_NOT_CONTENT = ("chunk_rows",)

#: Real marker genes (Ensembl id without version -> symbol, programme).
MARKER_GENES: dict[str, tuple[str, str]] = {
    "ENSG00000186081": ("KRT5", "LUSC"),
    "ENSG00000073282": ("TP63", "LUSC"),
    "ENSG00000181449": ("SOX2", "LUSC"),
    "ENSG00000136352": ("NKX2-1", "LUAD"),
    "ENSG00000131400": ("NAPSA", "LUAD"),
    "ENSG00000168484": ("SFTPC", "LUAD"),
}

# Real TCGA tissue-source-site codes that submitted LUAD resp. LUSC cases.
_SITES = {
    "LUAD": ["05", "35", "38", "44", "49", "50", "55", "64", "67", "73", "75", "78", "86",
             "91", "95", "97", "99", "J2", "L4", "L9", "MN", "MP", "NJ", "S2"],
    "LUSC": ["18", "21", "22", "33", "34", "37", "39", "43", "46", "51", "56", "58", "60",
             "63", "66", "68", "70", "77", "85", "90", "92", "94", "96", "98", "NC", "O2"],
}
# Mean log-weight of each non-tumour tissue type in a slide's composition.
_TISSUE_LOGW = np.array([0.8, 0.6, 0.0, -0.8, -1.0, -1.3])


def _settings(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    settings = {**KNOBS, **PRESETS[preset]}  # a preset may set knobs of its own (demo)
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(f"unknown synthetic-cohort setting(s) {unknown}; expected some of {sorted(settings)}")
    for key, value in overrides.items():
        settings[key] = type(settings[key])(value)
    if not 1 <= settings["min_patches"] <= settings["max_patches"]:
        raise ValueError(
            f"need 1 <= min_patches <= max_patches, got {settings['min_patches']}, {settings['max_patches']}"
        )
    if settings["n_patients"] < 2:
        raise ValueError(f"n_patients must be >= 2 (one per class), got {settings['n_patients']}")
    if settings["n_genes"] < len(MARKER_GENES) + 4 * settings["n_modules"]:
        raise ValueError(f"n_genes={settings['n_genes']} is too small for n_modules={settings['n_modules']}")
    if not 0 < settings["min_tumour_fraction"] <= settings["max_tumour_fraction"] <= 1:
        raise ValueError("need 0 < min_tumour_fraction <= max_tumour_fraction <= 1")
    return settings


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *keys])


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """A standardised Gaussian random field; the leading axis (if 3-d) indexes fields."""
    z = rng.standard_normal(shape).astype(np.float32)
    sig = (0.0, sigma, sigma) if len(shape) == 3 else sigma
    f = gaussian_filter(z, sigma=sig, mode="reflect")
    axes = (-2, -1)
    f -= f.mean(axis=axes, keepdims=True)
    f /= f.std(axis=axes, keepdims=True) + 1e-6
    return f


# --------------------------------------------------------------------------- the "world"
def _world(seed: int, settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """Cohort-wide feature prototypes and site effects."""
    rng = _rng(seed, 0)
    scale = rng.gamma(2.0, 0.2, FEAT_DIM).astype(np.float32)  # per-dimension scale
    others = scale * np.exp(0.6 * rng.standard_normal((len(TISSUE_TYPES), FEAT_DIM)))
    tumour = scale * np.exp(0.6 * rng.standard_normal(FEAT_DIM))
    direction = 0.35 * settings["tumour_contrast"] * rng.standard_normal(FEAT_DIM)
    protos = np.vstack([others, tumour * np.exp(-direction), tumour * np.exp(direction)])
    sites = _SITES["LUAD"] + _SITES["LUSC"]
    site_gain = np.exp(0.15 * settings["site_effect"] * rng.standard_normal((len(sites), FEAT_DIM)))
    site_shift = 0.05 * settings["site_effect"] * scale * rng.standard_normal((len(sites), FEAT_DIM))
    # Uneven site sizes, as in TCGA (a few sites submitted most cases).
    site_weight = rng.pareto(1.5, len(sites)) + 0.2
    return dict(
        scale=scale,
        protos=protos.astype(np.float32),  # (6 + 2, D): tissue types, LUAD-like, LUSC-like tumour
        sites=np.array(sites),
        site_gain=site_gain.astype(np.float32),
        site_shift=site_shift.astype(np.float32),
        site_weight=site_weight,
    )


# ------------------------------------------------------------------------------ patients
def _patients(seed: int, settings: dict[str, Any], world: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = _rng(seed, 1)
    n = settings["n_patients"]
    n_lusc = min(n - 1, max(1, int(round(n * settings["frac_lusc"]))))
    y = np.zeros(n, dtype=int)
    y[rng.permutation(n)[:n_lusc]] = 1
    sign = 2 * y - 1

    sites, weights = list(world["sites"]), world["site_weight"]
    n_luad_sites = len(_SITES["LUAD"])
    site = []
    for label in y:
        own = rng.random() < settings["site_label_purity"]
        pool = np.arange(n_luad_sites) if (label == 0) == own else np.arange(n_luad_sites, len(sites))
        w = weights[pool] / weights[pool].sum()
        site.append(sites[rng.choice(pool, p=w)])

    alphabet = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    case_ids, seen = [], set()
    for code in site:
        while True:
            tail = "".join(rng.choice(alphabet, 4))
            cid = f"TCGA-{code}-{tail}"
            if cid not in seen:
                seen.add(cid)
                case_ids.append(cid)
                break

    lo, hi = settings["min_tumour_fraction"], settings["max_tumour_fraction"]
    pi = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
    purity = np.clip(0.2 + 1.2 * pi + 0.05 * rng.standard_normal(n), 0.1, 0.95)
    r = settings["latent_corr"]
    e_img = rng.standard_normal(n)
    e_gene = r * e_img + math.sqrt(max(0.0, 1 - r * r)) * rng.standard_normal(n)
    patients = pd.DataFrame(
        dict(
            case_id=case_ids,
            label=[LABEL_NAMES[k] for k in y],
            y=y,
            site=site,
            latent_tumour_content=pi,
            purity=purity,
            image_phenotype=sign * settings["image_signal"] + e_img,
            gene_phenotype=sign * settings["gene_signal"] + e_gene,
        )
    )

    rows = []
    n_slides = 1 + (rng.random(n) < settings["frac_two_slides"])
    lmin, lmax = math.log(settings["min_patches"]), math.log(settings["max_patches"])
    for p in range(n):
        for k in range(n_slides[p]):
            n_patches = int(round(math.exp(rng.uniform(lmin, lmax))))
            n_patches = min(max(n_patches, settings["min_patches"]), settings["max_patches"])
            tf = float(np.clip(pi[p] * math.exp(0.2 * rng.standard_normal()), lo, hi))
            n_regions = 1 if n_patches < 48 else int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
            rows.append(
                dict(
                    slide_id=f"{case_ids[p]}-01Z-00-DX{k + 1}",
                    case_id=case_ids[p],
                    label=patients.label[p],
                    site=site[p],
                    n_patches=n_patches,
                    n_regions=n_regions,
                    target_tumour_fraction=tf,
                )
            )
    slides = pd.DataFrame(rows)
    order = np.argsort(patients.case_id.to_numpy(), kind="stable")
    patients = patients.iloc[order].reset_index(drop=True)
    slides = slides.sort_values("slide_id", kind="stable").reset_index(drop=True)
    return patients, slides


# -------------------------------------------------------------------------------- slides
def _region(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``n`` grid cells forming one tissue blob; (rows, cols) in CLAM order (x outer, y inner)."""
    aspect = math.exp(rng.uniform(-0.5, 0.5))
    area = 1.8 * n + 16
    h = max(3, math.ceil(math.sqrt(area * aspect)))
    w = max(3, math.ceil(area / h))
    yy, xx = np.mgrid[0:h, 0:w]
    r2 = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2
    score = -r2 + 0.6 * _smooth(rng, (h, w), max(1.0, min(h, w) / 6))
    idx = np.argpartition(-score.ravel(), n - 1)[:n]
    rows, cols = np.divmod(idx, w)
    order = np.lexsort((rows, cols))  # primary key x (cols), then y (rows)
    return rows[order], cols[order], (h, w)


def _slide_layout(seed: int, index: int, slide: dict, patient: pd.Series, settings: dict[str, Any]):
    """Coords (N, 2) and tissue weights (N, 8) of one slide, plus its realised tumour fraction."""
    rng = _rng(seed, 2, index)
    n = int(slide["n_patches"])
    shares = rng.dirichlet(np.full(slide["n_regions"], 3.0))
    sizes = np.maximum(1, np.floor(shares * n).astype(int))
    sizes[0] += n - sizes.sum()
    if sizes[0] < 1:  # tiny bag with several regions: fall back to one
        sizes = np.array([n])

    coords, fields = [], []
    x_cursor = int(rng.integers(1_000, 20_000))
    for size in sizes:
        rows, cols, (h, w) = _region(rng, int(size))
        y0 = int(rng.integers(1_000, 30_000))
        # fields: 6 tissue types, tumour, phenotype heterogeneity
        f = _smooth(rng, (len(TISSUE_TYPES) + 2, h, w), settings["smoothness"])
        coords.append(np.stack([x_cursor + PATCH_SIZE * cols, y0 + PATCH_SIZE * rows], axis=1))
        fields.append(f[:, rows, cols].T)
        x_cursor += PATCH_SIZE * w + int(rng.integers(2_000, 12_000))
    coords = np.concatenate(coords).astype(np.int64)
    fields = np.concatenate(fields).astype(np.float32)  # (N, 8)

    # Slide composition; LUSC leans a little to necrosis, LUAD to alveolar space.
    lusc = patient["y"] == 1
    logw = _TISSUE_LOGW + 0.6 * rng.standard_normal(len(TISSUE_TYPES))
    logw[3] += 0.25 if lusc else 0.0
    logw[1] += 0.0 if lusc else 0.25
    scores = (fields[:, : len(TISSUE_TYPES)] + logw) / 0.35
    soft = np.exp(scores - scores.max(axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)

    lo, hi = settings["min_tumour_fraction"], settings["max_tumour_fraction"]
    k = int(round(slide["target_tumour_fraction"] * n))
    k = max(1, min(max(k, math.ceil(lo * n)), math.floor(hi * n)))  # realised share stays in range
    tumour = np.zeros(n, dtype=bool)
    tumour[np.argpartition(-fields[:, 6], k - 1)[:k]] = True
    w_t = np.where(tumour, 0.85, 0.0).astype(np.float32)
    q = 1.0 / (1.0 + np.exp(-(patient["image_phenotype"] + settings["heterogeneity"] * fields[:, 7])))
    weights = np.concatenate(
        [(1 - w_t)[:, None] * soft, (w_t * (1 - q))[:, None], (w_t * q)[:, None]], axis=1
    ).astype(np.float32)
    return coords, weights, dict(tumour_fraction=float(tumour.mean()), region_sizes=sizes.tolist()), rng


def _feature_blocks(seed: int, index: int, weights: np.ndarray, gain: np.ndarray, shift: np.ndarray,
                    world: dict[str, np.ndarray], settings: dict[str, Any]):
    """Yield (start, feats) row blocks of one slide; each block has its own RNG stream."""
    noise_scale = (settings["patch_noise"] * world["scale"]).astype(np.float32)
    protos = world["protos"] * gain  # stain/batch gain folded into the prototypes
    for b, start in enumerate(range(0, len(weights), _NOISE_BLOCK)):
        w = weights[start : start + _NOISE_BLOCK]
        x = w @ protos
        x += shift
        noise = _rng(seed, 3, index, b).standard_normal(x.shape, dtype=np.float32)
        noise *= noise_scale
        x += noise
        np.maximum(x, 0.0, out=x)
        yield start, x


def _write_slide(path: Path, seed: int, index: int, slide: dict, patient: pd.Series,
                 world: dict[str, np.ndarray], settings: dict[str, Any]) -> dict[str, Any]:
    coords, weights, facts, rng = _slide_layout(seed, index, slide, patient, settings)
    s = int(np.flatnonzero(world["sites"] == slide["site"])[0])
    gain = (world["site_gain"][s] * np.exp(0.03 * rng.standard_normal(FEAT_DIM))).astype(np.float32)
    shift = world["site_shift"][s]
    n = len(coords)
    # CLAM's patching attributes; the "slide" extends a margin beyond its outermost patch.
    level_dim = tuple(int(v) for v in coords.max(0) + PATCH_SIZE + 1_000)
    attrs = dict(patch_size=PATCH_SIZE, patch_level=0, downsample=np.array([1.0, 1.0]),
                 level_dim=level_dim, downsampled_level_dim=level_dim, name=slide["slide_id"],
                 synthetic=True)
    blocks = _feature_blocks(seed, index, weights, gain, shift, world, settings)
    if n <= settings["chunk_rows"]:
        write_bag(path, np.concatenate([x for _, x in blocks]), coords, attrs=attrs)
    else:  # stream: memory stays at one block, layout as write_bag's
        with h5py.File(path, "w") as f:
            rows = min(1024, n)
            feats = f.create_dataset("features", shape=(n, FEAT_DIM), dtype="float32",
                                     maxshape=(None, FEAT_DIM), chunks=(rows, FEAT_DIM))
            ds = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=(rows, 2))
            for key, value in attrs.items():
                ds.attrs[key] = value
            for start, x in blocks:
                feats[start : start + len(x)] = x
    return dict(facts, tumour_fraction=round(facts["tumour_fraction"], 6), n_patches=n)


def tumour_masks(cohort_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Which patches of a synthetic cohort's slides are tumour: the ground truth that real
    data never has, for checking attention maps (e.g. attention-vs-tumour AUC per slide).

    Nothing extra is stored in the cohort: the generator's layout of each slide is a pure
    function of the seed, the slide's index and its facts in ``cohort.json``, so the mask
    is drawn again here, row for row in the order of the slide's ``.h5`` file, and checked
    against the realised tumour fraction and patch count recorded at generation.

    Args:
        cohort_dir: a folder written by :func:`generate_cohort` (``gimp-synth``).
        slide_ids: the slides to return (default: all).

    Returns:
        ``{slide_id: (N,) bool}``, True for a tumour patch (tumour weight 0.85 in its mix;
        the class evidence of the synthetic cohort lives there).

    Raises:
        DataError: the folder is not a synthetic cohort (no ``cohort.json`` from this
            generator), was written by another format version, names an unknown slide, or
            the redrawn mask disagrees with the recorded facts.
    """
    cohort_dir = Path(cohort_dir)
    meta_path = cohort_dir / "cohort.json"
    if not meta_path.is_file():
        raise DataError(f"{cohort_dir}: no cohort.json; tumour masks exist only for synthetic cohorts (gimp-synth)")
    meta = load_json(meta_path)
    if meta.get("generator") != "gimplib.data.synthetic":
        raise DataError(f"{meta_path}: not written by gimplib.data.synthetic; it has no tumour ground truth")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{meta_path}: format version {meta.get('format_version')!r}, this code draws version "
                        f"{FORMAT_VERSION}; regenerate the cohort (gimp-synth --overwrite)")
    settings = {**_settings(meta["preset"], {}), **meta["settings"]}
    seed = int(meta["seed"])
    patients = {p["case_id"]: p for p in meta["patients"]}
    index_of = {sl["slide_id"]: i for i, sl in enumerate(meta["slides"])}
    wanted = list(index_of) if slide_ids is None else list(slide_ids)
    unknown = [sid for sid in wanted if sid not in index_of]
    if unknown:
        raise DataError(f"{meta_path}: no slide(s) {unknown[:5]} in this cohort")
    out = {}
    for sid in wanted:
        index = index_of[sid]
        slide = meta["slides"][index]
        patient = pd.Series({**patients[slide["case_id"]], "y": LABEL_NAMES.index(slide["label"])})
        _, weights, facts, _ = _slide_layout(seed, index, slide, patient, settings)
        mask = weights[:, len(TISSUE_TYPES):].sum(axis=1) > 0
        if len(mask) != int(slide["n_patches"]) or abs(float(mask.mean()) - float(slide["tumour_fraction"])) > 1e-5:
            raise DataError(f"{meta_path}: slide {sid}: the redrawn tumour mask ({len(mask)} patches, fraction "
                            f"{mask.mean():.6f}) disagrees with the recorded {slide['n_patches']} patches, fraction "
                            f"{slide['tumour_fraction']}; was the cohort written by another version of this code?")
        out[sid] = mask
    return out


# --------------------------------------------------------------------------------- genes
def _genes(seed: int, settings: dict[str, Any], patients: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """FPKM-like table (n_patients, n_genes) and the gene id -> symbol map."""
    rng = _rng(seed, 4)
    n, g = len(patients), settings["n_genes"]
    n_syn = g - len(MARKER_GENES)
    ids = list(MARKER_GENES) + [f"ENSG99{i:09d}" for i in range(n_syn)]
    symbols = [s for s, _ in MARKER_GENES.values()] + [f"SYNG{i:05d}" for i in range(n_syn)]

    # Baseline log-expression, calibrated on real GDC HTSeq-FPKM files (~45% zeros, median
    # ~0.04, 90th percentile ~7, 99th ~60-80): ~40% of genes barely expressed, the rest log-normal.
    off = rng.random(g) < 0.4
    mu = np.where(off, rng.normal(-3.0, 1.2, g), rng.normal(0.5, 1.6, g)).astype(np.float32)
    # Modules: module 0 = LUSC programme, 1 = LUAD programme, 2 = immune/stroma, rest generic.
    m = settings["n_modules"]
    module = np.full(g, -1)
    in_modules = rng.permutation(np.arange(len(MARKER_GENES), g))[: int(0.3 * n_syn)]
    # Each class programme holds ~3% of the genes; the other modules share the rest.
    n_prog = max(4, int(0.03 * g))
    rest = len(in_modules) - 2 * n_prog
    sizes = np.maximum(4, np.round(rng.dirichlet(np.full(m - 2, 2.0)) * rest).astype(int))
    sizes = np.concatenate([[n_prog, n_prog], sizes])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for k in range(m):
        module[in_modules[bounds[k] : bounds[k + 1]]] = k
    for i, (_, prog) in enumerate(MARKER_GENES.values()):
        module[i] = 0 if prog == "LUSC" else 1
        mu[i] = rng.uniform(2.5, 4.0)  # markers are well expressed where on
    expressed = module >= 0
    mu[expressed] = np.maximum(mu[expressed], rng.normal(1.0, 1.0, expressed.sum()))
    loading = rng.uniform(0.4, 1.0, g).astype(np.float32)
    loading[(module == 0) | (module == 1)] *= 0.5  # programmes co-vary mostly through purity * phenotype
    amp = rng.uniform(0.6, 1.4, g).astype(np.float32)
    amp[: len(MARKER_GENES)] = 2.0

    factors = rng.standard_normal((n, m)).astype(np.float32)
    purity = patients.purity.to_numpy(np.float32)[:, None]
    u = patients.gene_phenotype.to_numpy(np.float32)[:, None]
    logx = np.repeat(mu[None, :], n, axis=0)
    logx += settings["gene_noise"] * rng.standard_normal((n, g), dtype=np.float32)
    cols = np.flatnonzero(expressed)
    logx[:, cols] += loading[cols] * factors[:, module[cols]]
    for k, direction in ((0, 1.0), (1, -1.0)):
        c = np.flatnonzero(module == k)
        logx[:, c] += direction * amp[c] * purity * u
    c = np.flatnonzero(module == 2)
    logx[:, c] += amp[c] * (1.0 - purity)  # normal-tissue content

    # FPKM: exp(logx) - 1, with dropout that is likelier the lower the expression.
    p_zero = 1.0 / (1.0 + np.exp(3.0 * (logx + 0.5), dtype=np.float32))
    fpkm = np.where(rng.random((n, g), dtype=np.float32) < p_zero, 0.0, np.maximum(np.expm1(logx), 0.0))
    fpkm = fpkm.astype(np.float32, copy=False)
    table = pd.DataFrame(fpkm, index=pd.Index(patients.case_id, name="case_id"), columns=ids)
    symbol_map = pd.DataFrame(dict(gene_id=ids, gene_symbol=symbols))
    summary = dict(
        modules={int(k): ids_k for k in range(m) if (ids_k := [ids[i] for i in np.flatnonzero(module == k)])},
        programmes={"LUSC": 0, "LUAD": 1, "normal_tissue": 2},
        zero_fraction=float((fpkm == 0).mean()),
    )
    return table, symbol_map, summary


# ----------------------------------------------------------------------------- the cohort
def _request(preset: str, seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    return dict(
        preset=preset,
        seed=int(seed),
        settings={k: v for k, v in settings.items() if k not in _NOT_CONTENT},
        format_version=FORMAT_VERSION,
    )


#: The file gimp-synth writes into every cohort it makes; ``overwrite`` removes only such folders.
MARKER = ".gimp-synth"
#: Everything gimp-synth writes into a cohort folder (anything else there is the user's).
_OWN_FILES = {MARKER, "cohort.json", "dataset.csv", "genes.parquet", "gene_symbols.csv", "h5_files"}


def _check_own(out_dir: Path) -> None:
    """Refuse to replace a folder this tool did not write, or one holding anything else."""
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; gimp-synth replaces only cohorts it wrote. "
                        "Choose another folder.")
    if not (out_dir / MARKER).is_file():
        raise DataError(f"{out_dir}: not a cohort written by gimp-synth (no {MARKER} file); it may hold real "
                        "data, so it is never replaced. Choose another folder.")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OWN_FILES)
    foreign += sorted(f"h5_files/{p.name}" for p in (out_dir / "h5_files").glob("*") if p.suffix != ".h5") \
        if (out_dir / "h5_files").is_dir() else []
    if foreign:
        raise DataError(f"{out_dir}: a gimp-synth cohort that now also holds {foreign[:5]}"
                        f"{' ...' if len(foreign) > 5 else ''}, which gimp-synth did not write; it is not "
                        "replaced. Move those files out, or choose another folder.")


def _matches(out_dir: Path, request: dict[str, Any]) -> tuple[bool, str]:
    meta = out_dir / "cohort.json"
    if not meta.exists():
        return False, f"{out_dir} exists but holds no cohort.json (not a synthetic cohort)"
    try:
        found = load_json(meta)
    except (OSError, json.JSONDecodeError) as err:
        return False, f"{meta}: unreadable ({err})"
    have = {k: found.get(k) for k in ("preset", "seed", "format_version")}
    have["settings"] = {k: v for k, v in found.get("settings", {}).items() if k not in _NOT_CONTENT}
    diffs = [f"{k}: {have[k]!r} != requested {request[k]!r}" for k in ("preset", "seed", "format_version")
             if have[k] != request[k]]
    a, b = have["settings"], request["settings"]
    diffs += [f"{k}: {a.get(k)!r} != requested {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return (not diffs), "; ".join(diffs)


def generate_cohort(
    out_dir: str | os.PathLike,
    *,
    preset: str = "demo",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **overrides: Any,
) -> Path:
    """Write (or reuse) a synthetic TCGA-like NSCLC cohort in CLAM's folder layout.

    The folder gets ``dataset.csv`` (case_id, slide_id, label in {LUAD, LUSC}),
    ``h5_files/<slide_id>.h5`` (``features`` (N, 1024) float32 >= 0, ``coords`` (N, 2)
    int64 level-0 x, y with CLAM's ``patch_size``/``patch_level`` attributes),
    ``genes.parquet`` (index case_id, one FPKM column per Ensembl gene id),
    ``gene_symbols.csv`` (gene_id, gene_symbol) and ``cohort.json`` (preset, seed, every
    setting, the gene modules, and each patient's and slide's latent facts: site, purity,
    phenotypes, tumour fraction). It is built in a temporary folder beside ``out_dir`` and
    renamed into place, so a half-written cohort is never visible.

    Args:
        out_dir: destination folder.
        preset: ``"smoke"``, ``"demo"`` or ``"paper"`` (see :data:`PRESETS`).
        seed: the same seed and settings give identical files.
        overwrite: replace an existing folder. Without it an existing cohort with the
            same settings is reused and one with other settings is an error.
        progress: show a tqdm bar over slides.
        **overrides: any preset size or :data:`KNOBS` entry, e.g. ``n_patients=40``.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    settings = _settings(preset, overrides)
    request = _request(preset, seed, settings)
    if out_dir.exists() and not overwrite:
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            ok, why = _matches(out_dir, request)
            if ok:
                return out_dir
            if not (out_dir / MARKER).is_file():
                raise DataError(f"{out_dir}: exists and is not a cohort written by gimp-synth ({why}); "
                                "choose another folder")
            raise DataError(
                f"{out_dir}: holds a different cohort ({why}), also written by gimp-synth; replace it with overwrite=True "
                "(gimp-synth --overwrite), or choose another folder"
            )
    if out_dir.exists() and overwrite:
        _check_own(out_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700: colleagues in a shared folder could not read it
    try:
        _build(tmp, seed, settings, request, progress)
        _install(tmp, out_dir, request, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _build(tmp: Path, seed: int, settings: dict[str, Any], request: dict[str, Any], progress: bool) -> None:
    world = _world(seed, settings)
    patients, slides = _patients(seed, settings, world)
    by_case = patients.set_index("case_id")
    (tmp / "h5_files").mkdir()
    facts = []
    bar = tqdm(slides.to_dict("records"), desc=f"synthetic cohort ({request['preset']})",
               unit="slide", disable=not progress)
    for index, slide in enumerate(bar):
        patient = by_case.loc[slide["case_id"]]
        info = _write_slide(tmp / "h5_files" / f"{slide['slide_id']}.h5", seed, index, slide,
                            patient, world, settings)
        facts.append({**slide, **info})
    slides[["case_id", "slide_id", "label"]].to_csv(tmp / "dataset.csv", index=False)

    table, symbols, gene_summary = _genes(seed, settings, patients)
    table.to_parquet(tmp / "genes.parquet")
    symbols.to_csv(tmp / "gene_symbols.csv", index=False)

    round6 = lambda v: round(float(v), 6) if isinstance(v, (float, np.floating)) else v  # noqa: E731
    meta = dict(
        request,
        generator="gimplib.data.synthetic",
        label_names=LABEL_NAMES,
        feat_dim=FEAT_DIM,
        n_patients=len(patients),
        n_slides=len(slides),
        marker_genes={k: dict(symbol=s, programme=p) for k, (s, p) in MARKER_GENES.items()},
        gene_modules=gene_summary,
        patients=[{k: round6(v) for k, v in r.items()} for r in patients.drop(columns="y").to_dict("records")],
        slides=[{k: round6(v) for k, v in r.items()} for r in facts],
    )
    save_json(tmp / "cohort.json", meta)
    (tmp / MARKER).write_text("written by gimplib.data.synthetic (gimp-synth); overwrite removes only such folders\n")


def _install(tmp: Path, out_dir: Path, request: dict[str, Any], overwrite: bool) -> None:
    trash = None
    if out_dir.exists() and overwrite:
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, trash)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        # Someone else installed a cohort meanwhile: keep theirs if it is the same one.
        ok, why = _matches(out_dir, request)
        if not ok:
            raise DataError(f"{out_dir}: appeared while generating and differs ({why})") from None
        shutil.rmtree(tmp, ignore_errors=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``gimp-synth``: write a synthetic cohort folder."""
    parser = argparse.ArgumentParser(prog="gimp-synth", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="destination cohort folder")
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="size preset (default demo)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed and settings give identical files (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing cohort written by gimp-synth (one with its {MARKER} file and "
                             "nothing else); any other folder is refused (default: off)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: shown)")
    knobs = {**PRESETS["demo"], **KNOBS}
    group = parser.add_argument_group("settings (default: the preset's)")
    for key, value in knobs.items():
        group.add_argument(f"--{key.replace('_', '-')}", dest=key, type=type(value), default=None,
                           help=f"default: the preset's (demo: {value!r})")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in knobs if getattr(args, k) is not None}
    try:
        path = generate_cohort(args.out_dir, preset=args.preset, seed=args.seed,
                               overwrite=args.overwrite, progress=not args.quiet, **overrides)
    except (DataError, ValueError) as err:
        print(f"gimp-synth: error: {err}", file=sys.stderr)
        return 2
    meta = load_json(path / "cohort.json")
    print(json.dumps(dict(out_dir=str(path), preset=meta["preset"], seed=meta["seed"],
                          n_patients=meta["n_patients"], n_slides=meta["n_slides"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
