"""Run configurations and checkpoints: atomic saves, ``weights_only`` loads, RNG states.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) so that it loads with
``torch.load(weights_only=True)``; the NumPy RNG state is stored as a tensor for that reason.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from gimplib.utils import atomic_path, exists

__all__ = [
    "ConfigMismatchError",
    "NonFiniteLossError",
    "NotACheckpointError",
    "StaleRunError",
    "compare_configs",
    "load_checkpoint",
    "normalize_config",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


class ConfigMismatchError(ValueError):
    """A checkpoint or run folder belongs to another configuration."""


class StaleRunError(ConfigMismatchError):
    """A finished or interrupted run was made from other inputs (data or upstream runs)."""


class NotACheckpointError(ValueError):
    """A file that is not a gimplib checkpoint (truncated, another format, or not one at all)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------- configs


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


def compare_configs(saved: Mapping[str, Any], requested: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ConfigMismatchError` naming every key whose value differs.

    Args:
        saved: the config stored with a run or checkpoint.
        requested: the config of the run being started.
        where: the file or folder holding ``saved`` (quoted in the message).
    """
    saved, requested = normalize_config(saved), normalize_config(requested)
    keys = sorted(set(saved) | set(requested))
    diffs = [
        f"  {k}: saved {saved.get(k, '<absent>')!r} vs requested {requested.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k, "<absent>") != requested.get(k, "<absent>")
    ]
    if diffs:
        raise ConfigMismatchError(
            f"{where} was written by another configuration:\n" + "\n".join(diffs)
            + "\nUse another out_dir, or start this one afresh with overwrite=True "
            "(book runner: -p overwrite=true; gimp-train: --overwrite)."
        )


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """``torch.save`` ``state`` atomically (a reader never sees a half-written file)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    return path


def load_checkpoint(
    path: str | os.PathLike,
    expected_config: Mapping[str, Any] | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Args:
        path: a ``checkpoint.pt`` / ``best.pt`` written by :func:`fit`.
        expected_config: when given, the checkpoint's ``config`` must equal it, else
            :class:`ConfigMismatchError` names each differing key.
        map_location: where tensors are loaded.

    Returns:
        The checkpoint dict (keys ``model``, ``config``, ``epoch`` and, for ``checkpoint.pt``,
        ``optimizer``, ``scheduler``, ``rng``, ``history``, ``best``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file; torch's own advice (weights_only=False) is unsafe
        kind = type(err).__name__
        raise NotACheckpointError(
            f"{path} is not a gimplib checkpoint (truncated or another format: {kind}); expected the "
            "checkpoint.pt / best.pt of a gimp-train run"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise NotACheckpointError(f"{path} is not a gimplib checkpoint (expected a dict with 'model' and 'config', "
                                  "as in the checkpoint.pt / best.pt of a gimp-train run)")
    if exists(expected_config):
        compare_configs(ckpt["config"], expected_config, where=f"checkpoint {path}")
    return ckpt
