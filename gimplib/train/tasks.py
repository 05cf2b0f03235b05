"""Supervised training tasks: the gene encoder (GiMP's first stage, and the gene-only
baseline), the compared systems, and the k-fold driver.

Every task takes a :class:`~gimplib.data.cohort.Cohort`, a split ``{"train", "val", "test":
[case_id, ...]}`` and keyword options, trains through :func:`gimplib.train.engine.fit` into
``out_dir`` and returns a :class:`~gimplib.train.common.RunResult`. A finished run with the
same configuration is reused; an interrupted one resumes; ``overwrite=True`` starts afresh.
The epoch kept is the best on validation ``select`` (default accuracy; ties go to the lower
validation loss); test figures come from that epoch, with bootstrap 95% intervals.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gimplib.metrics import mean_sd
from gimplib.train.checkpoint import load_checkpoint
from gimplib.train.common import (
    RunResult,
    bag_sets,
    check_classes,
    check_ids,
    check_upstream,
    cohort_summary,
    epoch_eval_fn,
    final_evaluation,
    finish_run,
    fit_gene_transform,
    gene_matrix,
    loader_for,
    prepare_run,
    run_inputs,
    split_summary,
)
from gimplib.train.engine import fit
from gimplib.models.gene_encoders import build_gene_encoder
from gimplib.train.inference import Task
from gimplib.utils import exists, get_device, save_json, seed_everything

__all__ = ["engine_options", "kfold", "make_config", "run_supervised", "train_baseline", "train_gene_encoder"]


def _supervised_step(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = model(batch)
    ce = F.cross_entropy(out["logits"].float(), batch["y"].reshape(-1))
    acc = (out["logits"].argmax(-1) == batch["y"].reshape(-1)).float().mean()
    if "loss_aux" in out:
        return {"loss": ce + out["loss_aux"], "ce": ce, "aux": out["loss_aux"].detach(), "acc": acc}
    return {"loss": ce, "acc": acc}


def _logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return model(batch, with_y=False)["logits"]


def engine_options(kw: Mapping[str, Any]) -> dict[str, Any]:
    """The engine options of a task call (defaults filled in); unknown keywords are a TypeError."""
    out = dict(num_epochs=kw["num_epochs"], lr=1e-4, weight_decay=1e-2, batch_size=1, accumulate=1, warmup_epochs=0,
               grad_clip=None, amp="auto", seed=0, deterministic=False, n_boot=1000)
    unknown = sorted(set(kw) - set(out))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the engine options are {sorted(out)}")
    out.update(kw)
    _check_options(out)
    return out


#: name -> (kind, lowest value, example): what each engine option takes.
_OPTION_TYPES = {"num_epochs": ("int", 1, 50), "batch_size": ("int", 1, 8), "accumulate": ("int", 1, 1),
                 "warmup_epochs": ("int", 0, 0), "seed": ("int", None, 0), "n_boot": ("int", 0, 1000),
                 "lr": ("number", 0, "1.0e-4"), "weight_decay": ("number", 0, "1.0e-2"),
                 "grad_clip": ("number", 0, "1.0")}


def _check_options(opts: Mapping[str, Any]) -> None:
    """A value of the wrong type fails here, named, before any run folder is touched
    (``-p num_epochs=three`` would otherwise fail deep in training)."""
    for name, (kind, low, example) in _OPTION_TYPES.items():
        value = opts.get(name)
        if value is None and name == "grad_clip":
            continue
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if kind == "number":
            ok = ok or isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not ok or (low is not None and value < low) or (name == "lr" and value == 0):
            what = "an integer" if kind == "int" else "a number"
            bound = "" if low is None else (f" > {low}" if name == "lr" else f" >= {low}")
            raise ValueError(f"{name}={value!r}: expected {what}{bound} (notebook: -p {name}={example}; "
                             f"gimp-train: --set {name}={example})")
    if opts.get("deterministic") not in (True, False):
        raise ValueError(f"deterministic={opts.get('deterministic')!r}: expected true or false")


def run_supervised(*, kind: str, net: nn.Module, config: dict[str, Any], out_dir: Path, train_ds: Any,
                   eval_sets: Mapping[str, Any], collate_fn: Callable | None, opts: Mapping[str, Any],
                   select: str, extras: Mapping[str, Any], device: str, num_workers: int, progress: bool,
                   eval_batch_size: int, callbacks: Sequence[Callable] = ()) -> RunResult:
    """Train a classifier task, keep the best epoch on validation, evaluate val + test with CIs."""
    task = Task(net, kind)
    loaders = {part: loader_for(ds, batch_size=eval_batch_size, collate_fn=collate_fn, num_workers=num_workers)
               for part, ds in eval_sets.items()}
    dev = get_device(device)
    res = fit(task, train_ds, step_fn=_supervised_step, out_dir=out_dir, config=config, collate_fn=collate_fn,
              num_epochs=opts["num_epochs"], lr=opts["lr"], weight_decay=opts["weight_decay"],
              batch_size=opts["batch_size"], accumulate=opts["accumulate"], warmup_epochs=opts["warmup_epochs"],
              grad_clip=opts["grad_clip"], amp=opts["amp"], device=dev, seed=opts["seed"], num_workers=num_workers,
              eval_fn=epoch_eval_fn(_logits, loaders["val"], lambda: next(task.parameters()).device),
              select=f"val_{select}", mode="min" if select == "loss" else "max", extras=extras, progress=progress,
              callbacks=callbacks, desc=kind)
    metrics: dict[str, Any] = {"best_epoch": None}
    predictions = None
    if res.dist.is_main:
        # no best.pt when the selection metric was never finite (e.g. AUC on a one-class val set)
        path = res.best_path if res.best_path.is_file() else res.last_path
        best = load_checkpoint(path, map_location=res.device)
        task.load_state_dict(best["model"])
        task.eval()
        metrics, predictions = final_evaluation(lambda b: _logits(task, b), loaders, res.device,
                                                n_boot=opts["n_boot"], seed=opts["seed"], progress=progress)
        metrics = {"best_epoch": int(best["epoch"]), **metrics}
    return finish_run(out_dir, metrics, predictions)


def make_config(task: str, cohort: Any, split: Mapping[str, Sequence[str]], **values: Any) -> dict[str, Any]:
    """A run's config: the task, the cohort and split identity (sizes + digest), ``values``, and
    ``inputs``: digests of the data and upstream checkpoints it reads (see
    :func:`~gimplib.train.common.run_inputs`), so a changed input is never silently reused.

    Raises:
        DataError: the split names unknown cases, or its training part holds a single class.
    """
    check_ids(cohort, split)
    check_classes(cohort, split)
    check_upstream(cohort, values)
    inputs, _ = run_inputs(cohort, values)
    return {"task": task, "cohort": cohort_summary(cohort), "split": split_summary(split), **values,
            "inputs": inputs}


# --------------------------------------------------------------------------- gene encoder


def train_gene_encoder(
    cohort: Any,
    split: Mapping[str, Sequence[str]],
    *,
    out_dir: str | os.PathLike,
    encoder: str = "groupmsa",
    encoder_kwargs: Mapping[str, Any] | None = None,
    gene_transform: str = "log2p1",
    standardize: bool = True,
    top_k_var: int | None = None,
    clip: float | None = None,
    gene_order: str = "column",
    num_epochs: int = 50,
    batch_size: int = 32,
    select: str = "accuracy",
    device: str = "auto",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **common: Any,
) -> RunResult:
    """Supervised gene-only classifier: GroupMSA (or SNN) + linear head on the expression vector.

    This is both GiMP's first stage (the encoder is then frozen for pretraining) and the
    gene-only baseline. The :class:`~gimplib.data.genes.GeneTransform` is fitted on the
    training cases and saved in the checkpoint.

    Args:
        cohort: a cohort with a gene table (slides not needed).
        split: ``{"train", "val", "test": [case_id, ...]}``.
        out_dir: run folder.
        encoder: ``"groupmsa"`` or ``"snn"``.
        encoder_kwargs: constructor arguments of the encoder (``num_genes``/``num_classes`` are set here).
        gene_transform, standardize, top_k_var: the :class:`GeneTransform` settings.
        clip: clip the standardised values to ``[-clip, clip]`` (None: no clipping).
        gene_order: ``"column"``, ``"random"`` or ``"cluster"``: which genes share a
            fragment (:class:`GeneTransform` ``order``; the random order is drawn with ``seed``).
        num_epochs, batch_size: training length and batch.
        select: validation metric that picks the best epoch (``accuracy``, ``auc``, ``loss`` ...).
        device, num_workers, overwrite, progress: runtime options.
        **common: ``lr`` (1e-4), ``weight_decay`` (1e-2), ``accumulate``, ``warmup_epochs``,
            ``grad_clip``, ``amp``, ``seed`` (0), ``deterministic``, ``n_boot`` (1000), and
            ``callbacks`` (``cb(epoch, row)`` after each epoch's checkpoint; not in the config).

    Returns:
        :class:`RunResult`; ``checkpoint`` is ``best.pt``.
    """
    from gimplib.data.datasets import GeneDataset

    out_dir = Path(out_dir)
    callbacks = tuple(common.pop("callbacks", ()))  # runtime hooks, not part of the config
    opts = engine_options(dict(common, num_epochs=num_epochs, batch_size=batch_size))
    transform = gene_transform_settings(gene_transform=gene_transform, standardize=standardize, top_k_var=top_k_var,
                                        clip=clip, gene_order=gene_order, seed=opts["seed"])
    config = make_config("genes", cohort, split, encoder=encoder, encoder_kwargs=dict(encoder_kwargs or {}),
                         gene_transform=transform, select=select, **opts)
    done = prepare_run(out_dir, config, overwrite)
    if done:
        return done
    seed_everything(opts["seed"], opts["deterministic"])
    gt = _fit_transform(cohort, split["train"], transform)
    kwargs = {**config["encoder_kwargs"], "num_genes": gt.num_genes, "num_classes": len(cohort.label_names)}
    net = build_gene_encoder(encoder, **kwargs)
    parts = {p: list(split[p]) for p in ("train", "val", "test") if split.get(p)}
    sets = {p: GeneDataset(cohort, ids, gene_matrix(cohort, gt, ids)) for p, ids in parts.items()}
    extras = {"gene_transform": gt.state_dict(), "label_names": list(cohort.label_names), "build": kwargs}
    return run_supervised(kind="genes", net=net, config=config, out_dir=out_dir,
                          train_ds=sets.pop("train"), eval_sets=sets, collate_fn=None, opts=opts,
                          select=select, extras=extras, device=device, num_workers=num_workers,
                          progress=progress, eval_batch_size=max(batch_size, 64), callbacks=callbacks)


def gene_transform_settings(*, gene_transform: str = "log2p1", standardize: bool = True, top_k_var: int | None = None,
                            clip: float | None = None, gene_order: str = "column", seed: int = 0) -> dict[str, Any]:
    """:class:`~gimplib.data.genes.GeneTransform` keywords of a gene-encoder run (as stored in its config).

    The keys of the original three settings come first; ``clip`` and ``order`` are only
    added when used, so configs of runs without them stay as they were.
    """
    out: dict[str, Any] = dict(transform=gene_transform, standardize=standardize, top_k_var=top_k_var)
    if exists(clip):
        out["clip"] = float(clip)
    if gene_order != "column":
        out.update(order=gene_order, order_seed=int(seed))
    from gimplib.data.genes import GeneTransform

    GeneTransform(**out)  # a bad value fails here, before the run folder is touched
    return out


def _fit_transform(cohort: Any, train_ids: Sequence[str], settings: Mapping[str, Any]) -> Any:
    from gimplib.data.genes import GeneTransform

    if not cohort.has_genes:
        return fit_gene_transform(cohort, train_ids, transform="none", standardize=True, top_k_var=None)  # names the cohort
    return GeneTransform(**settings).fit(cohort.genes.loc[list(train_ids)])


# --------------------------------------------------------------------------- baselines


def train_baseline(
    name: str,
    cohort: Any,
    split: Mapping[str, Sequence[str]],
    *,
    out_dir: str | os.PathLike,
    model_kwargs: Mapping[str, Any] | None = None,
    use_genes: bool | None = None,
    gene_transform: str = "log2p1",
    standardize: bool = True,
    top_k_var: int | None = None,
    clip: float | None = None,
    gene_order: str = "column",
    input: str = "bag",
    window_len: int = 6000,
    max_patches: int | None = None,
    num_epochs: int = 70,
    batch_size: int = 1,
    select: str = "accuracy",
    device: str = "auto",
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **common: Any,
) -> RunResult:
    """Train a compared system of :data:`gimplib.models.baselines.SYSTEMS` (blocks pathology and fusion) end to end.

    The loss is ``cross_entropy(logits, y) + loss_aux`` (the system's own auxiliary term).

    Args:
        name: registry key (``"abmil"``, ``"transmil"``, ``"porpoise"``, ...).
        cohort, split, out_dir: as for :func:`finetune`.
        model_kwargs: constructor arguments (``in_dim``, ``num_classes`` and, for fusion
            systems, ``num_genes`` are filled in).
        use_genes: feed genes (None: exactly when the system is a fusion system).
        gene_transform, standardize, top_k_var, clip, gene_order: the :class:`GeneTransform`
            settings, as for :func:`train_gene_encoder`.
        input, window_len, max_patches, num_epochs, batch_size, select: as for :func:`finetune`.
        device, num_workers, overwrite, progress: runtime options.
        **common: as for :func:`train_gene_encoder`.

    Returns:
        :class:`RunResult`.
    """
    from gimplib.data.datasets import collate_bags
    from gimplib.models.baselines import SYSTEMS, build_baseline, canonical_name

    out_dir = Path(out_dir)
    key = canonical_name(name)
    if key not in SYSTEMS:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(SYSTEMS)}")
    if SYSTEMS[key].trainer != "train_baseline":
        raise ValueError(f"{name!r} is a pretraining system: run pretrain_baseline, then finetune(pretrained_ckpt=...)")
    genes = SYSTEMS[key].reads_genes if use_genes is None else bool(use_genes)
    callbacks = tuple(common.pop("callbacks", ()))  # runtime hooks, not part of the config
    opts = engine_options(dict(common, num_epochs=num_epochs, batch_size=batch_size))
    transform = gene_transform_settings(gene_transform=gene_transform, standardize=standardize, top_k_var=top_k_var,
                                        clip=clip, gene_order=gene_order, seed=opts["seed"]) if genes else None
    config = make_config("baseline", cohort, split, name=key, model_kwargs=dict(model_kwargs or {}),
                         gene_transform=transform, input=input, window_len=window_len, max_patches=max_patches,
                         select=select, **opts)
    done = prepare_run(out_dir, config, overwrite)
    if done:
        return done
    seed_everything(opts["seed"], opts["deterministic"])
    gt = _fit_transform(cohort, split["train"], transform) if genes else None
    build = {"in_dim": cohort.feat_dim, "num_classes": len(cohort.label_names)}
    if genes:
        build["num_genes"] = gt.num_genes
    build.update(config["model_kwargs"])
    net = build_baseline(key, **build)
    sets = bag_sets(cohort, split, input=input, window_len=window_len, max_patches=max_patches, seed=opts["seed"],
                    gt=gt)
    extras = {"label_names": list(cohort.label_names), "build": build}
    if exists(gt):
        extras["gene_transform"] = gt.state_dict()
    return run_supervised(kind="baseline", net=net, config=config, out_dir=out_dir,
                          train_ds=sets.pop("train"), eval_sets=sets, collate_fn=collate_bags, opts=opts,
                          select=select, extras=extras, device=device, num_workers=num_workers,
                          progress=progress, eval_batch_size=1, callbacks=callbacks)


# --------------------------------------------------------------------------- k-fold


def kfold(
    fn: Callable[..., RunResult],
    cohort: Any,
    folds: Sequence[Mapping[str, Sequence[str]]],
    *,
    out_dir: str | os.PathLike,
    **kwargs: Any,
) -> tuple[list[RunResult], pd.DataFrame]:
    """Run ``fn(cohort, fold, out_dir=out_dir/fold_<i>, **kwargs)`` on every fold and summarise.

    Args:
        fn: a task (:func:`train_gene_encoder`, :func:`finetune`, ...), or any callable with
            that signature returning a :class:`RunResult` (e.g. pretraining then fine-tuning).
        cohort: the cohort.
        folds: splits, e.g. from :func:`gimplib.data.splits.kfold_splits`.
        out_dir: parent folder; ``summary.csv`` and ``metrics.json`` (``<metric>_mean`` /
            ``<metric>_sd``) are written there.
        **kwargs: passed to every call.

    Returns:
        The per-fold results and a summary table: one row per fold, then ``mean`` and ``sd``
        (sample sd), over the numeric metrics.
    """
    out_dir = Path(out_dir)
    results = [fn(cohort, fold, out_dir=out_dir / f"fold_{i}", **kwargs) for i, fold in enumerate(folds)]
    rows = [{k: v for k, v in r.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for r in results]
    table = pd.DataFrame(rows, index=[f"fold_{i}" for i in range(len(results))]).astype(float)
    stats = {col: mean_sd(table[col].to_numpy(dtype=float)) for col in table.columns}
    table.loc["mean"] = {c: s[0] for c, s in stats.items()}
    table.loc["sd"] = {c: s[1] for c, s in stats.items()}
    if int(os.environ.get("RANK", "0")) == 0:
        from gimplib.utils import atomic_path

        with atomic_path(out_dir / "summary.csv") as tmp:
            table.to_csv(tmp, index_label="fold")
        flat = {f"{c}_{s}": table.loc[s, c] for c in table.columns for s in ("mean", "sd")}
        save_json(out_dir / "metrics.json", {**flat, "n_folds": len(results)})
    return results, table
