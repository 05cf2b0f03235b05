"""Patient-level splits: train/val/test, k-fold, and CLAM's split files.

Patients (cases), never slides, are the unit: a cohort's ``cases`` are already one row
per patient, so every split here is grouped by construction, and :func:`check_disjoint`
guards splits that come from elsewhere. Splits are stratified by label and seeded.
A split is a ``dict`` with keys ``train``, ``val``, ``test``, each a list of case ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from gimplib.data.cohort import Cohort, load_cohort, normalize_slide_id
from gimplib.utils import DataError, atomic_path

__all__ = [
    "CLAM_SPLIT",
    "PARTS",
    "check_disjoint",
    "decide_split",
    "describe_split_source",
    "kfold_splits",
    "read_clam_split",
    "train_val_test_split",
    "write_clam_split",
]

PARTS = ("train", "val", "test")

#: Where a cohort folder keeps the CLAM split file that :func:`decide_split` uses when present.
CLAM_SPLIT = Path("splits") / "splits_0.csv"


def _largest_remainder(total: int, weights: Sequence[float]) -> np.ndarray:
    """Integers summing to ``total`` in proportion to ``weights``."""
    w = np.asarray(weights, dtype=np.float64)
    quota = total * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _apportion(class_sizes: np.ndarray, part_sizes: np.ndarray) -> np.ndarray:
    """A (classes, parts) table of counts whose rows sum to ``class_sizes`` and columns to
    ``part_sizes``, each cell as close as possible to proportional (stratification)."""
    n = class_sizes.sum()
    quota = np.outer(class_sizes, part_sizes) / max(n, 1)
    table = np.floor(quota).astype(np.int64)
    row_left = class_sizes - table.sum(1)
    col_left = part_sizes - table.sum(0)
    # hand out the remaining units, largest fractional remainder first
    for idx in np.argsort(-(quota - table), axis=None, kind="stable"):
        c, p = np.unravel_index(idx, table.shape)
        if row_left[c] > 0 and col_left[p] > 0:
            table[c, p] += 1
            row_left[c] -= 1
            col_left[p] -= 1
    for c in range(table.shape[0]):  # whatever the greedy pass could not place
        for p in range(table.shape[1]):
            k = min(row_left[c], col_left[p])
            table[c, p] += k
            row_left[c] -= k
            col_left[p] -= k
    return table


def _stratified_parts(case_ids: list[str], y: np.ndarray, part_sizes: np.ndarray, rng: np.random.Generator) -> list[list[str]]:
    classes = np.unique(y)
    class_sizes = np.array([(y == c).sum() for c in classes])
    table = _apportion(class_sizes, part_sizes)
    parts: list[list[str]] = [[] for _ in part_sizes]
    for ci, c in enumerate(classes):
        members = [case_ids[i] for i in np.flatnonzero(y == c)]
        members = [members[i] for i in rng.permutation(len(members))]
        start = 0
        for p, k in enumerate(table[ci]):
            parts[p].extend(members[start : start + k])
            start += k
    order = {c: i for i, c in enumerate(case_ids)}
    return [sorted(p, key=order.__getitem__) for p in parts]


def train_val_test_split(
    cohort: Cohort, *, seed: int = 0, sizes: Sequence[float] = (567, 189, 190)
) -> dict[str, list[str]]:
    """One patient-level, label-stratified train/val/test split.

    Args:
        cohort: the cohort.
        seed: seed of the shuffle.
        sizes: relative sizes of train, val, test (the paper's 567/189/190 by default;
            scaled to the cohort, so a 946-case cohort gets exactly those counts).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of case ids (cohort order).
    """
    if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) <= 0:
        raise ValueError(f"sizes must be three non-negative numbers, got {sizes}")
    case_ids = cohort.case_ids
    part_sizes = _largest_remainder(len(case_ids), sizes)
    parts = _stratified_parts(case_ids, cohort.labels_of(case_ids), part_sizes, np.random.default_rng(seed))
    split = dict(zip(PARTS, parts))
    check_disjoint(split)
    return split


def kfold_splits(
    cohort: Cohort, *, k: int = 5, seed: int = 0, val_fraction: float = 0.1
) -> list[dict[str, list[str]]]:
    """Patient-level, label-stratified k-fold cross-validation.

    Each case is in the test part of exactly one fold; the validation part of a fold is a
    stratified ``val_fraction`` of all cases drawn from the remaining k-1 folds.

    Args:
        cohort: the cohort.
        k: number of folds (>= 2).
        seed: seed of the shuffles.
        val_fraction: share of the whole cohort used for validation in each fold (0 = none).

    Returns:
        ``k`` dicts ``{"train", "val", "test"}`` of case ids.
    """
    case_ids = cohort.case_ids
    if not 2 <= k <= len(case_ids):
        raise ValueError(f"k must be in [2, {len(case_ids)}], got {k}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    y = cohort.labels_of(case_ids)
    folds = _stratified_parts(case_ids, y, _largest_remainder(len(case_ids), [1] * k), rng)
    label = dict(zip(case_ids, y))
    out = []
    for i, test in enumerate(folds):
        rest = [c for j, fold in enumerate(folds) if j != i for c in fold]
        n_val = min(int(round(val_fraction * len(case_ids))), len(rest) - 1)
        y_rest = np.array([label[c] for c in rest])
        train, val = _stratified_parts(rest, y_rest, np.array([len(rest) - n_val, n_val]), rng)
        split = {"train": train, "val": val, "test": list(test)}
        check_disjoint(split)
        out.append(split)
    return out


def check_disjoint(split: dict[str, Sequence[str]]) -> None:
    """Raise if a patient is in two parts of a split.

    Raises:
        DataError: naming the patient and the parts it is in.
    """
    seen: dict[str, str] = {}
    for part, ids in split.items():
        for case in dict.fromkeys(ids):
            if case in seen and seen[case] != part:
                raise DataError(f"patient {case!r} is in both {seen[case]!r} and {part!r}; splits must be patient-disjoint")
            seen[case] = part


def read_clam_split(
    path: str | os.PathLike, cohort: Cohort, *, allow_missing: bool = False
) -> dict[str, list[str]]:
    """Read a CLAM split file (``splits/splits_{k}.csv``) unchanged.

    CLAM writes columns ``train``, ``val``, ``test`` of slide ids, padded with empty cells
    where the parts differ in length, plus an unnamed index column. Slides are mapped to
    their cases; a case with several slides appears once.

    Args:
        path: the split CSV.
        cohort: the cohort the slide ids refer to. Case ids are accepted too (genes-only
            cohorts have no slides).
        allow_missing: skip (and report) ids not in the cohort, e.g. cases dropped by
            ``drop_incomplete``, instead of raising.

    Returns:
        ``{"train", "val", "test"}`` of case ids (file order).

    Raises:
        DataError: a missing column, an id not in the cohort, or a patient in two parts.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: split file not found")
    df = pd.read_csv(path, dtype=str)
    missing_cols = [p for p in PARTS if p not in df.columns]
    if missing_cols:
        raise DataError(f"{path}: no column(s) {missing_cols} (has {list(df.columns)}); expected train, val, test")
    slide_to_case = dict(zip(cohort.slides["slide_id"], cohort.slides["case_id"])) if cohort.has_slides else {}
    cases = set(cohort.case_ids)
    split: dict[str, list[str]] = {}
    skipped = []
    for part in PARTS:
        ids = []
        for raw in df[part].dropna():
            name = normalize_slide_id(raw)
            if name == "":
                continue
            case = slide_to_case.get(name, name if name in cases else None)
            if case is None:
                if allow_missing:
                    skipped.append(name)
                    continue
                raise DataError(
                    f"{path}: {part} names slide {name!r}, which is not in the cohort "
                    "(not in dataset.csv, or dropped as incomplete)"
                )
            ids.append(case)
        split[part] = list(dict.fromkeys(ids))
    if skipped:
        print(f"read_clam_split: {path.name}: skipped {len(skipped)} id(s) not in the cohort")
    try:
        check_disjoint(split)
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    return split


def write_clam_split(path: str | os.PathLike, split: dict[str, Sequence[str]], cohort: Cohort) -> Path:
    """Write a split as CLAM does (slide ids, ragged columns, index column), atomically.

    Every slide of a case goes to the case's part; a genes-only cohort writes case ids.
    """
    path = Path(path)
    check_disjoint(split)
    columns = {}
    for part in PARTS:
        ids = list(split.get(part, []))
        if cohort.has_slides:
            by_case = cohort.slides.groupby("case_id", sort=False)["slide_id"].apply(list).to_dict()
            ids = [s for c in ids for s in by_case.get(c, [])]
        columns[part] = pd.Series(ids, dtype=object)
    with atomic_path(path) as tmp:
        pd.DataFrame(columns).to_csv(tmp)
    return path


def decide_split(
    cohort: Cohort,
    *,
    cohort_dir: str | os.PathLike | None = None,
    clam_split: str | os.PathLike | None = None,
    fold: int | None = None,
    k: int = 5,
    seed: int = 0,
    sizes: Sequence[float] = (567, 189, 190),
) -> tuple[dict[str, list[str]], dict]:
    """The one rule that picks a cohort's train/val/test split (the notebooks and ``gimp-train``).

    In order: the CLAM split file ``clam_split`` when given; fold ``fold`` of
    :func:`kfold_splits` (``k`` folds, ``seed``) when given; the cohort's own CLAM split file
    ``cohort_dir/splits/splits_0.csv`` when it exists; otherwise the seeded, stratified
    :func:`train_val_test_split` (``seed``, ``sizes``).

    Args:
        cohort: the cohort the split is of.
        cohort_dir: the cohort's folder, where ``splits/splits_0.csv`` is looked for.
        clam_split: a CLAM ``splits_{k}.csv`` to use, whatever the folder holds.
        fold: index of a patient-grouped k-fold split to use instead of one seeded split.
        k: number of folds, with ``fold``.
        seed: seed of the seeded split or of the folds.
        sizes: relative train/val/test sizes of the seeded split.

    Returns:
        ``(split, source)``: the split (``{"train", "val", "test"}`` of case ids) and a JSON-able
        record of where it came from: ``{"kind": "clam_file", "file": ...}``,
        ``{"kind": "fold", "fold": i, "k": k, "seed": s}`` or
        ``{"kind": "seeded", "seed": s, "sizes": [...]}``.

    Raises:
        DataError: a CLAM split file that names slides outside the cohort, or puts a patient
            in two parts (:func:`read_clam_split`).
    """
    found = Path(cohort_dir) / CLAM_SPLIT if cohort_dir is not None else None
    if clam_split is None and fold is None and found is not None and found.is_file():
        clam_split = found
    if clam_split is not None:
        split = read_clam_split(clam_split, _slide_reference(cohort, cohort_dir))
        keep = set(cohort.case_ids)  # a cohort loaded for its genes alone may hold fewer cases
        split = {part: [c for c in ids if c in keep] for part, ids in split.items()}
        source: dict = {"kind": "clam_file", "file": str(clam_split)}
    elif fold is not None:
        folds = kfold_splits(cohort, k=k, seed=seed)
        if not 0 <= fold < len(folds):
            raise ValueError(f"fold {fold} out of range: {len(folds)} folds")
        split, source = folds[fold], {"kind": "fold", "fold": int(fold), "k": int(k), "seed": int(seed)}
    else:
        split = train_val_test_split(cohort, seed=seed, sizes=sizes)
        source = {"kind": "seeded", "seed": int(seed), "sizes": [float(x) if x % 1 else int(x) for x in sizes]}
    check_disjoint(split)
    return {part: list(split[part]) for part in PARTS}, source


def _slide_reference(cohort: Cohort, cohort_dir: str | os.PathLike | None) -> Cohort:
    """The cohort that maps a CLAM split file's slide ids to cases: ``cohort`` itself, or, when it was
    loaded for its genes alone (no slides table), the same folder loaded for its slides."""
    if cohort.has_slides or cohort_dir is None:
        return cohort
    try:
        return load_cohort(cohort_dir, require=("slides",), drop_incomplete=True, verbose=False)
    except DataError:  # a genes-only folder: its split files name cases
        return cohort


def describe_split_source(source: dict) -> str:
    """One line for a :func:`decide_split` source record, e.g. ``"seeded split (seed 0)"``."""
    kind = source.get("kind")
    if kind == "clam_file":
        return f"CLAM split file {source['file']}"
    if kind == "fold":
        return f"fold {source['fold']} of {source['k']} (seed {source['seed']})"
    if kind == "seeded":
        return f"seeded split (seed {source['seed']}, sizes {'/'.join(str(x) for x in source['sizes'])})"
    if kind == "reused":
        return f"reused {source['file']}"
    return str(source)
