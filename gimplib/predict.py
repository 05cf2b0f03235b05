"""``gimp-predict``: a trained run applied to new patients.

Input: a run (a fine-tuned GiMP, a compared system of :func:`~gimplib.train.train_baseline`,
or a gene-only classifier of :func:`~gimplib.train.train_gene_encoder`), a folder of bags in
CLAM's layout (``h5_files/`` or ``pt_files/``, e.g. written by ``gimp-extract``), a gene
table when the model reads genes, and optionally a ``dataset.csv`` (case_id, slide_id and,
when known, label). Output, in ``out_dir``:

* ``predictions.csv``: one row per patient: the probability of each class, the predicted
  label, the modalities used, the true label when ``dataset.csv`` gives one, and the
  checkpoint's identity (path and sha256);
* ``predict_info.json``: the run, the checks made, the counts;
* on request, ``heatmaps/<slide_id>.png`` and ``attention/<slide_id>.csv`` (the model's
  attention over each slide's patches, drawn over the slide's thumbnail when the raw slide
  is at hand, on a coordinates canvas otherwise) and ``gene_attributions.csv`` (GroupMSA's
  CLS attention over gene groups).

Refusals (:class:`~gimplib.utils.DataError`, naming what is at fault): bags whose feature
width or patch encoder differ from the run's, patients without expression when the model
reads genes (unless it was fine-tuned with ``modality_dropout``), a gene table that lacks
the model's genes, a pre-training checkpoint (fine-tune it first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from gimplib.utils import DataError, atomic_path, exists, get_device, save_json, sha256_file

__all__ = ["RunInfo", "bag_encoder", "describe_run", "find_bags", "main", "predict", "sha256_file"]

CLASSIFIER_TASKS = ("finetune", "baseline", "genes")
GENE_FILES = ("genes.parquet", "genes.pq", "genes.csv", "genes.tsv", "genes.csv.gz", "genes.tsv.gz")


@dataclass
class RunInfo:
    """What :func:`predict` needs to know about a trained run.

    Attributes:
        checkpoint: the checkpoint file (``best.pt``).
        sha256: its sha256.
        task: ``"finetune"``, ``"baseline"`` or ``"genes"``.
        name: the system (``"gimp"``, a baseline key, or the gene encoder).
        label_names: class names, in logit order.
        in_dim: patch feature width the model was built for (None for a gene-only model).
        reads_image, reads_genes: the modalities the model reads.
        any_modality: fine-tuned with modality dropout (predicts from either modality alone).
        gene_transform: the fitted transform (None when the model reads no genes).
        encoder: identity of the training bags' patch encoder (:func:`bag_encoder`), or None
            when the training bags are not at hand.
        train_data_dir: the training cohort folder recorded in the run's config.
    """

    checkpoint: Path
    sha256: str
    task: str
    name: str
    label_names: list[str]
    in_dim: int | None
    reads_image: bool
    reads_genes: bool
    any_modality: bool
    gene_transform: Any = field(repr=False, default=None)
    encoder: dict[str, Any] | None = None
    train_data_dir: Path | None = None


def _resolve_checkpoint(run: str | os.PathLike) -> Path:
    path = Path(run)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / "best.pt", path / "finetune" / "best.pt"):
            if candidate.is_file():
                return candidate
        raise DataError(f"{path}: no best.pt (nor finetune/best.pt); expected a finished run folder or its checkpoint")
    raise DataError(f"{path}: no such run folder or checkpoint")


def describe_run(run: str | os.PathLike) -> RunInfo:
    """Read a run's checkpoint: its task, classes, input width, modalities and gene transform.

    Args:
        run: a checkpoint (``best.pt``), a run folder holding one, or a
            :func:`~gimplib.train.gimp_pipeline` folder (its ``finetune/best.pt``).

    Raises:
        DataError: the checkpoint is not a classifier (e.g. a pre-training checkpoint).
    """
    from gimplib.train.checkpoint import load_checkpoint
    from gimplib.train.inference import load_gene_transform

    path = _resolve_checkpoint(run)
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    task = cfg.get("task")
    if task not in CLASSIFIER_TASKS:
        hint = " fine-tune it first (gimplib.train.finetune(pretrained_ckpt=...))" if str(task).startswith("pretrain") else ""
        raise DataError(f"{path}: a {task!r} checkpoint is not a classifier;{hint} expected one of {CLASSIFIER_TASKS}")
    if task == "finetune":
        name, in_dim = "gimp", int(cfg["aggregator_kwargs"]["in_dim"])
        reads_genes = exists(cfg.get("gene_encoder"))
    elif task == "baseline":
        name, in_dim = cfg["name"], int(ckpt["build"]["in_dim"])
        reads_genes = exists(cfg.get("gene_transform"))
    else:
        name, in_dim, reads_genes = cfg["encoder"], None, True
    data_dir = cfg.get("cohort", {}).get("data_dir")
    data_dir = Path(data_dir) if data_dir else None
    encoder = bag_encoder(data_dir) if exists(data_dir) and data_dir.is_dir() and task != "genes" else None
    return RunInfo(
        checkpoint=path, sha256=sha256_file(path), task=task, name=name,
        label_names=list(ckpt.get("label_names") or cfg["cohort"]["label_names"]), in_dim=in_dim,
        reads_image=task != "genes", reads_genes=reads_genes, any_modality=bool(cfg.get("modality_dropout")),
        gene_transform=load_gene_transform(path) if reads_genes else None, encoder=encoder, train_data_dir=data_dir,
    )


# --------------------------------------------------------------------------- bags


def bag_encoder(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The patch encoder a folder of bags was made with, as far as its files tell.

    Read, in order: ``extract_settings.json`` (``gimp-extract``: ``encoder_name``,
    ``weights_sha256``, or the older ``encoder`` description), the attributes of the first
    h5 bag (``encoder``, ``weights_sha256``; ``synthetic`` for the synthetic cohort), and a
    TRIDENT folder name (``features_<encoder>``).

    Returns:
        ``{"name": ..., "weights_sha256": ... or None, "source": file}`` or None when unknown.
    """
    folder = Path(folder)
    settings = folder / "extract_settings.json"
    if settings.is_file():
        s = json.loads(settings.read_text())
        if s.get("features") is not False:
            name = s.get("encoder_name")
            if name is None and isinstance(s.get("encoder"), str):  # older gimp-extract: resnet50_trunc only
                name = "resnet50_trunc" if not s["encoder"].startswith("random") else "resnet50_trunc(random)"
            if name is not None:
                return {"name": name, "weights_sha256": s.get("weights_sha256"), "source": str(settings)}
    first = next(iter(sorted((folder / "h5_files").glob("*.h5"))), None) if (folder / "h5_files").is_dir() else None
    if first is None:
        first = next(iter(sorted(folder.glob("*.h5"))), None)
    if first is not None:
        import h5py

        with h5py.File(first, "r") as f:
            attrs = {**dict(f.attrs), **(dict(f["features"].attrs) if "features" in f else {}),
                     **(dict(f["coords"].attrs) if "coords" in f else {})}
        name = attrs.get("encoder") or attrs.get("encoder_name")
        if name is None and attrs.get("synthetic"):
            name = "synthetic"
        if name is not None:
            sha = attrs.get("weights_sha256")
            return {"name": str(name), "weights_sha256": str(sha) if sha is not None else None, "source": str(first)}
    if folder.name.startswith("features_"):  # TRIDENT: <job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/
        return {"name": folder.name[len("features_"):], "weights_sha256": None, "source": str(folder)}
    return None


def find_bags(bags_dir: str | os.PathLike) -> dict[str, Path]:
    """``slide_id -> bag file`` in ``h5_files/`` (preferred) and ``pt_files/``, or h5 files in the folder itself (TRIDENT)."""
    bags_dir = Path(bags_dir)
    if not bags_dir.is_dir():
        raise DataError(f"{bags_dir}: bag folder not found")
    out: dict[str, Path] = {}
    for folder, suffix in ((bags_dir / "pt_files", ".pt"), (bags_dir / "h5_files", ".h5"), (bags_dir, ".h5")):
        if folder.is_dir():
            out.update({p.stem: p for p in sorted(folder.glob(f"*{suffix}"))})
    if not out:
        raise DataError(f"{bags_dir}: no bags (expected h5_files/<slide_id>.h5, pt_files/<slide_id>.pt or *.h5)")
    return out


def _cases(bags: dict[str, Path], dataset_csv: Path | None) -> pd.DataFrame:
    """One row per slide: case_id, slide_id, path (None when its bag is absent), label ('' if unknown)."""
    from gimplib.data.cohort import normalize_slide_id
    from gimplib.data.barcode import patient_id

    if dataset_csv is None:
        rows = [(patient_id(sid), sid, path, "") for sid, path in bags.items()]
        return pd.DataFrame(rows, columns=["case_id", "slide_id", "path", "label"])
    if not dataset_csv.is_file():
        raise DataError(f"{dataset_csv}: not found; expected a CSV with case_id and/or slide_id (label optional)")
    df = pd.read_csv(dataset_csv, dtype=str, keep_default_na=False)
    if "slide_id" not in df.columns and "case_id" not in df.columns:
        raise DataError(f"{dataset_csv}: columns {list(df.columns)}; expected case_id and/or slide_id")
    if "slide_id" not in df.columns:
        df["slide_id"] = ""
    if "case_id" not in df.columns:
        df["case_id"] = df["slide_id"].map(patient_id)
    df["slide_id"] = [normalize_slide_id(s) if s else "" for s in df["slide_id"]]
    df["label"] = df["label"] if "label" in df.columns else ""
    df["path"] = [bags.get(s) if s else None for s in df["slide_id"]]
    return df[["case_id", "slide_id", "path", "label"]]


def _read_genes(path: Path) -> pd.DataFrame:
    from gimplib.data.cohort import _gene_table_to_patients
    from gimplib.data.genes import read_gene_table

    return _gene_table_to_patients(read_gene_table(path), str(path), verbose=False)


def _check_gene_set(table: pd.DataFrame, transform: Any, path: Path) -> None:
    fitted = list(transform.genes)
    columns = set(map(str, table.columns))
    missing = [g for g in fitted if g not in columns]
    if len(missing) == len(fitted):
        raise DataError(
            f"{path}: unknown gene set: none of the {len(fitted)} genes the model was trained on "
            f"(e.g. {fitted[:3]}) is a column of the table (its columns start {list(table.columns[:3])}); "
            "expected the same gene ids as the training table (Ensembl ids without version for GDC files)"
        )
    if missing:
        raise DataError(
            f"{path}: the table lacks {len(missing)} of the {len(fitted)} genes the model reads "
            f"({missing[:5]}{' ...' if len(missing) > 5 else ''}); the model cannot fill them in"
        )


def _check_encoder(run: RunInfo, bags_dir: Path, feat_dim: int, first_bag: Path) -> str:
    if exists(run.in_dim) and feat_dim != run.in_dim:
        raise DataError(
            f"{first_bag}: patch features are {feat_dim}-d, but the run {run.checkpoint} was trained on "
            f"{run.in_dim}-d features; extract the bags with the run's patch encoder"
            + (f" ({run.encoder['name']})" if exists(run.encoder) else "")
        )
    new = bag_encoder(bags_dir)
    if run.encoder is None or new is None:
        which = "the run's training bags" if run.encoder is None else f"the bags in {bags_dir}"
        return f"feature width only ({which}: encoder not recorded)"
    if new["name"] != run.encoder["name"]:
        raise DataError(
            f"{bags_dir}: bags from patch encoder {new['name']!r} ({new['source']}), but the run {run.checkpoint} "
            f"was trained on {run.encoder['name']!r} bags ({run.encoder['source']}); extract them with the run's encoder"
        )
    a, b = new.get("weights_sha256"), run.encoder.get("weights_sha256")
    if a and b and a != b:
        raise DataError(
            f"{bags_dir}: bags from {new['name']} weights sha256 {a[:12]}..., but the run was trained on weights "
            f"{b[:12]}... ({run.encoder['source']}); extract them with the run's weights file"
        )
    return f"encoder {new['name']!r} as in training" + (" (same weights)" if a and b else "")


# --------------------------------------------------------------------------- predict


def _reduce_attn(attn: torch.Tensor | None, pred: int) -> np.ndarray | None:
    """(1, n) or (1, n, k) attention -> (n,) (the predicted class's branch when there is one per class)."""
    if attn is None:
        return None
    a = attn[0].float()
    if a.ndim == 2:
        a = a[:, pred] if a.shape[1] > pred else a.mean(dim=1)
    return a.cpu().numpy().astype(np.float64)


def _forward(net: torch.nn.Module, run: RunInfo, feats: torch.Tensor | None, genes: torch.Tensor | None,
             want_attn: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if run.task == "genes":
        return net.classify(genes), None
    if run.task == "finetune":
        out = net(feats, None, genes, return_attn=want_attn)
        return out if want_attn else (out, None)
    out = net(feats, mask=None, genes=genes)
    return out["logits"], out.get("attn")


def _slide_file(slides_dir: Path | None, slide_id: str) -> Path | None:
    if slides_dir is None:
        return None
    from gimplib.data.wsi.pipeline import SLIDE_EXTENSIONS

    for ext in SLIDE_EXTENSIONS:
        for candidate in (slides_dir / f"{slide_id}{ext}", slides_dir / f"{slide_id}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def _write_heatmap(out_dir: Path, slide_id: str, bag_path: Path, coords: np.ndarray, scores: np.ndarray,
                   slide: Path | None, title: str) -> str:
    from gimplib.data.wsi.heatmap import patch_size_level0, plot_attention_heatmap
    from gimplib.plots import save_figure

    table = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "attention": scores})
    (out_dir / "attention").mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "attention" / f"{slide_id}.csv") as tmp:
        table.to_csv(tmp, index=False)
    fig = plot_attention_heatmap(str(slide) if slide else None, coords, scores, patch_size_level0(bag_path),
                                 title=title)
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    save_figure(fig, out_dir / "heatmaps" / f"{slide_id}.png")
    return "thumbnail" if slide else "canvas"


def predict(
    run: str | os.PathLike,
    bags_dir: str | os.PathLike | None,
    *,
    out_dir: str | os.PathLike,
    genes: str | os.PathLike | None = None,
    dataset_csv: str | os.PathLike | None = None,
    slides_dir: str | os.PathLike | None = None,
    heatmaps: bool = False,
    attributions: bool = False,
    extract: bool = False,
    weights: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Predict the class of new patients with a trained run.

    Args:
        run: a classifier checkpoint (``best.pt``), its run folder, or a ``gimp_pipeline`` folder.
        bags_dir: the patients' bags (``h5_files/`` / ``pt_files/``, or TRIDENT's folder of h5
            files); None only for a gene-only model.
        out_dir: where ``predictions.csv`` (and the rest) are written.
        genes: a gene table (CSV/TSV/parquet, one row per patient); default: a ``genes.*``
            file in ``bags_dir``. Needed when the model reads genes.
        dataset_csv: case_id, slide_id (and label) of the patients; default ``bags_dir/dataset.csv``
            when it exists, else one patient per bag (TCGA slide ids grouped by patient).
        slides_dir: the raw slides (``<slide_id>.svs`` ...), for heatmaps over their thumbnails,
            and the slides to extract with ``extract``.
        heatmaps: write per-slide attention heatmaps and attention CSVs.
        attributions: write GroupMSA's gene-group attributions per patient.
        extract: first turn ``slides_dir`` into bags (``out_dir/bags``) with the settings the
            run's training bags were made with (their ``extract_settings.json``: mode, patches,
            encoder); ``bags_dir`` must then be None.
        weights: the encoder's weights file for ``extract``, when it is no longer where the
            training extraction read it (its sha256 must match).
        device, progress: runtime options.

    Returns:
        The predictions table (also written as ``out_dir/predictions.csv``).

    Raises:
        DataError: see the module docstring (each message names the file, case or slide).
    """
    from tqdm.auto import tqdm

    from gimplib.data.bags import read_bag
    from gimplib.train.inference import load_model

    info = describe_run(run)
    out_dir = Path(out_dir)
    bags_dir = Path(bags_dir) if exists(bags_dir) else None
    notes: dict[str, Any] = {}
    if extract:
        if bags_dir is not None or slides_dir is None:
            raise DataError("extract=True turns slides_dir into bags: give slides_dir and no bags_dir")
        bags_dir, notes["extraction"] = _extract_like_training(info, Path(slides_dir), out_dir / "bags", weights,
                                                               device, progress)
    if bags_dir is None and info.reads_image and not info.any_modality:
        raise DataError(f"{info.checkpoint}: the {info.name} model reads slides; give a folder of bags")
    bags = find_bags(bags_dir) if exists(bags_dir) else {}
    if dataset_csv is None and exists(bags_dir) and (bags_dir / "dataset.csv").is_file():
        dataset_csv = bags_dir / "dataset.csv"
    if bags_dir is None and dataset_csv is None:
        raise DataError("without bags, a dataset.csv must name the patients (case_id)")
    slides = _cases(bags, Path(dataset_csv) if exists(dataset_csv) else None)

    # the image side: every listed slide needs its bag (a patient may lack slides only with any_modality)
    encoder_check = "no image input"
    if info.reads_image:
        absent = slides[slides["path"].isna() & (slides["slide_id"] != "")]
        if len(absent):
            raise DataError(f"{bags_dir}: no bag for slide(s) {absent['slide_id'].tolist()[:10]} listed in {dataset_csv}")
        with_bags = slides[slides["path"].notna()]
        if len(with_bags):
            from gimplib.data.bags import bag_info

            dims = {p: bag_info(p)[1] for p in with_bags["path"]}
            first = next(iter(dims))
            odd = [f"{p} (D={d})" for p, d in dims.items() if d != dims[first]]
            if odd:
                raise DataError(f"bags of different feature widths in {bags_dir}: {odd[:5]} vs {first} (D={dims[first]})")
            encoder_check = _check_encoder(info, bags_dir, dims[first], Path(first))
    case_ids = list(dict.fromkeys(slides["case_id"]))
    no_slide = [c for c in case_ids if not slides.loc[slides.case_id == c, "path"].notna().any()]
    if info.reads_image and no_slide and not info.any_modality:
        raise DataError(f"case(s) {no_slide[:10]} have no slide; the {info.name} model reads slides "
                        "(fine-tune with modality_dropout to predict from genes alone)")

    # the gene side
    gene_rows: dict[str, np.ndarray] = {}
    if info.reads_genes:
        gpath = Path(genes) if exists(genes) else None
        if gpath is None and exists(bags_dir):
            gpath = next((bags_dir / n for n in GENE_FILES if (bags_dir / n).is_file()), None)
        table = None
        if gpath is not None:
            if not gpath.is_file():
                raise DataError(f"{gpath}: gene table not found")
            table = _read_genes(gpath)
            _check_gene_set(table, info.gene_transform, gpath)
        have = [c for c in case_ids if table is not None and c in table.index]
        lacking = [c for c in case_ids if c not in set(have)]
        if lacking and not info.any_modality:
            where = f"in {gpath}" if gpath is not None else "(no gene table given: --genes)"
            raise DataError(
                f"{len(lacking)} case(s) have no expression {where}: {lacking[:10]}{' ...' if len(lacking) > 10 else ''}; "
                f"the {info.name} model ({info.checkpoint}) classifies slide + genes together"
            )
        if have:
            matrix = info.gene_transform.transform(table.loc[have])
            gene_rows = dict(zip(have, matrix))
        notes["gene_table"] = str(gpath) if gpath else None
        unusable = [c for c in case_ids if c not in gene_rows and c in set(no_slide)]
        if unusable:
            raise DataError(f"case(s) {unusable[:10]} have neither a slide nor expression")

    dev = get_device(device)
    net = load_model(info.checkpoint, device=dev)
    want_attn = heatmaps and info.reads_image
    rows, attributions_rows, heat_kinds = [], [], {}
    for case in tqdm(case_ids, desc="predict", disable=not progress, leave=False):
        mine = slides[(slides.case_id == case) & slides["path"].notna()]
        feats, segments = None, []
        if info.reads_image and len(mine):
            parts = [read_bag(p, with_coords=True) for p in mine["path"]]
            segments = [(sid, Path(p), b) for sid, p, b in zip(mine["slide_id"], mine["path"], parts)]
            feats = torch.from_numpy(np.concatenate([b.feats for b in parts]))[None].to(dev)
        g = torch.from_numpy(gene_rows[case])[None].to(dev) if case in gene_rows else None
        with torch.no_grad():
            logits, attn = _forward(net, info, feats, g, want_attn)
        prob = torch.softmax(logits.float(), dim=-1)[0].cpu().numpy()
        pred = int(prob.argmax())
        used = [m for m, ok in (("image", feats is not None), ("genes", g is not None)) if ok]
        label = slides.loc[slides.case_id == case, "label"].iloc[0]
        row = {"case_id": case, "slide_ids": ";".join(mine["slide_id"]), "n_patches": int(feats.shape[1]) if feats is not None else 0,
               "modalities": "+".join(used)}
        row.update({f"prob_{name}": float(p) for name, p in zip(info.label_names, prob)})
        row.update(pred_label=info.label_names[pred], label=label, model=f"{info.task}:{info.name}",
                   checkpoint=str(info.checkpoint), checkpoint_sha256=info.sha256)
        rows.append(row)
        scores = _reduce_attn(attn, pred) if want_attn else None
        if scores is not None:
            offset = 0
            for sid, path, bag in segments:
                n = len(bag)
                if bag.coords is None:
                    heat_kinds[sid] = "none (a .pt bag has no coords)"
                else:
                    title = f"{sid}: {info.label_names[pred]} ({prob[pred]:.2f})"
                    heat_kinds[sid] = _write_heatmap(out_dir, sid, path, bag.coords, scores[offset:offset + n],
                                                     _slide_file(Path(slides_dir) if slides_dir else None, sid), title)
                offset += n
        elif want_attn:
            for sid, _, _ in segments:
                heat_kinds[sid] = f"none ({info.name} returns no attention)"
        if attributions and g is not None:
            attributions_rows.extend(_attributions(net, info, case, g))
    table = pd.DataFrame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    if attributions:
        if attributions_rows:
            with atomic_path(out_dir / "gene_attributions.csv") as tmp:
                pd.DataFrame(attributions_rows).to_csv(tmp, index=False)
        else:
            notes["gene_attributions"] = "none: the model has no GroupMSA gene encoder (or no patient had genes)"
    save_json(out_dir / "predict_info.json", {
        "checkpoint": str(info.checkpoint), "checkpoint_sha256": info.sha256, "task": info.task, "model": info.name,
        "label_names": info.label_names, "in_dim": info.in_dim, "reads": [m for m, ok in (("image", info.reads_image),
                                                                                      ("genes", info.reads_genes)) if ok],
        "any_modality": info.any_modality, "encoder_check": encoder_check, "bags_dir": str(bags_dir) if bags_dir else None,
        "dataset_csv": str(dataset_csv) if dataset_csv else None, "n_cases": len(table),
        "modalities": table["modalities"].value_counts().to_dict(), "heatmaps": heat_kinds, **notes,
    })
    return table


def _extract_like_training(info: RunInfo, slides_dir: Path, out: Path, weights: Any, device: str,
                           progress: bool) -> tuple[Path, dict[str, Any]]:
    """Extract ``slides_dir`` into ``out`` with the run's training extraction settings."""
    from gimplib.data.wsi.pipeline import config_from_settings, process_slides

    source = info.train_data_dir / "extract_settings.json" if exists(info.train_data_dir) else None
    if source is None or not source.is_file():
        raise DataError(
            f"{info.checkpoint}: its training bags ({info.train_data_dir}) hold no extract_settings.json, so the "
            "extraction settings are unknown; extract the new slides yourself with the same settings and give the bags"
        )
    changes: dict[str, Any] = {"device": device}
    if exists(weights):
        changes["weights"] = str(weights)
    config = config_from_settings(source, **changes)
    status = process_slides(slides_dir, out, config, progress=progress)
    failed = status[status.status == "failed"]
    if len(failed) == len(status):
        raise DataError(f"{slides_dir}: no slide could be extracted: {dict(zip(failed.slide_id, failed.error))}")
    return out, {"settings": str(source), "encoder": config.encoder_name,
                 "failed": dict(zip(failed.slide_id, failed.error))}


def _attributions(net: torch.nn.Module, info: RunInfo, case: str, genes: torch.Tensor) -> list[dict[str, Any]]:
    from gimplib.models.groupmsa import GroupMSA

    encoder = net if info.task == "genes" else getattr(net, "gene_encoder", None)
    if not isinstance(encoder, GroupMSA):
        return []
    with torch.no_grad():
        _, attn = encoder(genes, return_attn=True)
    names = list(info.gene_transform.genes)
    out = []
    for k, ((lo, hi), a) in enumerate(zip(encoder.group_gene_ranges(), attn[0].float().cpu().tolist())):
        out.append({"case_id": case, "group": k, "n_genes": hi - lo, "first_gene": names[lo] if hi > lo else "",
                    "last_gene": names[hi - 1] if hi > lo else "", "attention": a})
    return out


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gimp-predict",
        description="Apply a trained run (GiMP fine-tuned, a compared system, a gene-only model) to new patients.",
    )
    p.add_argument("run", help="checkpoint (best.pt), its run folder, or a gimp_pipeline folder")
    p.add_argument("bags", nargs="?", default=None, help="folder of bags (h5_files/, pt_files/; a TRIDENT features folder)")
    p.add_argument("-o", "--out", required=True, help="output folder (predictions.csv, predict_info.json, ...)")
    p.add_argument("--genes", default=None, help="gene table (csv/tsv/parquet, one row per patient); default BAGS/genes.*")
    p.add_argument("--dataset-csv", default=None, help="case_id, slide_id (label) of the patients; default BAGS/dataset.csv")
    p.add_argument("--slides", default=None, help="folder of the raw slides, for heatmaps over their thumbnails")
    p.add_argument("--extract", action="store_true",
                   help="extract --slides into OUT/bags first, with the run's training extraction settings (no BAGS)")
    p.add_argument("--weights", default=None, help="with --extract: the encoder's weights file, if it moved")
    p.add_argument("--heatmaps", action="store_true", help="attention heatmaps per slide (heatmaps/, attention/)")
    p.add_argument("--attributions", action="store_true", help="gene-group attributions (gene_attributions.csv)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``gimp-predict RUN BAGS -o OUT [options]``; returns 2 on a refusal (the message says why)."""
    args = _parser().parse_args(argv)
    try:
        table = predict(args.run, args.bags, out_dir=args.out, genes=args.genes, dataset_csv=args.dataset_csv,
                        slides_dir=args.slides, heatmaps=args.heatmaps, attributions=args.attributions,
                        extract=args.extract, weights=args.weights, device=args.device, progress=not args.quiet)
    except DataError as err:
        print(f"gimp-predict: {err}", file=sys.stderr)
        return 2
    counts = table["pred_label"].value_counts().to_dict()
    print(f"gimp-predict: {len(table)} patient(s) {counts} -> {Path(args.out) / 'predictions.csv'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
