"""Small shared helpers: seeds, devices, atomic writes, JSON, the data error type."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

__all__ = [
    "DataError",
    "atomic_path",
    "default",
    "exists",
    "get_device",
    "load_json",
    "save_json",
    "seed_everything",
    "sha256_file",
    "strict_json",
]


class DataError(ValueError):
    """Bad input data. The message names the file, case or slide and what was expected."""


def exists(value: Any) -> bool:
    """True when ``value`` is not None."""
    return value is not None


def default(value: Any, fallback: Any) -> Any:
    """``value`` unless it is None, else ``fallback``."""
    return value if value is not None else fallback


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices).

    Args:
        seed: the seed.
        deterministic: also ask torch for deterministic kernels (slower; some CUDA ops
            then need ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which is set here if unset).
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def get_device(spec: str | torch.device = "auto") -> torch.device:
    """Resolve a device name; ``"auto"`` picks CUDA, then MPS, then CPU."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(spec)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was,
    so a reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600; give the file the mode the user's umask asks for
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Why a number was written as null (strict JSON has no NaN or infinity).
NULL_REASON = "not a finite number ({}); undefined here, e.g. an AUC on a set that holds a single class"


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None; each mapping that had one gains a
    ``null_reasons`` entry (key -> why), so the file stays strict JSON and says why."""
    if isinstance(obj, dict):
        out, reasons = {}, {}
        for key, value in obj.items():
            if isinstance(value, (float, np.floating)) and not np.isfinite(value):
                out[key] = None
                reasons[str(key)] = NULL_REASON.format(float(value))
            else:
                out[key] = strict_json(value)
        if reasons:
            out["null_reasons"] = {**out.get("null_reasons", {}), **reasons} \
                if isinstance(out.get("null_reasons"), dict) else reasons
        return out
    if isinstance(obj, (list, tuple)):
        return [None if isinstance(v, (float, np.floating)) and not np.isfinite(v) else strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, np.generic):
        return strict_json(obj.item())
    return obj


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON, atomically. NumPy scalars are converted; NaN and
    infinity become null with a reason (see :func:`strict_json`)."""

    def _convert(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(strict_json(obj), indent=2, sort_keys=True, default=_convert, allow_nan=False) + "\n")
    return path


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks): a checkpoint's or a weights file's identity."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
