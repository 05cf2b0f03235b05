"""What a run reads, as digests: the key that decides whether a finished run may be reused.

A run folder's ``config.json`` holds, beside the settings, an ``inputs`` entry: digests of the
cases and labels, of the gene table's values, of every bag's size and modification time, and
of each upstream checkpoint (``ckpt`` paths in the config). ``inputs.json`` beside it keeps
each bag's size and time, so that a mismatch can name the bags that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import pandas as pd

from gimplib.train.checkpoint import load_checkpoint
from gimplib.utils import DataError, exists

__all__ = ["INPUTS", "RERUN_HINT", "changed_inputs", "check_upstream", "data_fingerprint", "detail_of", "run_inputs"]

INPUTS = "inputs.json"
#: How to train a run again, as each entry point spells it.
RERUN_HINT = "overwrite=True (book runner: -p overwrite=true; gimp-train: --overwrite)"


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


_GENE_DIGESTS: dict[tuple, tuple[Any, str]] = {}


def data_fingerprint(cohort: Any) -> dict[str, Any]:
    """What a run reads from a cohort, as digests.

    Returns:
        ``cases`` (case ids, labels, slide ids), ``genes`` (the gene table's index, columns
        and values, or None), ``bags`` (every bag's path, size and modification time) and
        ``bag_stats`` (slide_id -> "size:mtime_ns", the detail behind ``bags``).
    """
    cases = cohort.cases
    slides = cohort.slides
    case_part = _digest(list(map(str, cases.index)), list(map(str, cases["label"])), list(cohort.label_names),
                        list(map(str, slides.get("slide_id", []))), list(map(str, slides.get("case_id", []))))
    genes = None
    if exists(cohort.genes):
        g = cohort.genes
        key = (id(g), g.shape)
        cached = _GENE_DIGESTS.get(key)
        if cached is not None and cached[0] is g:  # a sweep fingerprints the same table for every run
            genes = cached[1]
        else:
            values = pd.util.hash_pandas_object(g, index=True).to_numpy().tobytes()
            genes = _digest(list(map(str, g.columns)), values)
            if len(_GENE_DIGESTS) > 8:
                _GENE_DIGESTS.clear()
            _GENE_DIGESTS[key] = (g, genes)
    stats = {}
    for sid, path in zip(slides.get("slide_id", []), slides.get("path", [])):
        try:
            st = os.stat(path)
            stats[str(sid)] = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stats[str(sid)] = "missing"
    bags = _digest(sorted(stats.items())) if stats else None
    return {"cases": case_part, "genes": genes, "bags": bags, "bag_stats": stats}


def _upstream_paths(values: Any) -> list[str]:
    found: list[str] = []
    if isinstance(values, Mapping):
        for key, value in values.items():
            if key == "ckpt" and isinstance(value, (str, os.PathLike)):
                found.append(str(value))
            else:
                found.extend(_upstream_paths(value))
    elif isinstance(values, (list, tuple)):
        for value in values:
            found.extend(_upstream_paths(value))
    return found


def check_upstream(cohort: Any, values: Mapping[str, Any]) -> None:
    """Every upstream checkpoint is a gimplib checkpoint trained on bags as wide as this cohort's.

    Raises:
        NotACheckpointError: a ``ckpt`` path is not a gimplib checkpoint.
        DataError: the checkpoint was trained on features of another width (names both).
    """
    for path in _upstream_paths(values):
        cfg = load_checkpoint(path)["config"]
        dim = (cfg.get("cohort") or {}).get("feat_dim")
        if exists(dim) and exists(cohort.feat_dim) and dim != cohort.feat_dim:
            where = cohort.data_dir if exists(cohort.data_dir) else "this cohort"
            raise DataError(f"the bags of {where} are {cohort.feat_dim} features wide, but checkpoint {path} was "
                            f"trained on {dim}-wide features; use bags from the same feature extractor, or "
                            "train that stage again on these bags")


def run_inputs(cohort: Any, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's inputs: the config entry (digests) and the detail kept in ``inputs.json``.

    Args:
        cohort: the cohort the run reads.
        values: the run's other config values; every ``ckpt`` path in them is an upstream
            run, identified by its checkpoint's size and modification time.

    Returns:
        ``(entry, detail)``: ``entry`` has ``cases``, ``genes``, ``bags`` and ``upstream``
        (path -> digest); ``detail`` adds each bag's size and modification time.
    """
    fp = data_fingerprint(cohort)
    upstream = {}
    for path in _upstream_paths(values):
        try:
            st = os.stat(path)
            upstream[path] = _digest(st.st_size, st.st_mtime_ns)
        except OSError:
            upstream[path] = "missing"
    entry = {"cases": fp["cases"], "genes": fp["genes"], "bags": fp["bags"], "upstream": upstream}
    detail = {**entry, "bags": fp["bag_stats"]}
    if len(_DETAILS) > 64:
        _DETAILS.clear()
    _DETAILS[_entry_key(entry)] = detail
    return entry, detail


_DETAILS: dict[str, dict[str, Any]] = {}  # config["inputs"] -> its detail, for prepare_run


def _entry_key(entry: Any) -> str:
    return json.dumps(entry, sort_keys=True, default=str)


def detail_of(entry: Mapping[str, Any] | None) -> dict[str, Any]:
    """The detail :func:`run_inputs` computed for a config's ``inputs`` entry in this process ({} if none)."""
    return dict(_DETAILS.get(_entry_key(entry), {}))


def changed_inputs(saved: Mapping[str, Any] | None, now: Mapping[str, Any] | None,
                   old_detail: Mapping[str, Any], new_detail: Mapping[str, Any]) -> list[str]:
    """What changed between a run's recorded inputs and today's, one line each (names up to 5 bags)."""
    if not exists(saved):
        return ["the run records no fingerprint of its inputs (written by an older gimplib)"]
    now = dict(now or {})
    changes = []
    names = {"cases": "dataset.csv (cases, slides or labels)", "genes": "the gene table's values",
             "bags": "the bags (size or modification time)"}
    for key, what in names.items():
        if saved.get(key) != now.get(key):
            changes.append(f"{what} changed")
    if saved.get("bags") != now.get("bags"):
        old, new = old_detail.get("bags", {}), new_detail.get("bags", {})
        if old and new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
            changes[-1] += f": {len(diff)} of {len(new)} bag(s), e.g. {shown}"
    up_old, up_new = saved.get("upstream") or {}, now.get("upstream") or {}
    for path in sorted(set(up_old) | set(up_new)):
        if up_old.get(path) != up_new.get(path):
            changes.append(f"the upstream run {path} changed (retrained or replaced since)")
    return changes
