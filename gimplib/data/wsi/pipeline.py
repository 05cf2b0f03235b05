"""Slides to a CLAM cohort folder: segment, patch, embed; one slide or a folder, resumable.

Output layout (``out_dir``)::

    masks/<slide_id>.png       tissue mask (255 = tissue) at the segmentation scale
    patches/<slide_id>.h5      'coords' (n, 2) with CLAM's attributes (create_patches_fp.py)
    h5_files/<slide_id>.h5     'features' (n, 1024) + 'coords' (extract_features_fp.py)
    pt_files/<slide_id>.pt     (n, 1024) tensor
    extract_settings.json      the settings every bag in the folder was made with
    extract_status.csv         slide_id, status, n_patches, seconds, error, path
    dataset.csv                case_id, slide_id, label   (when a labels table is given)
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from gimplib.data.bags import bag_info, write_bag, write_bag_pt
from gimplib.data.barcode import patient_id
from gimplib.data.wsi.clam import ClamParams, clam_patch_grid
from gimplib.data.wsi.patching import PatchGrid, patch_footprint, patch_grid, read_patches_h5, write_patches_h5
from gimplib.data.wsi.slide import open_slide, read_slide_info, resolve_magnification, slide_id_of
from gimplib.data.wsi.tissue import TissueMask, TissueParams, slide_tissue_mask
from gimplib.utils import DataError, atomic_path, load_json, save_json

__all__ = [
    "SLIDE_EXTENSIONS",
    "EXTRACT_MODES",
    "ExtractConfig",
    "find_slides",
    "process_slide",
    "process_slides",
    "config_from_settings",
    "encoder_identity",
    "update_dataset_csv",
]

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
STATUS_COLUMNS = ["slide_id", "status", "n_patches", "seconds", "error", "path"]
EXTRACT_MODES = ("clam", "field")
# Settings that change what is in a bag; a folder must not mix bags that differ in them.
RESULT_KEYS = (
    "mode",
    "clam",
    "patch_level",
    "patch_size",
    "step_size",
    "target_magnification",
    "slide_magnification",
    "min_tissue",
    "tissue",
    "features",
    "encoder",
    "out_size",
    "half",
    "max_patches",
    "encoder_name",
    "weights_sha256",
)
# Keys added after the first folders were written: a settings file without them is not a mismatch.
LATER_KEYS = {"encoder_name": "resnet50_trunc", "weights_sha256": None}


@dataclass
class ExtractConfig:
    """Settings of :func:`process_slides` (recorded in ``extract_settings.json``).

    Two modes lay the patches. ``"clam"`` (the default, as the paper follows CLAM) gives
    the coordinates CLAM's ``create_patches_fp.py`` gives with the same settings: CLAM's
    contours and per-contour grid, ``patch_size`` read at ``patch_level`` whatever the
    scanner's magnification. ``"field"`` cuts a fixed field of view, ``patch_size`` at
    ``target_magnification`` (20x by default) on every slide, for cohorts that mix 20x and
    40x scans; it reads the scale from the metadata.

    Attributes:
        mode: ``"clam"`` or ``"field"``.
        clam: CLAM's segmentation and patching settings (clam mode; default its TCGA
            preset, see :meth:`ClamParams.from_preset`).
        patch_level: pyramid level the patches are read at (clam mode).
        patch_size: patch side: at ``patch_level`` (clam mode) or at the target
            magnification (field mode); CLAM: 256.
        step_size: grid step in the same pixels (None = patch_size, no overlap).
        target_magnification: magnification of the patches (field mode; 20 for 20x).
        slide_magnification: level-0 magnification of every slide, overriding metadata
            (field mode; needed only for slides with neither objective power nor mpp).
        min_tissue: minimum tissue fraction of a kept patch (field mode).
        tissue: segmentation settings (field mode).
        features: embed the patches (False: masks and patches h5 only).
        encoder_name: the patch encoder: ``"resnet50_trunc"`` (CLAM's, 1024-d) or a
            foundation model of :data:`~gimplib.data.wsi.encoders.ENCODERS` (``uni_v1``,
            ``uni_v2``, ``virchow2``, ``gigapath``, ``hoptimus0``).
        weights: the encoder's weights file; None = torchvision's cache (resnet50_trunc
            only; the foundation models need the file downloaded from their model card).
        random_weights: random encoder (tests, timing); features are meaningless.
        seed: seed of the random encoder and of ``max_patches`` (evenly spaced, no RNG).
        out_size: ResNet50-trunc's input side, CLAM's ``target_patch_size`` (224; None = no
            resize, as CLAM before April 2024). The foundation models resize as their model
            cards say (recorded as ``encoder_transform`` in the settings and h5 attributes).
        batch_size: patches per forward pass.
        num_workers: DataLoader workers.
        device: "auto", "cpu", "cuda", ...
        half: float16 autocast on CUDA (default False: float32, as CLAM).
        max_patches: keep at most this many patches per slide, evenly spaced along
            CLAM's order (quick looks; None = all).
    """

    mode: str = "clam"
    clam: ClamParams = field(default_factory=ClamParams)
    patch_level: int = 0
    patch_size: int = 256
    step_size: int | None = None
    target_magnification: float = 20.0
    slide_magnification: float | None = None
    min_tissue: float = 0.25
    tissue: TissueParams = field(default_factory=TissueParams)
    features: bool = True
    encoder_name: str = "resnet50_trunc"
    weights: str | None = None
    random_weights: bool = False
    seed: int = 0
    out_size: int | None = 224
    batch_size: int = 64
    num_workers: int = 0
    device: str = "auto"
    half: bool = False
    max_patches: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in EXTRACT_MODES:
            raise DataError(f"extraction settings: mode={self.mode!r}; expected one of {EXTRACT_MODES}")
        if isinstance(self.clam, str):
            self.clam = ClamParams.from_preset(self.clam)
        if self.patch_size < 1 or (self.step_size is not None and self.step_size < 1) or self.patch_level < 0:
            raise DataError(
                f"extraction settings: patch_size={self.patch_size}, step_size={self.step_size}, "
                f"patch_level={self.patch_level}; expected sizes >= 1 and a level >= 0"
            )
        from gimplib.data.wsi.encoders import encoder_spec

        self.encoder_name = encoder_spec(self.encoder_name).name  # unknown names fail here
        if self.out_size is not None and self.out_size < 1:
            raise DataError(f"extraction settings: out_size={self.out_size}; expected a side >= 1 or None (no resize)")


def find_slides(source: str | os.PathLike | Iterable[str | os.PathLike], extensions: Iterable[str] = SLIDE_EXTENSIONS) -> list[Path]:
    """Slide files in a folder (not recursive, sorted), or the given file(s)."""
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if source.is_file():
            return [source]
        if not source.is_dir():
            raise DataError(f"{source}: no such slide file or folder")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        slides = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in exts)
        if not slides:
            raise DataError(f"{source}: no slide files with extensions {sorted(exts)}")
        return slides
    return [Path(p) for p in source]


def _subsample(n: int, k: int | None) -> np.ndarray:
    if k is None or n <= k:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def process_slide(
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: ExtractConfig | None = None,
    *,
    encoder: Any = None,
    encoder_attrs: dict | None = None,
    progress: bool = False,
) -> dict:
    """Segment, patch and (optionally) embed one slide into ``out_dir``.

    Args:
        slide_path: the slide.
        out_dir: the cohort folder (sub-folders are created).
        config: settings.
        encoder: a built encoder (:func:`build_encoder`); built from ``config`` when None.
        encoder_attrs: the encoder's identity for the h5 attributes (:func:`encoder_identity`);
            computed from ``config`` when None. The file itself also records ``encoder`` and
            ``encoder_weights`` (``"random"`` or ``"sha256:<hex>"``), which :func:`bag_encoder`
            reads and every stage warns about when random.
        progress: tqdm bar over the slide's patches (patches/s and time left).

    Returns:
        ``dict(slide_id, n_patches, seconds, patch_level, patch_size, tissue_fraction)``.

    Raises:
        DataError: naming the slide (unreadable, no scale, no tissue, ...). Nothing is
            left half-written: each output file is written atomically.
    """
    config = config or ExtractConfig()
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    start = time.perf_counter()
    grid, tissue, why_empty = (_clam_grid if config.mode == "clam" else _field_grid)(slide_path, config)
    sid = slide_id_of(slide_path)
    tissue.save_png(out_dir / "masks" / f"{sid}.png")  # also for a slide without patches: to see why
    if len(grid) == 0:
        raise DataError(why_empty)
    grid.subset(_subsample(len(grid), config.max_patches))
    write_patches_h5(out_dir / "patches" / f"{sid}.h5", grid, sid)
    if config.features:
        from gimplib.data.wsi.features import build_encoder, extract_features

        if encoder is None:
            encoder, _ = build_encoder(name=config.encoder_name, weights=config.weights,
                                       random_weights=config.random_weights, seed=config.seed)
        if encoder_attrs is None:
            encoder_attrs = encoder_identity(config)
        digest = str(encoder_attrs["weights_sha256"])
        encoder_weights = "random" if digest.startswith("random") else f"sha256:{digest}"
        feats = extract_features(
            slide_path,
            grid.coords,
            encoder,
            level=grid.patch_level,
            read_size=grid.patch_size,
            out_size=config.out_size if config.encoder_name == "resnet50_trunc" else None,
            fill="black" if config.mode == "clam" else "white",
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            device=config.device,
            half=config.half,
            progress=progress,
        )
        if not np.isfinite(feats).all():
            raise DataError(f"slide {slide_path}: the encoder produced NaN/inf features")
        attrs = {**grid.attrs(sid, (out_dir / "h5_files").resolve()), **encoder_attrs,
                 "overlap": int(config.patch_size - (config.step_size or config.patch_size))}  # TRIDENT's attribute
        write_bag(
            out_dir / "h5_files" / f"{sid}.h5", feats, grid.coords, attrs=attrs,
            feature_attrs={"encoder": encoder_attrs["encoder"], "name": sid},  # where TRIDENT names its encoder
            coords_dtype="int32" if config.mode == "clam" else "int64",  # CLAM's extract_features_fp.py: int32
            file_attrs={"encoder": encoder_attrs["encoder"], "encoder_weights": encoder_weights},
        )
        write_bag_pt(out_dir / "pt_files" / f"{sid}.pt", feats)
    return {
        "slide_id": sid,
        "n_patches": len(grid),
        "seconds": round(time.perf_counter() - start, 3),
        "patch_level": grid.patch_level,
        "patch_size": grid.patch_size,
        "tissue_fraction": round(tissue.tissue_fraction, 4),
    }


def _clam_grid(slide_path: Path, config: ExtractConfig) -> tuple[PatchGrid, TissueMask, str]:
    slide = open_slide(slide_path)
    try:
        info = read_slide_info(slide, slide_path)
        grid, seg = clam_patch_grid(
            slide, info, config.clam, patch_level=config.patch_level, patch_size=config.patch_size, step_size=config.step_size
        )
    finally:
        slide.close()
    tissue = TissueMask(mask=seg.mask, downsample=seg.seg_downsample, thumbnail=seg.image)
    p = config.clam
    why_empty = (
            f"slide {slide_path}: no patch in CLAM mode ({len(seg.contours)} tissue contour(s) kept at level "
            f"{seg.seg_level}: sthresh={p.sthresh}, a_t={p.a_t:g} x 512^2 level-0 pixels; CLAM writes no "
            "patches file either); expected stained tissue, or lower --a-t / --sthresh (e.g. --a-t 4 --a-h 1 "
            "for a small region), or another --preset"
    )
    return grid, tissue, why_empty


def _field_grid(slide_path: Path, config: ExtractConfig) -> tuple[PatchGrid, TissueMask, str]:
    slide = open_slide(slide_path)
    try:
        info = read_slide_info(slide, slide_path)
        mag, _ = resolve_magnification(info, config.slide_magnification)
        size0 = patch_footprint(config.patch_size, config.target_magnification, mag)
        tissue = slide_tissue_mask(slide, patch_area_level0=float(size0) ** 2, params=config.tissue)
    finally:
        slide.close()
    grid = patch_grid(
        info,
        tissue,
        patch_size=config.patch_size,
        step_size=config.step_size,
        target_magnification=config.target_magnification,
        slide_magnification=config.slide_magnification,
        min_tissue=config.min_tissue,
    )
    why_empty = ""
    if len(grid) == 0:
        from PIL import Image

        sat = np.asarray(Image.fromarray(tissue.thumbnail).convert("HSV"))[..., 1]
        raw = float((sat > config.tissue.sthresh).mean())
        why_empty = (
            f"slide {slide_path}: no tissue patch ({100 * raw:.1f}% of the thumbnail is above the "
            f"saturation threshold, {100 * tissue.tissue_fraction:.1f}% is left after dropping regions "
            f"under a_t={config.tissue.a_t:g} patch footprints, and no {config.patch_size}px patch at "
            f"{config.target_magnification:g}x has >= {config.min_tissue:.0%} tissue); expected stained "
            "tissue, or lower --sthresh / --a-t / --min-tissue"
        )
    return grid, tissue, why_empty


def encoder_identity(config: ExtractConfig) -> dict:
    """The encoder's identity and patch preparation, for the h5 attributes and the settings JSON.

    Returns:
        ``encoder`` (name), ``weights_sha256`` (``random(seed=...)`` for random weights),
        ``feat_dim``, ``resize``, ``normalization``, ``pool``.

    Raises:
        DataError: the weights file is missing (the message says where to get it).
    """
    from gimplib.data.wsi.encoders import encoder_spec
    from gimplib.utils import sha256_file

    spec = encoder_spec(config.encoder_name)
    out = spec.transform_settings()
    if spec.arch == "resnet50_trunc":  # CLAM's: PIL bilinear resize to target_patch_size, ImageNet mean/std
        out["resize"] = f"{config.out_size} px bilinear (PIL)" if config.out_size else "none"
    if config.random_weights:
        out["weights_sha256"] = f"random(seed={config.seed})"
        return out
    if config.weights is not None:
        path = Path(config.weights)
    elif spec.arch == "resnet50_trunc":
        from gimplib.data.wsi.features import default_weights_path

        path = default_weights_path()
    else:
        path = None
    if path is None or not path.is_file():
        raise DataError(
            f"encoder {spec.name}: weights file {path or '(none given)'} not found; download {spec.weights_file} "
            f"from {spec.weights_from} (licence {spec.licence}) and pass its path (--weights), or use "
            "--random-weights for a test run; nothing is downloaded here"
        )
    out["weights_sha256"] = sha256_file(path)
    return out


def config_from_settings(settings: dict | str | os.PathLike, **changes: Any) -> ExtractConfig:
    """The :class:`ExtractConfig` an ``extract_settings.json`` was written with (to extract new slides alike).

    Args:
        settings: the settings dict or the JSON file.
        **changes: fields to replace (runtime ones: ``weights`` when the file moved, ``device``,
            ``batch_size``, ``num_workers``).
    """
    from dataclasses import fields

    if not isinstance(settings, dict):
        settings = load_json(settings)
    names = {f.name for f in fields(ExtractConfig)}
    values = {k: v for k, v in settings.items() if k in names and v is not None}
    if values.get("mode", "clam") == "clam":
        values["clam"] = ClamParams(**{k: (tuple(v) if k.endswith("_ids") else v) for k, v in settings["clam"].items()})
        values.pop("tissue", None)
    else:
        values["tissue"] = TissueParams(**settings["tissue"])
        values.pop("clam", None)
    if settings.get("features") and "out_size" not in values and settings.get("encoder_name", "resnet50_trunc") == "resnet50_trunc":
        values["out_size"] = None  # CLAM before April 2024: no resize
    values.update(changes)
    return ExtractConfig(**values)


def _settings(config: ExtractConfig, encoder_desc: str | None, identity: dict | None = None) -> dict:
    import gimplib

    settings = asdict(config)
    settings["clam"] = config.clam.settings() if config.mode == "clam" else None
    if config.mode == "clam":  # settings of the other mode do not apply; keep them out of the check
        settings.update(tissue=None, min_tissue=None, target_magnification=None, slide_magnification=None)
    else:
        settings["patch_level"] = None
    settings["encoder"] = encoder_desc if config.features else None
    if config.features:
        ident = identity or encoder_identity(config)
        settings["weights_sha256"] = ident["weights_sha256"]
        settings["encoder_transform"] = {k: v for k, v in ident.items() if k not in ("encoder", "weights_sha256")}
        if config.encoder_name != "resnet50_trunc":
            settings["out_size"] = None  # the model card's own resize applies (encoder_transform)
    else:
        settings["encoder_name"] = settings["weights_sha256"] = None
    versions = {"gimplib": gimplib.__version__}
    for mod in ("torch", "torchvision", "openslide"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    settings["versions"] = versions
    return settings


def _check_settings(path: Path, settings: dict) -> None:
    old = load_json(path)
    keys = tuple(k for k in RESULT_KEYS if k in old or k not in LATER_KEYS)
    if old.get("features") is False and settings.get("features"):  # CLAM's two steps: patch, then embed
        keys = tuple(k for k in keys if k not in ("features", "encoder", "encoder_name", "weights_sha256"))
    diff = [k for k in keys if old.get(k) != settings.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
        raise DataError(
            f"{path}: this folder was made with other settings ({detail}); use another output "
            "folder, or redo every slide with overwrite=True (gimp-extract: --overwrite; book runner: "
            "-p overwrite=true)"
        )


def _is_done(out_dir: Path, sid: str, features: bool) -> bool:
    if features:
        return (out_dir / "h5_files" / f"{sid}.h5").is_file() and (out_dir / "pt_files" / f"{sid}.pt").is_file()
    return (out_dir / "patches" / f"{sid}.h5").is_file()


def _write_status(path: Path, rows: list[dict]) -> None:
    from gimplib.data.wsi.shard import shared_file_lock

    new = pd.DataFrame(rows, columns=STATUS_COLUMNS)
    with shared_file_lock(path):  # several workers (--shard) merge their rows into one file
        if path.is_file():
            old = pd.read_csv(path, dtype={"slide_id": str})
            new = pd.concat([old[~old.slide_id.isin(new.slide_id)], new], ignore_index=True)
        with atomic_path(path) as tmp:
            new.to_csv(tmp, index=False)


def process_slides(
    source: str | os.PathLike | Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    config: ExtractConfig | None = None,
    *,
    overwrite: bool = False,
    labels: str | os.PathLike | pd.DataFrame | None = None,
    extensions: Iterable[str] = SLIDE_EXTENSIONS,
    progress: bool = True,
    encoder: Any = None,
    shard: str | tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Turn a folder of slides into a CLAM cohort folder; resumable, one failure does not stop the rest.

    Args:
        source: a folder of slides, one slide file, or a list of slide files.
        out_dir: the cohort folder.
        config: settings (default :class:`ExtractConfig`).
        overwrite: redo slides already done (and accept changed settings).
        labels: a table (csv/tsv path or DataFrame) with ``label`` and ``slide_id`` and/or
            ``case_id``; when given, ``dataset.csv`` is written/updated for every bag.
        extensions: slide file extensions looked for in a folder.
        progress: tqdm bar over slides.
        encoder: an encoder already built for ``config.encoder_name`` (tests use a smaller
            model of the same widths); default: built from ``config``.
        shard: ``"i/n"`` or ``(i, n)``: this worker takes the slides at positions ``i`` modulo
            ``n`` of the slide ids in sorted order (see :mod:`gimplib.data.wsi.shard`). Every
            worker takes a slide through a lock file, so that workers never embed the same slide.

    Returns:
        One row per slide of this call: slide_id, status ("done", "skipped", "failed", or
        "locked": another worker holds it), n_patches, seconds, error, path. The rows other
        than "locked" are merged into ``extract_status.csv``.
    """
    from gimplib.data.wsi.shard import parse_shard, release_slide, shard_items, take_slide
    from tqdm.auto import tqdm

    config = config or ExtractConfig()
    out_dir = Path(out_dir)
    slides = find_slides(source, extensions)
    ids = [slide_id_of(p) for p in slides]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(f"{source}: several slide files share the slide id(s) {dupes}")
    slides = shard_items(slides, ids, parse_shard(shard))
    ids = [slide_id_of(p) for p in slides]
    todo = [p for p, sid in zip(slides, ids) if overwrite or not _is_done(out_dir, sid, config.features)]
    if labels is not None:  # a wrong labels path or slide ids fail now, not after hours of extraction
        table = _read_labels(labels)
        unlabelled = [sid for sid in ids if _label_of(sid, table, {}, {}) is None]
        if unlabelled:
            raise DataError(f"{table['name']}: no label for slide(s) {unlabelled[:5]}"
                            f"{' ...' if len(unlabelled) > 5 else ''} of {source}; expected a row per slide "
                            f"(slide_id column, e.g. {unlabelled[0]!r}) or per patient (case_id column)")
    desc, identity = None, None
    if config.features:
        from gimplib.data.wsi.features import build_encoder, weights_description

        desc = weights_description(weights=config.weights, random_weights=config.random_weights, seed=config.seed)
        identity = encoder_identity(config)  # fails early on a missing weights file
    settings = _settings(config, desc, identity)
    settings_path = out_dir / "extract_settings.json"
    if settings_path.is_file() and not overwrite:
        _check_settings(settings_path, settings)
    if config.features and todo and encoder is None:  # fails early (missing weights) before any slide is touched
        encoder, _ = build_encoder(name=config.encoder_name, weights=config.weights,
                                   random_weights=config.random_weights, seed=config.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if todo or not settings_path.is_file():
        save_json(settings_path, settings)
    status_path = out_dir / "extract_status.csv"
    rows = []
    bar = tqdm(list(zip(slides, ids)), desc="slides", unit="slide", disable=not progress)
    for path, sid in bar:
        bar.set_postfix_str(sid[:40])
        row = {"slide_id": sid, "path": str(path.resolve()), "error": ""}
        if path not in todo:
            if config.features:
                n = bag_info(out_dir / "h5_files" / f"{sid}.h5")[0]
            else:
                n = len(read_patches_h5(out_dir / "patches" / f"{sid}.h5")[0])
            row.update(status="skipped", n_patches=n, seconds=0.0)
            rows.append(row)
            if not _has_status(status_path, sid):  # keep the slide's original status and time on resume
                _write_status(status_path, [{**row, "status": "done", "seconds": float("nan")}])
            continue
        if (lock := take_slide(out_dir, sid)) is None:
            row.update(status="locked", n_patches=0, seconds=0.0, error="another worker holds locks/" + sid + ".lock")
        elif not overwrite and _is_done(out_dir, sid, config.features):  # finished by another worker meanwhile
            release_slide(lock)
            row.update(status="skipped", n_patches=bag_info(out_dir / "h5_files" / f"{sid}.h5")[0]
                       if config.features else len(read_patches_h5(out_dir / "patches" / f"{sid}.h5")[0]), seconds=0.0)
        else:
            start = time.perf_counter()
            try:
                result = process_slide(path, out_dir, config, encoder=encoder, encoder_attrs=identity,
                                       progress=progress)
                row.update(status="done", n_patches=result["n_patches"], seconds=result["seconds"])
            except Exception as err:  # one bad slide must not stop a night's run
                row.update(status="failed", n_patches=0, seconds=round(time.perf_counter() - start, 3), error=str(err))
                tqdm.write(f"failed: {sid}: {err}", file=sys.stderr)
            finally:
                release_slide(lock)
        rows.append(row)
        if row["status"] != "locked":
            _write_status(status_path, [row])
    if labels is not None:
        from gimplib.data.wsi.shard import shared_file_lock

        with shared_file_lock(out_dir / "dataset.csv"):
            update_dataset_csv(out_dir, labels)
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def _has_status(path: Path, sid: str) -> bool:
    if not path.is_file():
        return False
    return sid in set(pd.read_csv(path, dtype={"slide_id": str}).slide_id)


def _read_labels(labels: str | os.PathLike | pd.DataFrame) -> dict:
    """A labels table as lookups; raises :class:`DataError` naming the file when it is unusable."""
    name = "labels table" if isinstance(labels, pd.DataFrame) else str(labels)
    if not isinstance(labels, pd.DataFrame):
        if not Path(labels).is_file():
            raise DataError(f"labels file {labels} not found; expected a csv/tsv with columns label and "
                            "slide_id and/or case_id")
        sep = "\t" if str(labels).endswith((".tsv", ".txt")) else ","
        try:
            labels = pd.read_csv(labels, sep=sep, dtype=str)
        except Exception as err:
            raise DataError(f"{name}: cannot be read as a table ({type(err).__name__}: {err})") from None
    if "label" not in labels or not ({"slide_id", "case_id"} & set(labels.columns)):
        raise DataError(f"{name}: columns {list(labels.columns)}; expected 'label' and 'slide_id' and/or 'case_id'")
    labels = labels.astype(str)
    return {
        "name": name,
        "by_slide": dict(zip(labels.slide_id, labels.label)) if "slide_id" in labels else {},
        "by_case": dict(zip(labels.case_id, labels.label)) if "case_id" in labels else {},
        "case_of_slide": dict(zip(labels.slide_id, labels.case_id)) if {"slide_id", "case_id"} <= set(labels.columns) else {},
    }


def _label_of(sid: str, table: dict, old_case: dict, old_label: dict) -> str | None:
    case = table["case_of_slide"].get(sid) or old_case.get(sid) or patient_id(sid)
    return table["by_slide"].get(sid) or table["by_case"].get(case) or old_label.get(sid)


def update_dataset_csv(out_dir: str | os.PathLike, labels: str | os.PathLike | pd.DataFrame) -> Path:
    """Write ``out_dir/dataset.csv`` (case_id, slide_id, label) for every bag in ``h5_files/``.

    Labels are matched by ``slide_id`` when the table has that column, else by ``case_id``
    (for TCGA slide ids, the first 12 characters, e.g. ``TCGA-05-4244``; otherwise the
    slide id). Rows of an existing dataset.csv keep their label when the table has none.

    Args:
        out_dir: the cohort folder.
        labels: csv/tsv path or DataFrame with ``label`` and ``slide_id`` and/or ``case_id``.

    Returns:
        The path of dataset.csv.

    Raises:
        DataError: naming the labels file when columns are missing or a bag has no label.
    """
    out_dir = Path(out_dir)
    table = _read_labels(labels)
    name = table["name"]
    dataset_path = out_dir / "dataset.csv"
    old = pd.read_csv(dataset_path, dtype=str) if dataset_path.is_file() else pd.DataFrame(columns=["case_id", "slide_id", "label"])
    old_label = dict(zip(old.slide_id, old.label))
    old_case = dict(zip(old.slide_id, old.case_id))
    rows, missing = [], []
    for h5 in sorted((out_dir / "h5_files").glob("*.h5")):
        sid = h5.stem
        case = table["case_of_slide"].get(sid) or old_case.get(sid) or patient_id(sid)
        label = _label_of(sid, table, old_case, old_label)
        if label is None:
            missing.append(sid)
            continue
        rows.append({"case_id": case, "slide_id": sid, "label": label})
    if missing:
        raise DataError(f"{name}: no label for slide(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; expected one per bag in {out_dir / 'h5_files'}")
    with atomic_path(dataset_path) as tmp:
        pd.DataFrame(rows, columns=["case_id", "slide_id", "label"]).to_csv(tmp, index=False)
    return dataset_path
