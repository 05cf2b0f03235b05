"""The training options every task shares (:class:`TrainOptions`), and their checks.

Each task of :mod:`gimplib.train` (:func:`~gimplib.train.train_gene_encoder`,
:func:`~gimplib.train.train_baseline`, :func:`~gimplib.train.pretrain_gimp`,
:func:`~gimplib.train.pretrain_baseline`, :func:`~gimplib.train.finetune`) takes
``options=TrainOptions(...)`` and shows in its signature only what is its own. To keep calls
short, a task also takes any field of :class:`TrainOptions` as a keyword
(``finetune(cohort, split, out_dir=..., lr=1e-3, seed=2)``); a keyword given together with
``options=`` overrides that field of ``options``. An unknown keyword is a ``TypeError`` that
names the task and the keywords it knows.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = ["CONFIG_FIELDS", "TrainOptions"]

#: The fields recorded in a run's ``config.json`` (a change is a different run); the others
#: (device, workers, overwrite, progress, callbacks) change how a run is made, not what it is.
CONFIG_FIELDS = ("num_epochs", "lr", "weight_decay", "batch_size", "accumulate", "warmup_epochs", "grad_clip",
                 "amp", "seed", "deterministic", "n_boot")

#: name -> (kind, lowest value, example): what each numeric option takes.
_OPTION_TYPES = {"num_epochs": ("int", 1, 50), "batch_size": ("int", 1, 8), "accumulate": ("int", 1, 1),
                 "warmup_epochs": ("int", 0, 0), "seed": ("int", None, 0), "n_boot": ("int", 0, 1000),
                 "lr": ("number", 0, "1.0e-4"), "weight_decay": ("number", 0, "1.0e-2"),
                 "grad_clip": ("number", 0, "1.0")}


@dataclass(frozen=True)
class TrainOptions:
    """How a task trains: the options every task shares.

    Attributes:
        num_epochs: training length; None: the task's default (gene encoder 50,
            pre-training 100, fine-tuning and baselines 70).
        batch_size: samples per step; None: the task's default (gene encoder 32,
            pre-training 8 windows, fine-tuning and baselines 1 bag).
        lr, weight_decay: AdamW; the learning rate follows a cosine to 0.
        accumulate: micro-batches per optimiser step.
        warmup_epochs: linear warmup length in epochs.
        grad_clip: max global gradient norm (None: no clipping).
        amp: ``"auto"`` (bf16 autocast on CUDA), ``"bf16"`` or ``"none"``.
        seed: the training seed (initialisation, data order, windows, masks, bootstrap).
        deterministic: ask torch for deterministic kernels.
        n_boot: bootstrap resamples of the test metrics' 95% intervals.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        num_workers: DataLoader workers.
        overwrite: train afresh instead of reusing a finished run or resuming an unfinished one.
        progress: show progress bars.
        callbacks: ``cb(epoch, row)`` after each epoch's checkpoint (not part of the config).
    """

    num_epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-2
    accumulate: int = 1
    warmup_epochs: float = 0
    grad_clip: float | None = None
    amp: str = "auto"
    seed: int = 0
    deterministic: bool = False
    n_boot: int = 1000
    device: str = "auto"
    num_workers: int = 0
    overwrite: bool = False
    progress: bool = True
    callbacks: Sequence[Callable[[int, Mapping[str, float]], None]] = ()

    @classmethod
    def for_task(cls, task: Callable[..., Any], options: TrainOptions | None, keywords: Mapping[str, Any],
                 *, num_epochs: int, batch_size: int) -> TrainOptions:
        """The options of one task call: ``options`` (default: all defaults), then ``keywords``
        (the fields given as keywords, which win), then the task's own ``num_epochs`` and
        ``batch_size`` defaults where still None; checked.

        Raises:
            TypeError: a keyword that is neither the task's nor a field (naming the task and both lists).
            ValueError: a value of the wrong type or range (naming the option and an example).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - names)
        if unknown:
            own = [p.name for p in inspect.signature(task).parameters.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "options"]
            raise TypeError(f"{task.__name__}() got unexpected keyword argument(s) {unknown}; its own keywords "
                            f"are {sorted(own)} and the training options (TrainOptions) are {sorted(names)}")
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"{task.__name__}(): options must be a TrainOptions, got {type(options).__name__}")
        opts = dataclasses.replace(options or cls(), **keywords)
        defaults = {k: v for k, v in dict(num_epochs=num_epochs, batch_size=batch_size).items()
                    if getattr(opts, k) is None}
        opts = dataclasses.replace(opts, **defaults, callbacks=tuple(opts.callbacks))
        opts.check()
        return opts

    def check(self) -> None:
        """A value of the wrong type fails here, named, before any run folder is touched
        (``-p num_epochs=three`` would otherwise fail deep in training)."""
        for name, (kind, low, example) in _OPTION_TYPES.items():
            value = getattr(self, name)
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
        if self.deterministic not in (True, False):
            raise ValueError(f"deterministic={self.deterministic!r}: expected true or false")

    def config(self) -> dict[str, Any]:
        """The fields a run's ``config.json`` records (:data:`CONFIG_FIELDS`)."""
        return {name: getattr(self, name) for name in CONFIG_FIELDS}

    def fit_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`gimplib.train.engine.fit` these options set."""
        keys = ("num_epochs", "lr", "weight_decay", "batch_size", "accumulate", "warmup_epochs", "grad_clip", "amp",
                "device", "seed", "num_workers", "callbacks", "progress")
        return {k: getattr(self, k) for k in keys}
