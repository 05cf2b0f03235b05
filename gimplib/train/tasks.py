"""Supervised training tasks: the gene encoder (GiMP's first stage, and the gene-only
baseline), the compared systems, and the k-fold driver.

Every task takes a :class:`~gimplib.data.cohort.Cohort`, a split ``{"train", "val", "test":
[case_id, ...]}``, its own settings and the shared :class:`~gimplib.train.options.TrainOptions`
(as ``options=`` or as keywords), trains through :func:`gimplib.train.engine.fit` into
``out_dir`` and returns a :class:`~gimplib.train.common.RunResult`. A finished run with the
same configuration is reused; an interrupted one resumes; ``overwrite=True`` starts afresh.
The epoch kept is the best on validation ``select`` (default accuracy; ties go to the lower
validation loss); test figures come from that epoch, with bootstrap 95% intervals.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from gimplib.data.datasets import GeneDataset, collate_bags
from gimplib.data.genes import GeneTransform
from gimplib.metrics import mean_sd
from gimplib.models.baselines import SYSTEMS, build_baseline, canonical_name
from gimplib.models.gene_encoders import build_gene_encoder
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
from gimplib.train.engine import FitResult, fit
from gimplib.train.inference import Task
from gimplib.train.options import TrainOptions
from gimplib.utils import atomic_path, exists, save_json, seed_everything

__all__ = ["TrainOptions", "fit_with", "kfold", "make_config", "run_supervised", "start_run", "train_baseline",
           "train_gene_encoder"]


def _supervised_step(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = model(batch)
    ce = F.cross_entropy(out["logits"].float(), batch["y"].reshape(-1))
    acc = (out["logits"].argmax(-1) == batch["y"].reshape(-1)).float().mean()
    if "loss_aux" in out:
        return {"loss": ce + out["loss_aux"], "ce": ce, "aux": out["loss_aux"].detach(), "acc": acc}
    return {"loss": ce, "acc": acc}


def _logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return model(batch, with_y=False)["logits"]


def fit_with(model: nn.Module, train_data: Any, opts: TrainOptions, **kwargs: Any) -> FitResult:
    """:func:`~gimplib.train.engine.fit` with the engine keywords that ``opts`` sets
    (``kwargs``: the rest, ``step_fn``, ``out_dir``, ``config``, ``eval_fn`` ...)."""
    return fit(model, train_data, **opts.fit_kwargs(), **kwargs)


def start_run(out_dir: Path, config: Mapping[str, Any], opts: TrainOptions) -> RunResult | None:
    """The finished run in ``out_dir`` when it can be reused (see
    :func:`~gimplib.train.common.prepare_run`); else None, with the folder prepared and every
    random generator seeded from ``opts.seed``: train."""
    done = prepare_run(out_dir, config, opts.overwrite)
    if done is None:
        seed_everything(opts.seed, opts.deterministic)
    return done


def run_supervised(*, entry: str, net: nn.Module, config: dict[str, Any], out_dir: Path, train_ds: Any,
                   eval_sets: Mapping[str, Any], collate_fn: Callable | None, opts: TrainOptions,
                   select: str, extras: Mapping[str, Any], eval_batch_size: int) -> RunResult:
    """Train a classifier task, keep the best epoch on validation, evaluate val + test with CIs."""
    task = Task(net, entry)
    loaders = {part: loader_for(ds, batch_size=eval_batch_size, collate_fn=collate_fn, num_workers=opts.num_workers)
               for part, ds in eval_sets.items()}
    res = fit_with(task, train_ds, opts, step_fn=_supervised_step, out_dir=out_dir, config=config,
                   collate_fn=collate_fn,
                   eval_fn=epoch_eval_fn(_logits, loaders["val"], lambda: next(task.parameters()).device),
                   select=f"val_{select}", mode="min" if select == "loss" else "max", extras=extras, desc=entry)
    metrics: dict[str, Any] = {"best_epoch": None}
    predictions = None
    if res.dist.is_main:
        # no best.pt when the selection metric was never finite (e.g. AUC on a one-class val set)
        path = res.best_path if res.best_path.is_file() else res.last_path
        best = load_checkpoint(path, map_location=res.device)
        task.load_state_dict(best["model"])
        task.eval()
        metrics, predictions = final_evaluation(lambda b: _logits(task, b), loaders, res.device,
                                                n_boot=opts.n_boot, seed=opts.seed, progress=opts.progress)
        metrics = {"best_epoch": int(best["epoch"]), **metrics}
    return finish_run(out_dir, metrics, predictions)


def make_config(task: str, cohort: Any, split: Mapping[str, Sequence[str]], *, options: TrainOptions | None = None,
                **values: Any) -> dict[str, Any]:
    """A run's config: the task, the cohort and split identity (sizes + digest), ``values``, the
    recorded fields of ``options`` (:meth:`TrainOptions.config`), and ``inputs``: digests of the
    data and upstream checkpoints it reads (see :func:`~gimplib.train.common.run_inputs`), so a
    changed input is never silently reused.

    Raises:
        DataError: the split names unknown cases, or its training part holds a single class.
    """
    check_ids(cohort, split)
    check_classes(cohort, split)
    check_upstream(cohort, values)
    if exists(options):
        values = {**values, **options.config()}
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
    select: str = "accuracy",
    options: TrainOptions | None = None,
    **option_kw: Any,
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
        select: validation metric that picks the best epoch (``accuracy``, ``auc``, ``loss`` ...).
        options: the shared :class:`TrainOptions` (here ``num_epochs`` defaults to 50 and
            ``batch_size`` to 32).
        **option_kw: any field of :class:`TrainOptions` (``num_epochs``, ``lr``, ``seed``,
            ``device`` ...), overriding ``options``.

    Returns:
        :class:`RunResult`; ``checkpoint`` is ``best.pt``.
    """
    out_dir = Path(out_dir)
    opts = TrainOptions.for_task(train_gene_encoder, options, option_kw, num_epochs=50, batch_size=32)
    transform = gene_transform_settings(gene_transform=gene_transform, standardize=standardize, top_k_var=top_k_var,
                                        clip=clip, gene_order=gene_order, seed=opts.seed)
    config = make_config("genes", cohort, split, encoder=encoder, encoder_kwargs=dict(encoder_kwargs or {}),
                         gene_transform=transform, select=select, options=opts)
    if done := start_run(out_dir, config, opts):
        return done
    gt = _fit_transform(cohort, split["train"], transform)
    kwargs = {**config["encoder_kwargs"], "num_genes": gt.num_genes, "num_classes": len(cohort.label_names)}
    net = build_gene_encoder(encoder, **kwargs)
    parts = {p: list(split[p]) for p in ("train", "val", "test") if split.get(p)}
    sets = {p: GeneDataset(cohort, ids, gene_matrix(cohort, gt, ids)) for p, ids in parts.items()}
    extras = {"gene_transform": gt.state_dict(), "label_names": list(cohort.label_names), "build": kwargs}
    return run_supervised(entry="genes", net=net, config=config, out_dir=out_dir,
                          train_ds=sets.pop("train"), eval_sets=sets, collate_fn=None, opts=opts,
                          select=select, extras=extras, eval_batch_size=max(opts.batch_size, 64))


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
    GeneTransform(**out)  # a bad value fails here, before the run folder is touched
    return out


def _fit_transform(cohort: Any, train_ids: Sequence[str], settings: Mapping[str, Any]) -> Any:
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
    select: str = "accuracy",
    options: TrainOptions | None = None,
    **option_kw: Any,
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
        input, window_len, max_patches, select: as for :func:`finetune`.
        options, \\*\\*option_kw: the shared :class:`TrainOptions` (``num_epochs`` defaults to 70,
            ``batch_size`` to 1), as for :func:`train_gene_encoder`.

    Returns:
        :class:`RunResult`.
    """
    out_dir = Path(out_dir)
    key = canonical_name(name)
    if key not in SYSTEMS:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(SYSTEMS)}")
    if SYSTEMS[key].trainer != "train_baseline":
        raise ValueError(f"{name!r} is a pretraining system: run pretrain_baseline, then finetune(pretrained_ckpt=...)")
    genes = SYSTEMS[key].reads_genes if use_genes is None else bool(use_genes)
    opts = TrainOptions.for_task(train_baseline, options, option_kw, num_epochs=70, batch_size=1)
    transform = gene_transform_settings(gene_transform=gene_transform, standardize=standardize, top_k_var=top_k_var,
                                        clip=clip, gene_order=gene_order, seed=opts.seed) if genes else None
    config = make_config("baseline", cohort, split, name=key, model_kwargs=dict(model_kwargs or {}),
                         gene_transform=transform, input=input, window_len=window_len, max_patches=max_patches,
                         select=select, options=opts)
    if done := start_run(out_dir, config, opts):
        return done
    gt = _fit_transform(cohort, split["train"], transform) if genes else None
    build = {"in_dim": cohort.feat_dim, "num_classes": len(cohort.label_names)}
    if genes:
        build["num_genes"] = gt.num_genes
    build.update(config["model_kwargs"])
    net = build_baseline(key, **build)
    sets = bag_sets(cohort, split, input=input, window_len=window_len, max_patches=max_patches, seed=opts.seed,
                    gt=gt)
    extras = {"label_names": list(cohort.label_names), "build": build}
    if exists(gt):
        extras["gene_transform"] = gt.state_dict()
    return run_supervised(entry="baseline", net=net, config=config, out_dir=out_dir,
                          train_ds=sets.pop("train"), eval_sets=sets, collate_fn=collate_bags, opts=opts,
                          select=select, extras=extras, eval_batch_size=1)


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
        with atomic_path(out_dir / "summary.csv") as tmp:
            table.to_csv(tmp, index_label="fold")
        flat = {f"{c}_{s}": table.loc[s, c] for c in table.columns for s in ("mean", "sd")}
        save_json(out_dir / "metrics.json", {**flat, "n_folds": len(results)})
    return results, table
