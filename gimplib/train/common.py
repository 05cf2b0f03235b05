"""Run folders, gene preprocessing, data loaders and evaluation shared by the training tasks."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gimplib.data.datasets import BagDataset, WindowDataset
from gimplib.data.genes import GeneTransform
from gimplib.data.splits import check_disjoint
from gimplib.metrics import classification_metrics
from gimplib.train.checkpoint import ConfigMismatchError, StaleRunError
from gimplib.train.engine import BEST, CHECKPOINT, HISTORY, compare_configs, normalize_config, to_device
from gimplib.train.inputs import (  # noqa: F401  (check_upstream, run_inputs: re-exported for the tasks)
    INPUTS,
    RERUN_HINT,
    changed_inputs,
    check_upstream,
    data_fingerprint,
    detail_of,
    run_inputs,
)
from gimplib.utils import DataError, atomic_path, exists, load_json, save_json

__all__ = ["RunResult", "data_fingerprint", "load_run", "run_inputs"]

CONFIG, METRICS, PREDICTIONS = "config.json", "metrics.json", "predictions.csv"
RUN_FILES = (CHECKPOINT, BEST, HISTORY, METRICS, PREDICTIONS, INPUTS, CONFIG)
SPLIT_PARTS = ("train", "val", "test")


@dataclass
class RunResult:
    """The outcome of one training run (also rebuilt from its folder by :func:`load_run`).

    Attributes:
        out_dir: the run folder.
        config: the run's configuration (``config.json``).
        metrics: flat headline figures (``metrics.json``), e.g. ``best_epoch``,
            ``val_accuracy``, ``test_accuracy``, ``test_auc``, ``test_auc_ci_low`` ...
        history: one row per epoch (``metrics.csv``).
        checkpoint: ``best.pt`` for supervised runs, ``checkpoint.pt`` for pretraining.
        predictions: case_id, split, y, pred, prob_0..prob_{C-1} at the selected epoch
            (``predictions.csv``), None for pretraining.
    """

    out_dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: pd.DataFrame
    checkpoint: Path
    predictions: pd.DataFrame | None = field(default=None, repr=False)
    reused: bool = False


def load_run(out_dir: str | os.PathLike) -> RunResult:
    """Rebuild the :class:`RunResult` of a finished run from its folder."""
    out_dir = Path(out_dir)
    if not (out_dir / METRICS).is_file():
        raise FileNotFoundError(f"{out_dir} holds no finished run (no {METRICS})")
    config = load_json(out_dir / CONFIG)
    ckpt = out_dir / BEST if (out_dir / BEST).is_file() else out_dir / CHECKPOINT
    preds = pd.read_csv(out_dir / PREDICTIONS, dtype={"case_id": str}) if (out_dir / PREDICTIONS).is_file() else None
    history = pd.read_csv(out_dir / HISTORY) if (out_dir / HISTORY).is_file() else pd.DataFrame()
    return RunResult(out_dir, config, load_json(out_dir / METRICS), history, ckpt, preds)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _finished_at(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def prepare_run(out_dir: Path, config: Mapping[str, Any], overwrite: bool,
                inputs: Mapping[str, Any] | None = None) -> RunResult | None:
    """Reuse a finished run, check an unfinished one, or clear the folder (``overwrite``).

    A run is reused only when its settings *and* its inputs are unchanged: the config's
    ``inputs`` entry (see :func:`run_inputs`) holds digests of the cases and labels, the gene
    table's values, every bag's size and modification time, and the upstream checkpoints.
    A reused run is announced with its date.

    Args:
        out_dir: the run folder.
        config: the run's config (from ``make_config``).
        overwrite: clear the folder and train afresh.
        inputs: the per-file detail behind ``config["inputs"]`` (written to ``inputs.json``
            so that a later mismatch can name the bags that changed); default: the detail
            :func:`run_inputs` computed for that entry.

    Returns:
        The finished run's result when it can be reused, else None (train).

    Raises:
        StaleRunError: the folder holds a run of the same settings made from other inputs
            (the message says what changed and how to rerun).
        ConfigMismatchError: the folder holds a run of other settings.
    """
    config = normalize_config(config)
    detail = dict(inputs if exists(inputs) else detail_of(config.get("inputs")))
    if overwrite:
        # every rank trains afresh; only rank 0 touches the files (no rank may see the old run)
        if is_main_process():
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
            _write_config(out_dir, config, detail)
        return None
    if (is_main_process() and (out_dir / CONFIG).is_file()
            and not any((out_dir / n).is_file() for n in (CHECKPOINT, BEST, METRICS))):
        # a config with no trained epoch behind it (an earlier start that failed): nothing to lose, replace it
        (out_dir / CONFIG).unlink()
    if (out_dir / CONFIG).is_file():
        saved = load_json(out_dir / CONFIG)
        settings = {k: v for k, v in saved.items() if k != "inputs"}
        try:
            compare_configs(settings, {k: v for k, v in config.items() if k != "inputs"}, where=f"run folder {out_dir}")
        except ConfigMismatchError as err:
            _check_inputs(out_dir, saved.get("inputs"), config.get("inputs"), detail, settings=str(err))
            raise
        _check_inputs(out_dir, saved.get("inputs"), config.get("inputs"), detail)
        if (out_dir / METRICS).is_file():
            if is_main_process():
                print(f"reusing the finished run in {out_dir} (finished {_finished_at(out_dir / METRICS)}; "
                      f"same settings and inputs); to train it again pass {RERUN_HINT}", flush=True)
            result = load_run(out_dir)
            result.reused = True
            return result
    elif (out_dir / METRICS).is_file():
        raise DataError(f"{out_dir} holds {METRICS} but no {CONFIG}: not a gimplib run; use another out_dir")
    if is_main_process():
        _write_config(out_dir, config, detail)
    return None


def _write_config(out_dir: Path, config: Mapping[str, Any], detail: Mapping[str, Any]) -> None:
    if detail:
        save_json(out_dir / INPUTS, detail)
    save_json(out_dir / CONFIG, config)


def _check_inputs(out_dir: Path, saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None,
                  detail: Mapping[str, Any], settings: str | None = None) -> None:
    """Raise :class:`StaleRunError` naming what changed between a run's inputs and today's
    (and, from ``settings``, a config mismatch found too: e.g. a relabelled case changes the split)."""
    if saved == now:
        return
    finished = (out_dir / METRICS).is_file()
    when = f"finished {_finished_at(out_dir / METRICS)}" if finished else "unfinished"
    old_detail = load_json(out_dir / INPUTS) if (out_dir / INPUTS).is_file() else {}
    changes = changed_inputs(saved, now, old_detail, detail)
    if settings:
        changes += ["and so do settings that follow from them:"] + [
            line.strip() for line in settings.splitlines()[1:] if line.startswith("  ")]
    raise StaleRunError(
        f"run folder {out_dir} ({when}) was made from other inputs than today's:\n  "
        + "\n  ".join(changes)
        + f"\nIts results would be stale. Train it again with {RERUN_HINT}, or use another out_dir."
    )


def finish_run(out_dir: Path, metrics: Mapping[str, Any], predictions: pd.DataFrame | None) -> RunResult:
    """Write predictions.csv and then metrics.json (the 'finished' marker), atomically."""
    if is_main_process():
        if exists(predictions):
            with atomic_path(out_dir / PREDICTIONS) as tmp:
                predictions.to_csv(tmp, index=False)
        save_json(out_dir / METRICS, dict(metrics))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return load_run(out_dir)


# --------------------------------------------------------------------------- config pieces


def split_summary(split: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Sizes and a digest of a split: enough to tell two splits apart in a config."""
    missing = [p for p in ("train", "val") if not split.get(p)]
    if missing:
        raise DataError(f"the split has no {' / '.join(missing)} cases; expected keys train, val (and test)")
    text = "|".join(",".join(sorted(map(str, split.get(p, [])))) for p in SPLIT_PARTS)
    out = {f"n_{p}": len(split.get(p, [])) for p in SPLIT_PARTS}
    out["sha1"] = hashlib.sha1(text.encode()).hexdigest()[:16]
    return out


def cohort_summary(cohort: Any) -> dict[str, Any]:
    return {
        "data_dir": str(cohort.data_dir) if exists(cohort.data_dir) else None,
        "label_names": list(cohort.label_names),
        "n_cases": int(len(cohort.cases)),
        "feat_dim": cohort.feat_dim,
    }


def check_ids(cohort: Any, split: Mapping[str, Sequence[str]]) -> None:
    """Every case of the split is in the cohort, and no patient is in two parts."""
    check_disjoint({p: list(split.get(p) or []) for p in SPLIT_PARTS})
    known = set(map(str, cohort.cases.index))
    for part in SPLIT_PARTS:
        for cid in split.get(part, []):
            if str(cid) not in known:
                raise DataError(f"split part {part!r} names case {cid!r}, which the cohort does not hold")


def check_classes(cohort: Any, split: Mapping[str, Sequence[str]]) -> None:
    """A classifier needs two classes among its training cases: say so before any training."""
    ids = [str(c) for c in split.get("train") or []]
    labels = sorted(set(cohort.cases.loc[ids, "label"].astype(str))) if ids else []
    if len(labels) < 2:
        counts = cohort.cases["label"].astype(str).value_counts().to_dict()
        where = cohort.data_dir if exists(cohort.data_dir) else "the cohort"
        raise DataError(f"{where}: the training cases hold a single class {labels} (cohort label counts "
                        f"{counts}); a classifier needs at least two classes in dataset.csv's label column")


# --------------------------------------------------------------------------- genes


def fit_gene_transform(cohort: Any, train_ids: Sequence[str], *, transform: str, standardize: bool,
                       top_k_var: int | None) -> Any:
    """A :class:`~gimplib.data.genes.GeneTransform` fitted on the training cases only."""
    if not cohort.has_genes:
        raise DataError(f"cohort {cohort.data_dir} has no gene table; this run needs genes")
    return GeneTransform(transform=transform, standardize=standardize, top_k_var=top_k_var).fit(
        cohort.genes.loc[list(train_ids)]
    )


def gene_matrix(cohort: Any, transform: Any, case_ids: Sequence[str]) -> np.ndarray:
    """(len(case_ids), G) float32 transformed expression of ``case_ids``.

    Raises:
        DataError: the cohort has no gene table, or some cases have no expression in it
            (the cases are named): a model that reads genes cannot classify them.
    """
    ids = list(case_ids)
    if not cohort.has_genes:
        raise DataError(f"cohort {cohort.data_dir} has no gene table, but this model reads each patient's "
                        f"expression (cases {ids[:5]}{' ...' if len(ids) > 5 else ''})")
    missing = [c for c in ids if c not in cohort.genes.index]
    if missing:
        raise DataError(f"{len(missing)} case(s) have no expression in the gene table of {cohort.data_dir}: "
                        f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; this model classifies slide + genes "
                        "together, so every case needs both (drop them from the split, or use an image-only model)")
    return transform.transform(cohort.genes.loc[ids])


# --------------------------------------------------------------------------- evaluation


def loader_for(dataset: Any, *, batch_size: int, collate_fn: Callable | None, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers)


@torch.no_grad()
def predict(logits_fn: Callable[[Mapping[str, Any]], torch.Tensor], loader: DataLoader, device: torch.device,
            *, desc: str = "predict", progress: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Run ``logits_fn(batch) -> (b, C)`` over a loader.

    Returns:
        case_ids, y (n,) int64, prob (n, C) float64 (softmax of the logits).
    """
    ids, ys, probs = [], [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        batch = to_device(batch, device)
        logits = logits_fn(batch).float()
        probs.append(torch.softmax(logits, dim=-1).cpu().double().numpy())
        ys.append(batch["y"].reshape(-1).cpu().numpy())
        cid = batch["case_id"]
        ids.extend([cid] if isinstance(cid, str) else list(cid))
    return ids, np.concatenate(ys).astype(np.int64), np.concatenate(probs)


def summarize(prefix: str, y: np.ndarray, prob: np.ndarray, *, n_boot: int, seed: int) -> dict[str, Any]:
    """``classification_metrics`` with keys prefixed (``val_accuracy``, ...) and the mean NLL as ``<prefix>_loss``."""
    m = classification_metrics(y, prob, n_boot=n_boot, seed=seed)
    m["loss"] = float(-np.mean(np.log(np.clip(prob[np.arange(len(y)), y], 1e-12, None))))
    return {f"{prefix}_{k}": v for k, v in m.items()}


def epoch_eval_fn(logits_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor], loader: DataLoader,
                  device_of: Callable[[], torch.device]) -> Callable[[nn.Module], dict[str, float]]:
    """The per-epoch validation used to pick the best epoch (no bootstrap: it is fast)."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        _, y, prob = predict(lambda b: logits_fn(model, b), loader, device_of())
        m = summarize("val", y, prob, n_boot=0, seed=0)
        return {k: v for k, v in m.items() if isinstance(v, float)}

    return evaluate


def final_evaluation(logits_fn: Callable[[Mapping[str, Any]], torch.Tensor], loaders: Mapping[str, DataLoader],
                     device: torch.device, *, n_boot: int, seed: int,
                     progress: bool) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics with bootstrap CIs and a predictions table for each named loader (val, test)."""
    metrics: dict[str, Any] = {}
    tables = []
    for part, loader in loaders.items():
        ids, y, prob = predict(logits_fn, loader, device, desc=part, progress=progress)
        metrics.update(summarize(part, y, prob, n_boot=n_boot, seed=seed))
        table = pd.DataFrame({"case_id": ids, "split": part, "y": y, "pred": prob.argmax(1)})
        for c in range(prob.shape[1]):
            table[f"prob_{c}"] = prob[:, c]
        tables.append(table)
    return metrics, pd.concat(tables, ignore_index=True)


def bag_sets(cohort: Any, split: Mapping[str, Sequence[str]], *, input: str, window_len: int,
              max_patches: int | None, seed: int, gt: Any = None) -> dict[str, Any]:
    if input not in ("bag", "window"):
        raise ValueError(f"input must be 'bag' or 'window', got {input!r}")
    if not cohort.has_slides:
        raise DataError(f"cohort {cohort.data_dir} has no slides; this run needs patch features")
    sets = {}
    for part in ("train", "val", "test"):
        ids = list(split.get(part) or [])
        if not ids:
            continue
        gm = gene_matrix(cohort, gt, ids) if exists(gt) else None
        if part == "train" and input == "window":
            sets[part] = WindowDataset(cohort, ids, window_len=window_len, gene_matrix=gm, seed=seed)
        else:  # evaluation always sees whole bags
            sets[part] = BagDataset(cohort, ids, gene_matrix=gm, max_patches=max_patches if part == "train" else None,
                                    seed=seed)
    return sets
