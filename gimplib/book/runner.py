"""Execute the stage notebooks with papermill, then build the site with jupyter-book."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import nbformat
import yaml

from gimplib.book.params import (
    COHORT_RECORD,
    SET_PARAMETERS,
    ParamError,
    ParamSet,
    check_param_set,
    check_parameter_types,
    declared_parameters,
    load_param_set,
    notebook_parameters,
    stage_notebooks,
    toc_notebooks,
)
from gimplib.book.site import (
    copy_sources,
    describe_data,
    git_commit,
    hardware,
    insert_banner,
    load_runs,
    placeholder_page,
    save_runs,
    write_pages,
)

__all__ = ["BookRun", "KERNEL_ENV", "NotebookFailed", "build_book", "execute_notebook", "kernel_environment", "main", "run_book"]

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

#: Environment of the kernels the runner starts. Progress bars would reach the rendered
#: pages as hundreds of lines of carriage-return text (or as widgets with no static form),
#: and tqdm.auto warns once per kernel that ipywidgets is absent; set TQDM_DISABLE=0 to
#: keep the bars.
KERNEL_ENV = {"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore:IProgress not found"}


@contextlib.contextmanager
def kernel_environment(progress: bool = False) -> Iterator[None]:
    """Set :data:`KERNEL_ENV` for the kernels started inside (a value already set wins).

    With ``progress`` the kernels also draw their training bars on the terminal's stderr
    (:data:`gimplib.train.engine.TERMINAL_PROGRESS`), not into the notebook.
    """
    from gimplib.train.engine import TERMINAL_PROGRESS

    env = {**KERNEL_ENV, TERMINAL_PROGRESS: "1"} if progress else dict(KERNEL_ENV)
    saved = {key: os.environ.get(key) for key in env}
    for key, value in env.items():
        if key == "PYTHONWARNINGS" and os.environ.get(key):
            os.environ[key] = f"{os.environ[key]},{value}"
        else:
            os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class NotebookFailed(RuntimeError):
    """A notebook raised while papermill executed it.

    Attributes:
        notebook: the notebook's stem, e.g. ``"03_mpm"``.
        cell_index: index of the failing cell (papermill's numbering), or None.
        traceback: the cell's traceback as plain text (colour codes removed).
        partial: where the partly executed copy was kept.
    """

    def __init__(self, notebook: str, cell_index: int | None, traceback: str, partial: Path | None):
        self.notebook = notebook
        self.cell_index = cell_index
        self.traceback = traceback
        self.partial = partial
        where = f"cell {cell_index}" if cell_index is not None else "start-up"
        super().__init__(f"notebook {notebook} failed at {where}:\n{traceback}")


def execute_notebook(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    parameters: dict[str, Any],
    *,
    cwd: str | os.PathLike | None = None,
    failed_dir: str | os.PathLike | None = None,
    log_output: bool = False,
    progress: bool = False,
) -> float:
    """Execute one notebook with papermill; the executed copy appears at ``dst`` only on success.

    Args:
        src: the committed notebook.
        dst: where the executed copy goes.
        parameters: injected after the ``parameters`` cell.
        cwd: the kernel's working directory (default: ``dst``'s folder).
        failed_dir: where a failing notebook's partial copy is kept (default: beside ``dst``).
        log_output: echo the cells' output while running.
        progress: show papermill's bar (cell n of m) while running.

    Returns:
        Seconds the execution took.

    Raises:
        NotebookFailed: a cell raised (or the kernel died); names the notebook, the cell
            and carries the traceback.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.stem}.partial.ipynb")
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(src),
            str(partial),
            parameters=parameters,
            kernel_name="python3",
            cwd=str(cwd or dst.parent),
            progress_bar=progress,
            log_output=log_output,
            # Kernel logs are noise on a successful run: a start-up warning about unencrypted local
            # TCP, and "KeyboardInterrupt caught in kernel" (jupyter_client interrupts the kernel
            # before every shutdown). A failing cell still reports through its error output.
            extra_arguments=["--log-level=CRITICAL"],
        )
    except PapermillExecutionError as err:
        kept = _keep_failed(partial, src.stem, failed_dir or dst.parent)
        trace = ANSI.sub("", "\n".join(err.traceback)) or f"{err.ename}: {err.evalue}"
        raise NotebookFailed(src.stem, err.cell_index, trace, kept) from None
    except Exception as err:  # kernel died, bad notebook JSON, ...
        kept = _keep_failed(partial, src.stem, failed_dir or dst.parent)
        raise NotebookFailed(src.stem, None, f"{type(err).__name__}: {err}", kept) from None
    _hide_injected_parameters(partial)
    os.replace(partial, dst)
    return time.perf_counter() - start


def _drop_glued_cells(path: Path) -> None:
    """Remove the markdown cells that show glued outputs (``{glue:figure}``) from an unexecuted
    notebook's copy: it has no outputs to paste, and the build treats the missing keys as errors."""
    nb = nbformat.read(path, as_version=4)
    kept = [c for c in nb.cells if not (c.cell_type == "markdown" and "{glue:" in c.source)]
    if len(kept) != len(nb.cells):
        nb.cells = kept
        nbformat.write(nb, path)


def _hide_injected_parameters(path: Path) -> None:
    """Tag papermill's injected-parameters cell ``remove-cell``: the rendered page shows the
    notebook's small "this run" table (:func:`gimplib.book.params.this_run`) instead."""
    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
            changed = True
    if changed:
        nbformat.write(nb, path)


def _keep_failed(partial: Path, stem: str, failed_dir: str | os.PathLike) -> Path | None:
    if not partial.exists():
        return None
    failed_dir = Path(failed_dir)
    failed_dir.mkdir(parents=True, exist_ok=True)
    kept = failed_dir / f"{stem}.ipynb"
    os.replace(partial, kept)
    return kept


def build_book(site: str | os.PathLike, output: str | os.PathLike, *, quiet: bool = False) -> int:
    """``jupyter-book build site --path-output output -W -n --keep-going --all``.

    The HTML lands in ``output/_build/html``. Every page is re-read (``--all``) so that a
    warning from an earlier build cannot hide behind Sphinx's incremental cache.

    Returns:
        jupyter-book's exit status (0 when the build had no warnings).
    """
    cmd = [
        sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
        "build", str(site), "--path-output", str(output), "-W", "-n", "--keep-going", "--all",
    ]
    if quiet:
        cmd.append("-q")
    return subprocess.run(cmd).returncode


@dataclass
class BookRun:
    """What :func:`run_book` did: seconds per executed notebook, build seconds and status."""

    seconds: dict[str, float]
    build_seconds: float | None
    build_status: int | None
    html: Path


def run_book(
    params: str | os.PathLike = "demo",
    *,
    root: str | os.PathLike = ".",
    output: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    only: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    execute: bool = True,
    build: bool = True,
    log_output: bool = False,
    quiet_build: bool = False,
    progress: bool = False,
    papermill_dir: str | os.PathLike | None = None,
) -> BookRun:
    """Execute the stage notebooks with a parameter set, then build the book.

    Args:
        params: parameter-set name (``notebooks/params/<name>.yaml``) or YAML path.
        root: the repository (book) root holding ``_config.yml``, ``_toc.yml``, ``book/``, ``notebooks/``.
        output: folder receiving ``_build/`` (default: ``root``).
        workdir: the notebooks' ``workdir`` (default: the set's own, else ``<output>/_build/workdir/<set>``).
        data_dir: a cohort folder for ``data_dir`` (default: the set's, None = synthetic).
        only: execute just the notebooks whose stem starts with one of these (``"02"``);
            the others keep their executed copies from earlier runs.
        overrides: ``name -> value`` given to every notebook that declares ``name``.
        execute: run notebooks (False: build from whatever executed copies exist).
        build: build the HTML after executing.
        log_output: echo the notebooks' output while they run.
        quiet_build: pass ``-q`` to jupyter-book.
        progress: show each notebook's progress (cell n of m) while it runs.
        papermill_dir: only write each selected notebook's parameters, checked and flat, to
            ``papermill_dir/<stem>.yaml`` (what ``papermill -f`` reads) and return.

    Returns:
        A :class:`BookRun`.

    Raises:
        ParamError: the parameter set does not fit the notebooks (before anything runs).
        NotebookFailed: a notebook raised; nothing after it runs and the book is not built.
    """
    root = Path(root).resolve()
    output = Path(output).resolve() if output is not None else root
    build_dir = output / "_build"
    site = build_dir / "site"
    notebooks = stage_notebooks(root / "notebooks")
    stems_in_toc = toc_notebooks(root / "_toc.yml")
    param_set = load_param_set(params, root / "notebooks" / "params")

    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise ParamError(f"--data-dir {data_dir}: folder not found; expected a cohort folder with dataset.csv")
        param_set.common["data_dir"] = str(Path(data_dir).resolve())
    elif isinstance(param_set.common.get("data_dir"), str):
        param_set.common["data_dir"] = str((root / param_set.common["data_dir"]).resolve())
    if workdir is not None:
        param_set.common["workdir"] = str(Path(workdir).resolve())
    elif isinstance(param_set.common.get("workdir"), str):
        param_set.common["workdir"] = str((root / param_set.common["workdir"]).resolve())
    else:
        param_set.common["workdir"] = str(build_dir / "workdir" / param_set.name)
    work = Path(param_set.common["workdir"])

    selected = notebooks
    if only:
        selected = [nb for nb in notebooks if any(nb.stem.startswith(str(o)) for o in only)]
        if not selected:
            raise ParamError(f"--only {list(only)} matches no notebook (have {[nb.stem for nb in notebooks]})")
    if execute:
        problems = check_param_set(param_set, notebooks)
        for key in overrides or {}:
            if not any(key in declared_parameters(nb) for nb in selected):
                problems.append(f"override {key!r} is a parameter of none of {[nb.stem for nb in selected]}")
        for nb in selected:  # a value of the wrong type fails here, not in a cell minutes later
            declared = declared_parameters(nb)
            _, bad = check_parameter_types(notebook_parameters(param_set, nb.stem, overrides, declared), declared,
                                           nb.stem)
            problems += bad
        if problems:
            raise ParamError("the parameter set does not fit the notebooks:\n  " + "\n  ".join(problems))
    for nb in notebooks:
        if nb.stem not in stems_in_toc:
            print(f"note: {nb.name} is not listed in _toc.yml; it runs but the book does not show it")

    if papermill_dir is not None:
        for nb in selected:
            declared = declared_parameters(nb)
            parameters, _ = check_parameter_types(notebook_parameters(param_set, nb.stem, overrides, declared),
                                                  declared, nb.stem)
            _write_papermill_file(Path(papermill_dir) / f"{nb.stem}.yaml", parameters)
            print(f"papermill {nb.relative_to(root)} OUT.ipynb -f {Path(papermill_dir) / f'{nb.stem}.yaml'}")
        return BookRun(seconds={}, build_seconds=None, build_status=None, html=build_dir / "html")
    copy_sources(root, site)
    runs = load_runs(site)
    seconds: dict[str, float] = {}
    if execute:
        work.mkdir(parents=True, exist_ok=True)
        for nb in selected:
            declared = declared_parameters(nb)
            parameters, _ = check_parameter_types(notebook_parameters(param_set, nb.stem, overrides, declared),
                                                  declared, nb.stem)
            _write_papermill_file(build_dir / "params" / param_set.name / f"{nb.stem}.yaml", parameters)
            _record_set_parameters(work, param_set, nb.stem, declared)
            print(f"[{nb.stem}] executing with '{param_set.name}' parameters ...", flush=True)
            try:
                with kernel_environment(progress):
                    took = execute_notebook(
                        nb, site / "notebooks" / nb.name, parameters,
                        cwd=work, failed_dir=build_dir / "failed", log_output=log_output, progress=progress,
                    )
            except NotebookFailed as err:
                runs[nb.stem] = {"status": "failed", "params": param_set.name}
                save_runs(site, runs)
                print(f"[{nb.stem}] FAILED; partial copy: {err.partial}", file=sys.stderr)
                raise
            seconds[nb.stem] = took
            record = work / COHORT_RECORD  # which cohort the stage read (e.g. one stage 01 tiled)
            text, synthetic = describe_data({**parameters, "workdir": str(work)},
                                            json.loads(record.read_text()) if record.is_file() else None)
            finished = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
            runs[nb.stem] = {
                "status": "executed", "params": param_set.name, "seconds": took, "finished": finished,
                "data": text, "synthetic": synthetic, "workdir": str(work),
            }
            save_runs(site, runs)
            kind = "warning" if synthetic else "note"
            insert_banner(
                site / "notebooks" / nb.name,
                f"Executed for this build with the parameter set **{param_set.name}** on {text}. "
                f"Finished {finished} UTC in {took:.1f} s. " + _reused_note(site / "notebooks" / nb.name)
                + f"Rerun: `{_rerun_command(param_set.name, nb.stem, data_dir, workdir, overrides)}`.",
                kind,
            )
            print(f"[{nb.stem}] done in {took:.1f} s", flush=True)

    # Chapters the toc lists but this build has no executed copy of.
    for stem in stems_in_toc:
        executed_copy = site / "notebooks" / f"{stem}.ipynb"
        stale_md = site / "notebooks" / f"{stem}.md"
        committed = root / "notebooks" / f"{stem}.ipynb"
        if runs.get(stem, {}).get("status") == "executed" and executed_copy.exists():
            stale_md.unlink(missing_ok=True)
            continue
        if committed.exists():
            stale_md.unlink(missing_ok=True)
            shutil.copy2(committed, executed_copy)
            insert_banner(
                executed_copy,
                "This notebook was not executed for this build, so it shows no outputs. Run "
                f"`python -m gimplib.book --params demo --only {stem[:2]}` to fill it.",
                "warning",
            )
            _drop_glued_cells(executed_copy)
        else:
            executed_copy.unlink(missing_ok=True)
            placeholder_page(stale_md, stem, f"`notebooks/{stem}.ipynb` does not exist in this checkout.")

    build_info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(root),
        "hardware": hardware(),
    }
    write_pages(site, runs, work, stems_in_toc, build_info)

    html = build_dir / "html"
    build_seconds = status = None
    if build:
        start = time.perf_counter()
        status = build_book(site, output, quiet=quiet_build)
        build_seconds = time.perf_counter() - start
    return BookRun(seconds=seconds, build_seconds=build_seconds, build_status=status, html=html)


def _reused_note(nb_path: Path) -> str:
    """A sentence naming the training runs an executed notebook reused instead of training (with dates)."""
    import nbformat

    nb = nbformat.read(nb_path, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
    dates = re.findall(r"reusing the finished run in \S+ \(finished ([^;]+);", text)
    if not dates:
        return ""
    return (f"{len(dates)} of its training runs were reused, unchanged, from earlier runs (finished "
            f"{', '.join(sorted(set(dates)))}); `-p overwrite=true` trains them again. ")


def _record_set_parameters(work: Path, param_set: ParamSet, stem: str, declared: dict[str, Any]) -> None:
    """Write the set's parameters of one notebook (without command-line overrides) to
    ``work/book_params.json``: the workdir's default run, against which
    :meth:`gimplib.book.stage.Stage.run_dir` names the runs that differ (an override, an ablation)."""
    values, _ = check_parameter_types(notebook_parameters(param_set, stem, None, declared), declared, stem)
    path = work / SET_PARAMETERS
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[stem] = {"set": param_set.name, "parameters": values}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _rerun_command(params: str, stem: str, data_dir: Any, workdir: Any, overrides: dict[str, Any] | None) -> str:
    """The runner command that reruns one stage as this build ran it."""
    import shlex

    parts = ["python", "-m", "gimplib.book", "--params", params, "--only", stem[:2]]
    if data_dir is not None:
        parts += ["--data-dir", str(data_dir)]
    if workdir is not None:
        parts += ["--workdir", str(workdir)]
    for key, value in (overrides or {}).items():
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        parts += ["-p", f"{key}={text}"]
    return " ".join(shlex.quote(p) for p in parts)


def _write_papermill_file(path: Path, parameters: dict[str, Any]) -> None:
    """One flat YAML per stage, as ``papermill -f`` reads it (the sets themselves are sectioned)."""
    from gimplib.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("# written by python -m gimplib.book; use with: papermill NOTEBOOK OUT -f THIS_FILE\n"
                       + yaml.safe_dump(parameters, sort_keys=True))


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML; quote text, e.g. -p {key}='\"...\"'") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m gimplib.book --params demo [--data-dir DIR] [--only 02]``."""
    parser = argparse.ArgumentParser(
        prog="python -m gimplib.book",
        description="Execute the stage notebooks with a parameter set (papermill), then build the book.",
    )
    parser.add_argument("--params", default="demo", help="parameter set: smoke, demo, paper or a YAML path (default demo)")
    parser.add_argument("--data-dir", help="cohort folder (CLAM layout); default: the set's, else the synthetic cohort")
    parser.add_argument("--workdir", help="the notebooks' workdir (default: the set's, else _build/workdir/<set>)")
    parser.add_argument("--only", action="append", help="execute only notebooks whose stem starts with this (repeatable; '02' or '02,03'; default: all)")
    parser.add_argument("-p", "--param", action="append", type=_parse_override, default=[], metavar="NAME=VALUE",
                        help="override a parameter in every notebook that declares it (value parsed as YAML, checked "
                             "against the type of the notebook's default; repeatable)")
    parser.add_argument("--root", default=None, help="book root (default: current folder if it has _toc.yml, else the source checkout)")
    parser.add_argument("--output", default=None, help="folder that receives _build/ (default: the root)")
    parser.add_argument("--no-build", action="store_true", help="execute only; do not build the HTML (default: build)")
    parser.add_argument("--no-execute", action="store_true",
                        help="build from the executed copies already in _build/site (default: execute)")
    parser.add_argument("--papermill-files", metavar="DIR", default=None,
                        help="write each notebook's parameters as a flat YAML for 'papermill -f' into DIR and stop "
                             "(default: off; the sets themselves have sections papermill cannot read)")
    parser.add_argument("--log-output", action="store_true", help="echo the notebooks' output while they run (default off)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no per-notebook progress bar (default: cell n of m is shown while each notebook runs)")
    args = parser.parse_args(argv)

    root = Path(args.root) if args.root else Path.cwd()
    if not (root / "_toc.yml").is_file():
        fallback = Path(__file__).resolve().parents[2]
        if args.root or not (fallback / "_toc.yml").is_file():
            parser.error(f"no _toc.yml in {root}: pass --root pointing at the book's checkout")
        root = fallback
    only = [part for item in (args.only or []) for part in item.split(",") if part]
    start = time.perf_counter()
    try:
        result = run_book(
            args.params, root=root, output=args.output, workdir=args.workdir, data_dir=args.data_dir,
            only=only or None, overrides=dict(args.param), execute=not args.no_execute,
            build=not args.no_build, log_output=args.log_output, progress=not args.no_progress,
            papermill_dir=args.papermill_files,
        )
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NotebookFailed as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    total = time.perf_counter() - start
    if args.papermill_files:
        return 0
    print("\nseconds per notebook:")
    for stem, took in result.seconds.items():
        print(f"  {stem:<16} {took:8.1f}")
    if result.build_seconds is not None:
        print(f"  {'book build':<16} {result.build_seconds:8.1f}")
    print(f"  {'total':<16} {total:8.1f}")
    if result.build_status is not None:
        if result.build_status != 0:
            print(f"error: jupyter-book build failed (exit {result.build_status}); see the warnings above", file=sys.stderr)
            return result.build_status
        print(f"\nthe book: {result.html / 'index.html'}")
    return 0
