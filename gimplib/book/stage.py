"""The hand-off between the book's stages: one cohort and one split per workdir, named run folders.

Every stage notebook starts with one line::

    stage = Stage.open("03_mpm", workdir, data_dir=data_dir, profile=profile, data_seed=data_seed, seed=seed,
                       device=device, drop_incomplete=drop_incomplete)

and then reads ``stage.cohort``, ``stage.split``, ``stage.device`` and writes under ``stage.dir``.
The first stage opened in a workdir decides the cohort folder and the split and records both
in ``workdir/cohort.json``; every later stage reads that record, so all stages see the same
cohort and the same split whatever they were given:

- ``data_dir=None`` means "the recorded cohort" (the synthetic one of ``profile`` and
  ``data_seed`` when nothing is recorded yet); a ``data_dir``, profile or ``data_seed`` that
  contradicts the record is refused with a message naming both, unless ``overwrite=True``,
  which records the new cohort and decides its split afresh;
- stage 01 tiles raw slides into ``workdir/01_data/wsi_cohort`` and opens itself on that
  folder, which is then recorded like any ``data_dir``;
- the split is decided once, by :func:`gimplib.data.splits.decide_split` (the cohort's
  CLAM split file ``splits/splits_0.csv`` when there is one, else seeded by ``data_seed``),
  written to ``workdir/01_data/split.json`` and reused by every stage after it.

Run folders are named by what distinguishes them (:meth:`Stage.run_dir`): the recipe
(``gimp``), then ``-<hash>`` of the parameters that differ from the defaults (the notebook's,
overlaid with the parameter set the book runner used in this workdir), then ``_seed<s>``
when the training seed is not the default; the default run of 04 is ``04_pretrain/gimp``,
the ablation ``-p margin 0.4`` goes to ``04_pretrain/gimp-<hash>``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gimplib.book.params import COHORT_RECORD, NOTEBOOK_PARAMETERS, SET_PARAMETERS
from gimplib.data.bags import set_bag_cache
from gimplib.data.cohort import Cohort, load_cohort
from gimplib.data.splits import PARTS, decide_split, describe_split_source
from gimplib.data.synthetic import generate_cohort
from gimplib.utils import DataError, get_device, load_json, save_json, seed_everything

__all__ = ["COHORT_RECORD", "SPLIT_FILE", "SYNTHETIC_COHORT", "Stage", "WSI_COHORT", "run_name"]

#: Where the synthetic cohort is generated.
SYNTHETIC_COHORT = Path("01_data") / "cohort"
#: Where stage 01 writes the cohort it tiles from raw slides.
WSI_COHORT = Path("01_data") / "wsi_cohort"
#: The split every stage reads.
SPLIT_FILE = Path("01_data") / "split.json"
#: The stage that owns the split: with ``overwrite`` it decides the split again.
SPLIT_STAGE = "01_data"

#: Parameters that never distinguish a run: where it runs, how it shows progress, and the
#: cohort and split (one per workdir, checked by :meth:`Stage.open`). ``seed`` is named apart.
NOT_RUN_SETTINGS = frozenset({"workdir", "data_dir", "profile", "data_seed", "seed", "device", "overwrite",
                              "drop_incomplete", "progress", "bag_cache_gb"})



def _canonical(value: Any) -> Any:
    """Values that compare and hash alike whatever their spelling (``1e-4`` == ``0.0001``, tuple == list)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value) if float(value) != int(value) else int(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, os.PathLike):
        return str(value)
    return repr(value)


def run_name(recipe: str, settings: Mapping[str, Any], defaults: Mapping[str, Any], *, seed: int = 0,
             default_seed: int = 0) -> tuple[str, dict[str, Any]]:
    """The folder name of a run: ``recipe``, ``-<hash>`` of the changed settings, ``_seed<s>``.

    Args:
        recipe: what the run trains (``"gimp"``, ``"mpm"``, ``"gimp_no_genes"``).
        settings: name -> value of the settings that define the run.
        defaults: name -> default of each of those settings.
        seed: the training seed.
        default_seed: the seed that adds no suffix.

    Returns:
        ``(name, changed)``: e.g. ``("gimp", {})`` for the defaults, ``("gimp-3fa2c1",
        {"margin": 0.4})``, ``("gimp_seed1", {})``. The hash is the first 6 hex digits of the
        SHA-1 of the changed settings as sorted JSON.

    Raises:
        ValueError: a setting without a default.
    """
    missing = [k for k in settings if k not in defaults]
    if missing:
        raise ValueError(f"run {recipe!r}: no default for setting(s) {missing} (defaults: {sorted(defaults)})")
    changed = {k: _canonical(v) for k, v in sorted(settings.items()) if _canonical(v) != _canonical(defaults[k])}
    name = recipe
    if changed:
        name += "-" + hashlib.sha1(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:6]
    if int(seed) != int(default_seed):
        name += f"_seed{int(seed)}"
    return name, changed


def _relative(path: Path, workdir: Path) -> str:
    """``path`` relative to the workdir when inside it (the workdir can move), else absolute."""
    try:
        return str(path.resolve().relative_to(workdir.resolve()))
    except ValueError:
        return str(path.resolve())


def _absolute(text: str, workdir: Path) -> Path:
    path = Path(text)
    return path if path.is_absolute() else workdir / path


def _same(a: Path, b: Path) -> bool:
    return a.expanduser().resolve() == b.expanduser().resolve()


@dataclass(kw_only=True)
class Stage:
    """One stage of the book in its workdir: the cohort and split it reads, the folder it writes.

    Build it with :meth:`Stage.open`. Attributes: ``name`` (``"03_mpm"``), ``workdir``,
    ``dir`` (``workdir/name``, created), ``fig_dir`` (``dir/figures``, created),
    ``cohort_dir`` and ``cohort`` (:class:`~gimplib.data.cohort.Cohort`), ``cohort_kind``
    (``"synthetic"``, ``"slides"`` or ``"data_dir"``), ``split`` (``{"train", "val",
    "test"}`` of case ids), ``split_source`` (the record of where it came from), ``device``
    (``"cpu"``, ``"cuda"``...), ``seed`` (training) and ``data_seed`` (cohort and split).
    """

    name: str
    workdir: Path
    dir: Path
    fig_dir: Path
    cohort_dir: Path
    cohort: Cohort
    cohort_kind: str
    split: dict[str, list[str]]
    split_source: dict[str, Any]
    device: str
    seed: int
    data_seed: int
    record: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def open(
        cls,
        name: str,
        workdir: str | os.PathLike,
        *,
        data_dir: str | os.PathLike | None = None,
        profile: str = "demo",
        data_seed: int = 0,
        seed: int | None = None,
        device: str = "auto",
        require: Sequence[str] | None = None,
        drop_incomplete: bool = False,
        overwrite: bool = False,
        split_sizes: Sequence[float] = (567, 189, 190),
        bag_cache_gb: float | None = None,
        verbose: bool = False,
        quiet: bool = False,
    ) -> "Stage":
        """Open a stage: resolve (or read back) the cohort and the split, seed, pick the device.

        Args:
            name: the stage's folder under the workdir, ``NN_name``.
            workdir: the folder every stage reads and writes under.
            data_dir: a cohort folder in CLAM's layout; None: the recorded cohort, or the
                synthetic one of ``profile`` when nothing is recorded.
            profile: synthetic preset (``smoke``, ``demo``, ``paper``) when ``data_dir`` is None.
            data_seed: seed of the synthetic cohort and of the seeded split.
            seed: training seed (``seed_everything``); None: ``data_seed``.
            device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
            require: modalities every case must have (``load_cohort``); None: what the folder has.
            drop_incomplete: drop cases missing a required modality instead of stopping.
            overwrite: accept a cohort other than the recorded one (it is recorded, and the
                split decided again); in stage ``01_data``, also decide the split again.
            split_sizes: relative train/val/test sizes of a seeded split.
            bag_cache_gb: GiB of bags kept in memory (``set_bag_cache``); None leaves it.
            verbose: ``load_cohort`` prints what it found.
            quiet: no summary line.

        Returns:
            The stage; ``workdir/cohort.json`` and ``workdir/01_data/split.json`` are written
            when they were missing or the cohort changed.

        Raises:
            DataError: ``data_dir`` (or the synthetic profile/seed) differs from the recorded
                cohort (the message names both), a recorded cohort folder is gone, or the
                cohort itself is invalid.
        """
        workdir = Path(workdir).expanduser()
        seed = data_seed if seed is None else int(seed)
        record_file = workdir / COHORT_RECORD
        record = load_json(record_file) if record_file.is_file() else None
        cohort_dir, kind, changed = _resolve_cohort(name, workdir, record, data_dir, profile, data_seed, overwrite)
        cohort = load_cohort(cohort_dir, require=require, drop_incomplete=drop_incomplete, verbose=verbose)

        split_file = workdir / SPLIT_FILE
        fresh = changed or not split_file.is_file() or (overwrite and name == SPLIT_STAGE)
        if fresh:
            split, source = decide_split(cohort, cohort_dir=cohort_dir, seed=data_seed, sizes=tuple(split_sizes))
            save_json(split_file, split)
        else:
            stored = load_json(split_file)
            missing = [p for p in PARTS if p not in stored]
            if missing:
                raise DataError(f"{split_file}: no part(s) {missing}; expected train, val, test lists of case ids")
            split = {p: list(stored[p]) for p in PARTS}
            source = (record or {}).get("split") or {"kind": "reused", "file": str(SPLIT_FILE)}
        if record is None or changed or fresh:
            record = {
                "cohort_dir": _relative(cohort_dir, workdir),
                "kind": kind,
                "profile": profile if kind == "synthetic" else None,
                "data_seed": int(data_seed),
                "split": source,
                "split_file": str(SPLIT_FILE),
                "recorded_by": name,
            }
            save_json(record_file, record)

        stage_dir = workdir / name
        fig_dir = stage_dir / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        if bag_cache_gb is not None:
            set_bag_cache(bag_cache_gb)
        seed_everything(seed)
        stage = cls(name=name, workdir=workdir, dir=stage_dir, fig_dir=fig_dir, cohort_dir=Path(cohort_dir),
                    cohort=cohort, cohort_kind=kind, split=split, split_source=source,
                    device=str(get_device(device)), seed=seed, data_seed=int(data_seed), record=record)
        if not quiet:
            print(stage.summary())
        return stage

    def summary(self) -> str:
        """One line: the cohort, the split and where it came from, the device and seed."""
        parts = ", ".join(f"{p} {len(self.split[p])}" for p in PARTS)
        return (f"{self.name}: cohort {self.cohort_dir} ({self.cohort_kind}, {len(self.cohort.cases)} cases); "
                f"split {parts} ({describe_split_source(self.split_source)}); device {self.device}; seed {self.seed}")

    def path(self, *parts: str | os.PathLike) -> Path:
        """A path under the workdir, e.g. ``stage.path("04_pretrain", "gimp", "checkpoint.pt")``."""
        return self.workdir.joinpath(*parts)

    def set_parameters(self) -> dict[str, Any]:
        """The parameters the book runner gave this stage from its parameter set (without
        command-line overrides), read from ``workdir/book_params.json``; empty when the book
        runner never ran this stage here."""
        path = self.workdir / SET_PARAMETERS
        if not path.is_file():
            return {}
        return dict((load_json(path).get(self.name) or {}).get("parameters") or {})

    def run_dir(
        self,
        recipe: str,
        settings: Mapping[str, Any] | None = None,
        *,
        ignore: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
    ) -> Path:
        """The folder of one training run of this stage, named by what distinguishes it.

        ``dir/<recipe>`` for the default parameters and seed; ``dir/<recipe>-<hash>`` when
        parameters differ from the defaults (the hash of those that differ, listed in
        ``dir/runs.json``); ``_seed<s>`` appended when the training seed is not the default.
        So an ablation (``-p margin 0.4 -p overwrite true``) or a seed sweep never touches the
        default run. The defaults are the notebook's declared ones, overlaid with the values
        of the parameter set the book runner ran this stage with in this workdir
        (:meth:`set_parameters`): after ``make book``, the demo runs are the default ones.

        Args:
            recipe: what the run trains, e.g. ``"gimp"``.
            settings: name -> value of the parameters that define the run. None: every
                parameter of the notebook (as papermill gave it) except the common ones
                (workdir, device, seed...) and ``ignore``.
            ignore: parameters that only change what is shown (``n_show``), with ``settings=None``.
            defaults: the defaults to compare with; None: the notebook's declared ones and
                the book runner's parameter set.

        Returns:
            The run folder (not created: the training function creates it).

        Raises:
            ValueError: no defaults known (outside a notebook, pass ``defaults``), or a
                setting the defaults do not name.
        """
        declared, values = NOTEBOOK_PARAMETERS.get(self.name, ({}, {}))
        if defaults is None:
            if not declared:
                raise ValueError(f"{self.name}: no declared parameters recorded in this kernel; pass defaults=")
            defaults = {**declared, **self.set_parameters()}
        if settings is None:
            skip = NOT_RUN_SETTINGS | set(ignore)
            settings = {k: v for k, v in values.items() if k not in skip}
        name, changed = run_name(recipe, settings, defaults, seed=self.seed, default_seed=int(defaults.get("seed", 0)))
        index_file = self.dir / "runs.json"
        index = load_json(index_file) if index_file.is_file() else {}
        entry = {"recipe": recipe, "seed": self.seed, "changed": changed}
        if index.get(name) != entry:
            index[name] = entry
            save_json(index_file, index)
        return self.dir / name


def _resolve_cohort(name: str, workdir: Path, record: dict | None, data_dir: Any, profile: str, data_seed: int,
                    overwrite: bool) -> tuple[Path, str, bool]:
    """``(cohort_dir, kind, changed)``: the folder to load, its kind, and whether it replaces the record."""
    record_file = workdir / COHORT_RECORD
    given = None if data_dir is None or str(data_dir) == "" else Path(data_dir).expanduser()
    if given is not None and not given.is_dir():
        raise DataError(f"{given}: data_dir not found; expected a cohort folder with dataset.csv")
    if record is None:
        return _new_cohort(workdir, given, profile, data_seed), _kind(workdir, given), False

    recorded, kind = _absolute(record["cohort_dir"], workdir), record.get("kind", "data_dir")
    have_seed = int(record.get("data_seed", 0))
    seeded = kind == "synthetic" or (record.get("split") or {}).get("kind") == "seeded"
    fix = "pass the recorded one (or none), use another workdir, or overwrite=True to record the new one"
    conflict = None
    if given is not None and not _same(given, recorded):
        conflict = (f"{name}: data_dir={str(given)!r}, but {record_file} records the cohort {str(recorded)!r} ({kind}), "
                    f"which the stages of this workdir were computed on; {fix} (its split is then decided again)")
    elif given is None and kind == "synthetic" and record.get("profile") != profile:
        conflict = (f"{name}: profile={profile!r}, but {record_file} records the synthetic cohort of "
                    f"profile={record.get('profile')!r} ({recorded}); {fix}")
    elif seeded and have_seed != int(data_seed):
        conflict = (f"{name}: data_seed={data_seed}, but {record_file} records data_seed={have_seed} for the cohort "
                    f"{str(recorded)!r} and its split; {fix}")
    if conflict is None:
        if kind == "synthetic":
            return generate_cohort(recorded, preset=profile, seed=data_seed, progress=False), kind, False
        if not recorded.is_dir():
            raise DataError(f"{name}: {record_file} records the cohort {recorded}, which is gone; "
                            "pass data_dir= with overwrite=True, or use another workdir")
        return recorded, kind, False
    if not overwrite:
        raise DataError(conflict)
    if given is None and kind != "synthetic":  # data_dir=None always means the recorded folder
        return recorded, kind, True
    # overwrite=True asked for another synthetic cohort: it replaces the recorded one (gimp-synth's own files only)
    return _new_cohort(workdir, given, profile, data_seed, replace=given is None), _kind(workdir, given), True


def _kind(workdir: Path, given: Path | None) -> str:
    if given is None:
        return "synthetic"
    return "slides" if _same(given, workdir / WSI_COHORT) else "data_dir"


def _new_cohort(workdir: Path, given: Path | None, profile: str, data_seed: int, replace: bool = False) -> Path:
    if given is not None:
        return given
    return generate_cohort(workdir / SYNTHETIC_COHORT, preset=profile, seed=data_seed, overwrite=replace, progress=False)
