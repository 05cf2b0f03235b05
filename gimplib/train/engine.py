"""The generic training loop behind every task in :mod:`gimplib.train`.

One function, :func:`fit`, runs epochs of AdamW with a (warmup +) cosine schedule, gradient
accumulation, bf16 autocast on CUDA, an optional evaluation after each epoch that picks the
best epoch, a per-epoch CSV, atomic checkpoints and exact resumption. It is model-agnostic:
the caller passes a ``step_fn(model, batch) -> dict`` whose ``"loss"`` is minimised.

Resumption is exact (bit-for-bit on CPU): the data order of epoch ``e`` depends only on
``(seed, e)``, and the checkpoint written at the end of each epoch holds the model, the
optimiser, the scheduler and the Python / NumPy / torch random states, so that a run killed
after epoch ``k`` and restarted continues as if it had never stopped.

Under ``torchrun`` (environment ``WORLD_SIZE`` > 1) the process group is initialised (gloo on
CPU, NCCL on CUDA), each rank reads its share of every epoch through a ``DistributedSampler``
and the model is wrapped in ``DistributedDataParallel``; rank 0 evaluates and writes files.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm as terminal_tqdm
from tqdm.auto import tqdm

from gimplib.train.checkpoint import (
    ConfigMismatchError,
    NonFiniteLossError,
    compare_configs,
    load_checkpoint,
    normalize_config,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gimplib.utils import atomic_path, exists, get_device

__all__ = [
    "ConfigMismatchError",
    "DistInfo",
    "FitResult",
    "NonFiniteLossError",
    "autocast_context",
    "build_optimizer",
    "compare_configs",
    "cosine_schedule",
    "dist_info",
    "fit",
    "load_checkpoint",
    "normalize_config",
    "save_checkpoint",
    "to_device",
]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
HISTORY = "metrics.csv"


# --------------------------------------------------------------------------- optimisation


def build_optimizer(params: Iterable[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms and tokens are not decayed)."""
    decay, no_decay = [], []
    for _, p in params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps`` optimiser steps, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_context(device: torch.device, amp: str) -> Any:
    """bf16 autocast on CUDA when ``amp`` is "auto" or "bf16"; nothing elsewhere."""
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {amp!r}")
    if amp == "bf16" and device.type != "cuda":
        raise ValueError(f"amp='bf16' needs a CUDA device; got {device}")
    if amp != "none" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values pass through."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and any(torch.is_tensor(v) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info(device: torch.device | None = None) -> DistInfo:
    """Read torchrun's environment and initialise the process group when ``WORLD_SIZE`` > 1.

    The backend is NCCL when ``device`` is CUDA, gloo otherwise.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if exists(device) and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _broadcast(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# --------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    """What :func:`fit` hands back.

    Attributes:
        model: the trained (unwrapped) model with the LAST epoch's weights.
        history: one row per epoch (the content of ``metrics.csv``).
        best: ``{"epoch", "score", "metrics"}`` of the best epoch on validation, or None.
        last_path: ``out_dir/checkpoint.pt``.
        best_path: ``out_dir/best.pt`` (None without ``select``).
        device: the device trained on.
    """

    model: nn.Module
    history: pd.DataFrame
    best: dict[str, Any] | None
    last_path: Path
    best_path: Path | None
    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)


def _is_better(metrics: Mapping[str, float], best: Mapping[str, Any] | None, select: str, mode: str) -> bool:
    score = metrics[select]
    if not math.isfinite(score):
        return False
    if best is None:
        return True
    sign = 1.0 if mode == "max" else -1.0
    if sign * score > sign * best["score"]:
        return True
    # ties on a coarse metric (accuracy on a small validation set) go to the lower val loss
    loss = metrics.get("val_loss", math.nan)
    best_loss = best["metrics"].get("val_loss", math.nan)
    return score == best["score"] and math.isfinite(loss) and math.isfinite(best_loss) and loss < best_loss


#: Set to "1" (the book runner does, for the kernels it starts) to draw the training bars on
#: the process's own stderr (the terminal that started the runner) when ``progress`` is off:
#: the user sees each epoch advance, while the executed notebook, and so the book, stays free
#: of carriage-return bar text.
TERMINAL_PROGRESS = "GIMPLIB_TERMINAL_PROGRESS"


_TERMINAL: list = []


def _terminal_stream() -> Any:
    """The terminal's stderr, past a Jupyter kernel's capture: ipykernel forwards fd 2 into the
    notebook, but its ``sys.stderr.fileno()`` is a copy of the original stream (plain Python:
    fd 2 itself). Opened once per process."""
    if not _TERMINAL:
        try:
            _TERMINAL.append(os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1))
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            _TERMINAL.append(sys.__stderr__)
    return _TERMINAL[0]


def _progress(loader: Iterable, desc: str, show: bool, *, terminal: bool) -> Iterable:
    """The epoch's batches wrapped in a bar: in the notebook/terminal (``show``), else on the
    terminal's own stderr when ``terminal``, else none."""
    if show:
        return tqdm(loader, desc=desc, leave=False)
    stream = _terminal_stream() if terminal else None
    if stream is not None:
        return terminal_tqdm(loader, desc=desc, leave=False, disable=False, file=stream, mininterval=1.0)
    return loader


def fit(
    model: nn.Module,
    train_data: Dataset,
    *,
    step_fn: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    config: Mapping[str, Any],
    num_epochs: int,
    lr: float = 1e-4,
    weight_decay: float = 1e-2,
    batch_size: int = 1,
    collate_fn: Callable | None = None,
    accumulate: int = 1,
    warmup_epochs: float = 0,
    grad_clip: float | None = None,
    amp: str = "auto",
    device: str | torch.device = "auto",
    seed: int = 0,
    num_workers: int = 0,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    select: str | None = None,
    mode: str = "max",
    extras: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callable[[int, Mapping[str, float]], None]] = (),
    progress: bool = True,
    desc: str = "train",
    find_unused_parameters: bool = True,
) -> FitResult:
    """Train ``model`` for ``num_epochs`` epochs, resuming from ``out_dir/checkpoint.pt`` if present.

    Args:
        model: the module to train; parameters with ``requires_grad=False`` are left alone
            (frozen encoders). Moved to ``device``.
        train_data: a map-style dataset; if it has ``set_epoch(epoch)`` it is called each
            epoch (random windows).
        step_fn: ``step_fn(model, batch) -> {"loss": scalar tensor, other: scalar tensors}``;
            ``batch`` is already on the device; the other entries are logged as ``train_<key>``.
        out_dir: run folder (``checkpoint.pt``, ``best.pt``, ``metrics.csv``).
        config: JSON-able description of the run, stored in every checkpoint; resuming
            from a checkpoint with another config raises :class:`ConfigMismatchError`.
        num_epochs: epochs in total (including those already done before a resume).
        lr, weight_decay: AdamW settings; the learning rate follows a cosine to 0.
        batch_size: samples per micro-batch (per rank under DDP).
        collate_fn: the DataLoader's collate function.
        accumulate: micro-batches per optimiser step (gradient accumulation).
        warmup_epochs: linear warmup length in epochs (may be fractional).
        grad_clip: max global gradient norm, None for no clipping.
        amp: "auto" (bf16 autocast on CUDA), "bf16" (CUDA only) or "none".
        device: "auto", "cpu", "cuda", ...; under DDP on CUDA, ``cuda:LOCAL_RANK``.
        seed: seeds the data order (epoch ``e`` shuffles with ``seed + e``).
        num_workers: DataLoader workers.
        eval_fn: ``eval_fn(model) -> {name: float}`` run after each epoch on rank 0 with the
            unwrapped model in eval mode under ``torch.no_grad``.
        select: key of ``eval_fn``'s output that picks ``best.pt`` (None: no best.pt).
        mode: "max" or "min" for ``select``.
        extras: JSON/tensor values stored in every checkpoint (label names, gene transform).
        callbacks: ``cb(epoch, row)`` after each epoch's checkpoint is written (an exception
            raised here stops training with the checkpoint intact, as a kill would).
        progress: show tqdm bars.
        desc: label of the progress bar.
        find_unused_parameters: DDP option; True tolerates branches that some steps skip
            (a switched-off loss, CLAM's instance branch) at a small cost per step.

    Returns:
        A :class:`FitResult`.

    Raises:
        NonFiniteLossError: a loss was NaN/inf; ``checkpoint.pt`` is the last good epoch's.
        ConfigMismatchError: ``out_dir`` holds a checkpoint of another configuration.
    """
    if num_epochs < 1 or accumulate < 1 or batch_size < 1:
        raise ValueError("num_epochs, accumulate and batch_size must be >= 1")
    if exists(select) and not exists(eval_fn):
        raise ValueError("select needs an eval_fn")
    run = _start(model, train_data, out_dir=Path(out_dir), config=config, device=device, seed=seed,
                 batch_size=batch_size, accumulate=accumulate, lr=lr, weight_decay=weight_decay,
                 num_epochs=num_epochs, warmup_epochs=warmup_epochs, extras=extras, desc=desc,
                 find_unused_parameters=find_unused_parameters)
    start_epoch, history, best = _resume(run)
    for epoch in range(start_epoch, num_epochs):
        t0 = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "lr": run.optimizer.param_groups[0]["lr"]}
        row.update(_train_epoch(run, train_data, epoch, step_fn=step_fn, batch_size=batch_size, collate_fn=collate_fn,
                                num_workers=num_workers, seed=seed, accumulate=accumulate, grad_clip=grad_clip,
                                amp=amp, progress=progress, bar_desc=f"{desc} {epoch + 1}/{num_epochs}"))
        metrics = _evaluate(run, eval_fn, amp)
        if exists(metrics):
            row.update(metrics)
        row["time_s"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        best = _save_epoch(run, epoch, history, best, metrics, select=select, mode=mode)
        for cb in callbacks:
            cb(epoch, row)

    return FitResult(
        model=run.model,
        history=pd.DataFrame(history),
        best=best,
        last_path=run.last_path,
        best_path=run.best_path if exists(select) else None,
        device=run.device,
        dist=run.info,
    )


@dataclass
class _Run:
    """What the pieces of one :func:`fit` call share."""

    model: nn.Module  # the unwrapped model (evaluated and saved)
    train_model: nn.Module  # the model trained (DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: DistributedSampler
    n_batches: int
    device: torch.device
    info: DistInfo
    out_dir: Path
    config: dict[str, Any]
    extras: Mapping[str, Any]
    desc: str

    @property
    def last_path(self) -> Path:
        return self.out_dir / CHECKPOINT

    @property
    def best_path(self) -> Path:
        return self.out_dir / BEST


def _start(model: nn.Module, train_data: Dataset, *, out_dir: Path, config: Mapping[str, Any],
           device: str | torch.device, seed: int, batch_size: int, accumulate: int, lr: float, weight_decay: float,
           num_epochs: int, warmup_epochs: float, extras: Mapping[str, Any] | None, desc: str,
           find_unused_parameters: bool) -> _Run:
    """Device and process group, the model on it (wrapped under DDP), sampler, optimiser, schedule."""
    device = get_device(device)
    info = dist_info(device)
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
    sampler = DistributedSampler(train_data, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed)
    n_batches = math.ceil(len(sampler) / batch_size)
    if n_batches == 0:
        raise ValueError(f"{desc}: the training set is empty")
    steps_per_epoch = math.ceil(n_batches / accumulate)
    optimizer = build_optimizer(model.named_parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = cosine_schedule(
        optimizer, total_steps=num_epochs * steps_per_epoch, warmup_steps=round(warmup_epochs * steps_per_epoch)
    )
    return _Run(model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
                n_batches=n_batches, device=device, info=info, out_dir=out_dir, config=normalize_config(config),
                extras=dict(extras or {}), desc=desc)


def _resume(run: _Run) -> tuple[int, list[dict[str, Any]], dict[str, Any] | None]:
    """(first epoch to train, history so far, best so far): from ``checkpoint.pt`` when there is one."""
    start_epoch, history, best = 0, [], None
    _barrier(run.info)  # rank 0 may still be clearing the folder (overwrite=True)
    if run.last_path.exists():
        ckpt = load_checkpoint(run.last_path, expected_config=run.config, map_location=run.device)
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch, history, best = ckpt["epoch"] + 1, list(ckpt["history"]), ckpt.get("best")
    _barrier(run.info)
    return start_epoch, history, best


def _train_epoch(run: _Run, train_data: Dataset, epoch: int, *, step_fn: Callable[[nn.Module, Any], Mapping],
                 batch_size: int, collate_fn: Callable | None, num_workers: int, seed: int, accumulate: int,
                 grad_clip: float | None, amp: str, progress: bool, bar_desc: str) -> dict[str, float]:
    """One pass over the training data; returns the epoch means ``{"train_<key>": value}`` of
    ``step_fn``'s outputs (averaged over ranks).

    Raises:
        NonFiniteLossError: a loss was NaN/inf (on any rank).
    """
    info, device, n_batches = run.info, run.device, run.n_batches
    run.sampler.set_epoch(epoch)
    if hasattr(train_data, "set_epoch"):
        train_data.set_epoch(epoch)
    loader = DataLoader(
        train_data,
        batch_size=batch_size,
        sampler=run.sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
        pin_memory=device.type == "cuda",
    )
    run.train_model.train()
    sums: dict[str, float] = {}
    bar = _progress(loader, bar_desc, progress and info.is_main,
                    terminal=info.is_main and os.environ.get(TERMINAL_PROGRESS) == "1")
    run.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(bar):
        group_start = (i // accumulate) * accumulate
        group_size = min(accumulate, n_batches - group_start)
        last_in_group = i == group_start + group_size - 1
        sync = run.train_model.no_sync() if info.distributed and not last_in_group else nullcontext()
        with sync:
            with autocast_context(device, amp):
                out = step_fn(run.train_model, to_device(batch, device))
            loss = out["loss"]
            _check_finite(run, loss, epoch, i)
            (loss / group_size).backward()
        if last_in_group:
            if exists(grad_clip):
                nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.4f}", refresh=False)
    if hasattr(bar, "close"):
        bar.close()

    means = torch.tensor([sums[k] / n_batches for k in sorted(sums)], dtype=torch.float64)
    if info.distributed:
        dist.all_reduce(means)
        means /= info.world_size
    return {f"train_{k}": float(v) for k, v in zip(sorted(sums), means.tolist())}


def _check_finite(run: _Run, loss: torch.Tensor, epoch: int, step: int) -> None:
    """Stop on a NaN/inf loss (on any rank), naming the epoch, step and the last good checkpoint."""
    finite = torch.isfinite(loss.detach()).float()
    if run.info.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item() < 1:
        done = f"the last good checkpoint is {run.last_path} (epoch {epoch - 1})"
        if epoch == 0:
            done = "no epoch finished, so there is no checkpoint"
        raise NonFiniteLossError(
            f"{run.desc}: non-finite loss ({loss.item()}) at epoch {epoch} (0-based), step {step} "
            f"of {run.n_batches}, run {run.out_dir}; {done}. Try a lower lr, grad_clip, or check the inputs."
        )


def _evaluate(run: _Run, eval_fn: Callable[[nn.Module], Mapping[str, float]] | None,
              amp: str) -> dict[str, float] | None:
    """``eval_fn`` on rank 0 with the unwrapped model in eval mode, shared with every rank (None without one)."""
    metrics = None
    if exists(eval_fn) and run.info.is_main:
        run.model.eval()
        with torch.no_grad(), autocast_context(run.device, amp):
            metrics = {k: float(v) for k, v in eval_fn(run.model).items()}
    return _broadcast(metrics, run.info)


def _save_epoch(run: _Run, epoch: int, history: list[dict[str, Any]], best: dict[str, Any] | None,
                metrics: Mapping[str, float] | None, *, select: str | None, mode: str) -> dict[str, Any] | None:
    """Rank 0 writes ``best.pt`` (when this epoch is the best on ``select``), ``metrics.csv`` and
    ``checkpoint.pt`` (everything a resume needs); returns the best epoch so far, on every rank."""
    if run.info.is_main:
        if exists(select):
            if select not in metrics:
                raise KeyError(f"select={select!r} is not among the eval metrics {sorted(metrics)}")
            if _is_better(metrics, best, select, mode):
                best = {"epoch": epoch, "score": metrics[select], "metrics": metrics}
                save_checkpoint(run.best_path, {"model": run.model.state_dict(), "config": run.config, "epoch": epoch,
                                                "metrics": metrics, **run.extras})
        with atomic_path(run.out_dir / HISTORY) as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
        save_checkpoint(run.last_path, {
            "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rng_state(), "epoch": epoch,
            "config": run.config, "history": history, "best": best, **run.extras,
        })
    best = _broadcast(best, run.info)
    _barrier(run.info)
    return best
