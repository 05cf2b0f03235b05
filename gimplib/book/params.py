"""Parameter sets of the book's notebooks, and the notebooks they target.

A parameter set is a YAML file, ``notebooks/params/<name>.yaml``: a ``common:`` mapping
given to every notebook plus one mapping per notebook, keyed by its stem (``02_genes:``).
Every key must be a parameter the notebook declares in its cell tagged ``parameters``;
papermill itself only warns about unknown keys, which would hide a typo.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nbformat
import yaml

__all__ = [
    "ParamError",
    "COHORT_RECORD",
    "COMMON_PARAMETERS",
    "NOTEBOOK_PARAMETERS",
    "ParamSet",
    "SET_PARAMETERS",
    "STAGE_PATTERN",
    "check_param_set",
    "check_parameter_types",
    "declared_parameters",
    "load_param_set",
    "notebook_parameters",
    "parameter_check_source",
    "stage_notebooks",
    "sync_parameter_check",
    "this_run",
    "toc_notebooks",
]

#: Stage notebooks are named ``NN_name``.
STAGE_PATTERN = re.compile(r"^\d\d_[A-Za-z0-9_]+$")


class ParamError(ValueError):
    """A parameter set that does not fit the notebooks (names the file and the key)."""


@dataclass
class ParamSet:
    """A parameter set: ``common`` goes to every notebook, ``per_notebook[stem]`` to one."""

    name: str
    path: Path | None
    common: dict[str, Any] = field(default_factory=dict)
    per_notebook: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_param_set(spec: str | os.PathLike, params_dir: str | os.PathLike = "notebooks/params") -> ParamSet:
    """Read a parameter set.

    Args:
        spec: a name (``"demo"`` reads ``params_dir/demo.yaml``) or a path to a YAML file.
        params_dir: where named sets live.

    Returns:
        The parameter set. Top-level keys other than ``common`` must be notebook stems.

    Raises:
        ParamError: the file is missing or is not a mapping of mappings.
    """
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(params_dir) / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(params_dir).glob("*.yaml"))
        raise ParamError(f"parameter set {str(spec)!r}: {path} not found (known sets: {known})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamError(f"{path}: expected a mapping with 'common:' and per-notebook sections")
    sections: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ParamError(f"{path}: section {key!r} must be a mapping of parameter: value")
        if key != "common" and not STAGE_PATTERN.match(str(key)):
            raise ParamError(f"{path}: section {key!r} is neither 'common' nor a notebook stem like '02_genes'")
        sections[str(key)] = value
    common = sections.pop("common", {})
    return ParamSet(name=path.stem, path=path, common=common, per_notebook=sections)


def declared_parameters(notebook: str | os.PathLike) -> dict[str, Any]:
    """The parameters a notebook declares in its cell tagged ``parameters``.

    Returns:
        name -> papermill's description (``default``, ``inferred_type_name``, ``help``).
        Empty when the notebook has no such cell.
    """
    from papermill.inspection import inspect_notebook

    return dict(inspect_notebook(str(notebook)))


def check_param_set(param_set: ParamSet, notebooks: Sequence[Path]) -> list[str]:
    """Every key a parameter set gives a notebook must be declared by that notebook.

    Args:
        param_set: the set to check.
        notebooks: the stage notebooks (``common`` targets all of them).

    Returns:
        One message per problem (empty when the set fits): an unknown key names the
        file, the section, the notebook and the notebook's declared parameters.
    """
    src = param_set.path or param_set.name
    by_stem = {Path(nb).stem: Path(nb) for nb in notebooks}
    problems = []
    for stem in param_set.per_notebook:
        if stem not in by_stem:
            problems.append(f"{src}: section {stem!r} names no notebook (have {sorted(by_stem)})")
    for stem, nb in by_stem.items():
        declared = declared_parameters(nb)
        if not declared:
            problems.append(f"{nb}: no cell tagged 'parameters'")
            continue
        for section, mapping in (("common", param_set.common), (stem, param_set.per_notebook.get(stem, {}))):
            for key in mapping:
                if key not in declared:
                    problems.append(
                        f"{src}: key {key!r} in section {section!r} is not a parameter of {nb.name} "
                        f"(declared: {', '.join(sorted(declared))})"
                    )
    return problems


def _default_value(info: dict[str, Any]) -> Any:
    import ast

    try:
        return ast.literal_eval(str(info.get("default")))
    except (ValueError, SyntaxError):
        return None  # an expression papermill could not evaluate either: no type to check against


#: A parameter's comment that lists None as one of its values ("...; None: image-only",
#: "(None: no clipping)") makes null acceptable; "when data_dir is None: ..." does not.
_NONE_DOCUMENTED = re.compile(r"(?:^|[;(,]\s*)None\s*:")


def check_parameter_types(params: dict[str, Any], declared: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """Check (and where safe, convert) each value against the type of the declared default.

    A default of ``None`` accepts anything, and so does ``null`` for a parameter whose
    comment in the parameters cell lists ``None`` as a value (``gene_encoder = "groupmsa"  #
    ...; None: image-only``). An int default takes integers (``"3"`` is
    converted, ``"three"`` is not); a float default takes numbers, ``"1e-4"`` included
    (YAML reads that as text); a bool default takes true/false only; a text default takes
    text; a list or dict default the same kind.

    Args:
        params: name -> value, as the notebook would receive them.
        declared: :func:`declared_parameters` of the notebook.
        where: the notebook, for the messages.

    Returns:
        ``(converted, problems)``: the values to pass, and one message per bad value naming
        the parameter, the value, the expected type and how to write it (``-p name=...``).
    """
    out, problems = dict(params), []
    for name, value in params.items():
        if name not in declared:
            continue
        default = _default_value(declared[name])
        if value is None and _NONE_DOCUMENTED.search(str(declared[name].get("help") or "")):
            continue
        if default is None or value is None and not isinstance(default, bool):
            if value is None and isinstance(default, (int, float, str)) and not isinstance(default, bool):
                problems.append(f"{where}: parameter {name} = null, but its default {default!r} is a "
                                f"{type(default).__name__}; give a value, e.g. -p {name}={default}")
            continue
        ok, converted = True, value
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            if isinstance(value, str):
                try:
                    converted = int(value)
                except ValueError:
                    ok = False
            else:
                ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            if isinstance(value, str):
                try:
                    converted = float(value)
                except ValueError:
                    ok = False
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        elif isinstance(default, (list, tuple)):
            ok = isinstance(value, (list, tuple))
        elif isinstance(default, dict):
            ok = isinstance(value, dict)
        if not ok:
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
                type(default), f"a {type(default).__name__}")
            example = str(default).lower() if isinstance(default, bool) else default
            problems.append(f"{where}: parameter {name} = {value!r} ({type(value).__name__}), expected {kind} "
                            f"like its default; e.g. -p {name}={example}")
        else:
            out[name] = converted
    return out, problems


def notebook_parameters(
    param_set: ParamSet, stem: str, overrides: dict[str, Any] | None = None, declared: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The parameters one notebook receives: ``common``, then its section, then overrides.

    Overrides (from the command line) go only to notebooks that declare them, when
    ``declared`` is given.
    """
    params = {**param_set.common, **param_set.per_notebook.get(stem, {})}
    for key, value in (overrides or {}).items():
        if declared is None or key in declared:
            params[key] = value
    return params


def toc_notebooks(toc: str | os.PathLike) -> list[str]:
    """Stems of the stage notebooks (``notebooks/NN_name``) the table of contents lists, in order."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            file = node.get("file")
            if isinstance(file, str):
                p = Path(file)
                if p.parent.name == "notebooks" and STAGE_PATTERN.match(p.stem):
                    found.append(p.stem)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(Path(toc).read_text()))
    return found


def stage_notebooks(notebooks_dir: str | os.PathLike) -> list[Path]:
    """The committed stage notebooks ``NN_*.ipynb``, in order."""
    return sorted(p for p in Path(notebooks_dir).glob("*.ipynb") if STAGE_PATTERN.match(p.stem))


#: The parameters every stage notebook declares, with the same default in each (tested).
COMMON_PARAMETERS = ("workdir", "data_dir", "profile", "data_seed", "seed", "device", "overwrite", "drop_incomplete", "progress")

CHECK_TAG = "remove-cell"

#: The workdir's record of the cohort and split every stage reads (:mod:`gimplib.book.stage`).
COHORT_RECORD = "cohort.json"

#: The parameters the book runner gave each notebook from its set (``book_params.json`` in the
#: workdir): the workdir's default runs, which :meth:`gimplib.book.stage.Stage.run_dir` names
#: plainly (``04_pretrain/gimp``) and against which it names the runs that differ.
SET_PARAMETERS = "book_params.json"

#: name -> (declared defaults, values after papermill) of the notebooks checked in this kernel,
#: kept by :func:`check_notebook_parameters` for :meth:`gimplib.book.stage.Stage.run_dir`,
#: which names a run by the parameters that differ from the defaults.
NOTEBOOK_PARAMETERS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}


def parameter_check_source(notebook: nbformat.NotebookNode, stem: str) -> str:
    """The source of the hidden cell that type-checks a notebook's parameters.

    It repeats the defaults of the notebook's ``parameters`` cell (the kernel cannot read its
    own notebook file); :func:`sync_parameter_check` rewrites it after the parameters change, and
    ``tests/test_book.py`` fails when the two disagree.
    """
    cell = next(c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    defaults: dict[str, Any] = {}
    exec(cell.source, {}, defaults)  # plain `name = literal` lines
    nullable = []
    for line in cell.source.splitlines():
        name, comment = line.split("=")[0].strip(), line.partition("#")[2]
        if name in defaults and defaults[name] is not None and _NONE_DOCUMENTED.search(comment):
            nullable.append(name)
    nullable.sort()
    extra = f", nullable={tuple(nullable)!r}" if nullable else ""
    return ("from gimplib.book.params import check_notebook_parameters\n\n"
            f"check_notebook_parameters(globals(), {defaults!r}, {stem!r}{extra})")


def sync_parameter_check(path: str | os.PathLike) -> bool:
    """Rewrite the hidden check cell after a notebook's ``parameters`` cell; True if it changed.

    Run it after editing a parameters cell::

        python -c "from gimplib.book.params import sync_parameter_check as s; s('notebooks/03_mpm.ipynb')"
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    want = parameter_check_source(nb, path.stem)
    nxt = nb.cells[index + 1] if index + 1 < len(nb.cells) else None
    if nxt is not None and CHECK_TAG in nxt.get("metadata", {}).get("tags", []) and "check_notebook_parameters" in nxt.source:
        if nxt.source == want:
            return False
        nxt.source = want
    else:
        cell = nbformat.v4.new_code_cell(want)
        cell.metadata["tags"] = [CHECK_TAG]
        nb.cells.insert(index + 1, cell)
    path.write_text(nbformat.writes(nb) + "\n")
    return True


def check_notebook_parameters(namespace: dict[str, Any], defaults: dict[str, Any], where: str,
                              nullable: Sequence[str] = ()) -> None:
    """Type-check a notebook's parameters inside the notebook, after papermill injected them.

    The stage notebooks call this in a hidden cell right after their ``parameters`` cell (and
    papermill's injected one), so that ``papermill nb.ipynb out.ipynb -p num_epochs three``
    stops at once with the same message the book runner gives, before anything is written.
    Values that are safe to convert (``"3"`` for an int, ``"1e-4"`` for a float) are converted
    in ``namespace``.

    Args:
        namespace: the notebook's globals.
        defaults: name -> the value the parameters cell declares.
        where: the notebook, for the messages.
        nullable: parameters whose comment names None as a value (they accept null).

    Raises:
        ValueError: one message per bad value (:func:`check_parameter_types`).
    """
    declared = {name: {"default": repr(value), "help": "None: allowed" if name in nullable else ""}
                for name, value in defaults.items()}
    values = {name: namespace[name] for name in defaults if name in namespace}
    converted, problems = check_parameter_types(values, declared, where)
    if problems:
        raise ValueError("; ".join(problems))
    namespace.update(converted)
    NOTEBOOK_PARAMETERS[where] = (dict(defaults), {name: namespace[name] for name in defaults if name in namespace})


def this_run(where: str | None = None, *, max_rows: int = 14) -> Any:
    """A small table of what this run of a stage notebook was given, for the rendered page.

    The rendered pages hide the parameters cell and papermill's injected cell; this table
    takes their place: the cohort and the seeds always, then every parameter whose value
    differs from the notebook's declared default (the parameter set's and ``-p`` values).
    It reads what the notebook's hidden :func:`check_notebook_parameters` cell recorded.

    Args:
        where: the stage (``"03_mpm"``); default: the stage checked last.
        max_rows: longer tables end with a "... n more" row.

    Returns:
        A styled ``pandas`` table (index: parameter; columns: this run, notebook default).

    Raises:
        RuntimeError: no parameter check has run in this kernel (or none for ``where``).
    """
    import pandas as pd

    if not NOTEBOOK_PARAMETERS or (where is not None and where not in NOTEBOOK_PARAMETERS):
        raise RuntimeError(f"this_run({where!r}): no parameter check has run here; run the notebook's cells in order")
    where = where if where is not None else list(NOTEBOOK_PARAMETERS)[-1]
    defaults, values = NOTEBOOK_PARAMETERS[where]
    always = [n for n in ("data_dir", "profile", "data_seed", "seed") if n in defaults]
    changed = [n for n in defaults if n not in always and n != "workdir" and values.get(n, defaults[n]) != defaults[n]]
    rows = [(n, repr(values.get(n, defaults[n])), repr(defaults[n])) for n in always + changed]
    more = len(rows) - max_rows
    if more > 0:
        rows = rows[:max_rows] + [("...", f"{more} more", "")]
    frame = pd.DataFrame(rows, columns=["parameter", "this run", "notebook default"]).set_index("parameter")
    return frame.style.set_caption(f"This run of {where}: the cohort, the seeds and every setting that differs "
                                   "from the notebook's defaults")
