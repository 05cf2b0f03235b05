"""The book: parameter sets, committed notebooks, the runner, and the rendered site.

Fast tier: parameter sets fit the notebooks, notebooks are committed clean, every code
include and citation of the book pages resolves, and the runner's error handling on tiny
throwaway notebooks. Notebooks tier (``-m notebooks``): every stage notebook executed with
the smoke parameters, in order, in a temporary folder, the book built from the executed
copies with warnings as errors, the pages and figures checked, and screenshots taken with
headless Chromium.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml

from gimplib import book
from gimplib.book import render_check

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PARAMS = NOTEBOOKS / "params"
STAGES = ["01_data", "02_genes", "03_mpm", "04_pretrain", "05_finetune", "06_figures", "07_compare"]
PARAM_SETS = ["smoke", "demo", "paper"]
#: Stages whose chapter is tables rather than figures (the regenerated Tables 1 and 2).
TABLE_STAGES = {"07_compare"}


# ------------------------------------------------------------------------ fast tier


def test_toc_lists_the_seven_stage_notebooks_and_they_exist():
    assert book.toc_notebooks(ROOT / "_toc.yml") == STAGES
    committed = [nb.stem for nb in book.stage_notebooks(NOTEBOOKS)]
    missing = sorted(set(STAGES) - set(committed))
    assert not missing, f"_toc.yml lists notebooks that are not committed: {missing}"
    assert committed == STAGES, f"stage notebooks not in the toc: {sorted(set(committed) - set(STAGES))}"


@pytest.mark.parametrize("name", PARAM_SETS)
def test_every_parameter_key_is_declared_by_its_notebook(name):
    param_set = book.load_param_set(name, PARAMS)
    notebooks = book.stage_notebooks(NOTEBOOKS)
    assert notebooks, "no stage notebooks under notebooks/"
    problems = book.check_param_set(param_set, notebooks)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stem", STAGES)
def test_notebook_is_committed_without_outputs_and_has_one_parameters_cell(stem):
    path = NOTEBOOKS / f"{stem}.ipynb"
    assert path.is_file(), f"{path} missing"
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts (clear them before committing)"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(tagged)}"
    declared = book.declared_parameters(path)
    for name in ("workdir", "data_dir", "profile", "seed", "device"):
        assert name in declared, f"{path.name}: the parameters cell does not declare {name!r}"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.lstrip().startswith("# "), (
        f"{path.name}: the first cell should be a markdown cell with the chapter title"
    )


@pytest.mark.parametrize("stem", STAGES)
def test_notebook_is_its_own_source_and_its_shared_parts_agree(stem):
    """The committed .ipynb is the one source of each stage (no generator); what the stages
    share is checked here instead: the hidden type check repeats the parameters cell's defaults,
    and the common parameters have the same defaults in every stage."""
    path = NOTEBOOKS / f"{stem}.ipynb"
    nb = nbformat.read(path, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    check = nb.cells[index + 1]
    fix = f"run: python -c \"from gimplib.book.params import sync_parameter_check as s; s('notebooks/{stem}.ipynb')\""
    assert "remove-cell" in check.get("metadata", {}).get("tags", []), f"{path.name}: no hidden parameter check after the parameters cell; {fix}"
    assert check.source == book.params.parameter_check_source(nb, stem), (
        f"{path.name}: the hidden parameter check does not repeat the parameters cell's defaults; {fix}")
    first = book.declared_parameters(NOTEBOOKS / f"{STAGES[0]}.ipynb")
    declared = book.declared_parameters(path)
    for name in book.params.COMMON_PARAMETERS:
        assert name in declared, f"{path.name}: the parameters cell does not declare the common {name!r}"
        assert declared[name]["default"] == first[name]["default"], (
            f"{path.name}: {name} defaults to {declared[name]['default']} but {STAGES[0]} says {first[name]['default']}")
    assert not (ROOT / "dev" / "make_notebooks.py").exists(), "the notebooks are their own source: no generator"


_HIDDEN = {"hide-input", "remove-input", "remove-cell", "hide-cell"}


@pytest.mark.parametrize("stem", STAGES)
def test_the_first_visible_code_of_a_stage_teaches_and_the_page_has_a_header_and_exercises(stem):
    """Imports, the Stage set-up and the parameters are hidden on the page; a header says what
    the stage teaches, and its exercises only name parameters the notebook declares."""
    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    visible = [c for c in nb.cells if c.cell_type == "code" and not _HIDDEN & set(c.get("metadata", {}).get("tags", []))]
    assert visible, f"{stem}: no visible code"
    first = visible[0].source.lstrip()
    assert not first.startswith(("%matplotlib", "import ", "from ", "stage = Stage.open")), (
        f"{stem}: the first visible code cell is set-up, not teaching: {first[:80]!r}")
    params = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    assert "remove-cell" in params.metadata["tags"], f"{stem}: the parameters cell shows on the page"
    assert any("this_run()" in c.source for c in nb.cells), f"{stem}: no 'this run' table"
    assert "In this stage" in nb.cells[1].source and "**Time**" in nb.cells[1].source, f"{stem}: no header after the title"
    exercises = [c for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(exercises) == 1, f"{stem}: expected one exercises cell"
    named = set(re.findall(r"-p (\w+)", exercises[0].source))
    assert len(re.findall(r"^\d+\. ", exercises[0].source, flags=re.M)) >= 2, f"{stem}: fewer than two exercises"
    undeclared = named - set(book.declared_parameters(NOTEBOOKS / f"{stem}.ipynb"))
    assert not undeclared, f"{stem}: exercises name parameters the notebook does not declare: {sorted(undeclared)}"


@pytest.mark.parametrize("stem", STAGES)
def test_every_figure_of_a_stage_is_glued_with_a_caption_label_and_alt_text(stem):
    """Figures reach the page through {glue:figure} (caption, label, alt text); every key a page
    shows is glued by a code cell (the book builds with warnings as errors) and vice versa."""
    nb = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    glued = set(re.findall(r'glue_figure\("([\w-]+)"', code))
    shown = {}
    for c in nb.cells:
        if c.cell_type == "markdown":
            for m in re.finditer(r"```\{glue:figure\} ([\w-]+)\n((?::[^\n]*\n)*)\n(.+?)```", c.source, flags=re.S):
                shown[m.group(1)] = (dict(re.findall(r":(\w+): (.*)", m.group(2))), m.group(3).strip())
    assert glued == set(shown), f"{stem}: glued {sorted(glued)} but the page shows {sorted(shown)}"
    for key, (options, caption) in shown.items():
        assert options.get("name") == key, f"{stem}: figure {key} has no label"
        assert len(options.get("alt", "")) > 30 and "/" not in options["alt"], f"{stem}: figure {key} needs real alt text"
        assert len(caption) > 40 and "{glue:text}`cohort`" in caption, f"{stem}: figure {key}'s caption must name the cohort"
    assert "display(fig)\n" not in code.replace("for fig in", "") or stem in ("03_mpm", "06_figures"), (
        f"{stem}: a figure displayed inline has no caption")


def test_every_api_link_of_the_prose_points_at_a_documented_object():
    """{py:func}/{py:class} links in the pages resolve (the build ignores unresolved py: links,
    since torch and numpy types cannot be linked offline, so this test checks ours)."""
    api = (ROOT / "book" / "api.md").read_text()
    documented = set(re.findall(r"\.\. auto(?:function|class|method):: ([\w.]+)", api))
    seen = 0
    for page in sorted((ROOT / "book").glob("*.md")):
        for m in re.finditer(r"\{py:(?:func|class|meth|obj)\}`([^`]+)`", page.read_text()):
            target = m.group(1).split("<")[-1].rstrip(">").strip()
            seen += 1
            assert target in documented, f"{page.name}: {m.group(0)} points at nothing on the API page"
    assert seen >= 8, f"only {seen} API links in the prose"


def test_sync_parameter_check_rewrites_a_stale_check(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# t"), nbformat.v4.new_code_cell("a = 1\nb = 'x'")])
    nb.cells[1].metadata["tags"] = ["parameters"]
    path = tmp_path / "01_t.ipynb"
    path.write_text(nbformat.writes(nb))
    assert book.params.sync_parameter_check(path) is True
    assert book.params.sync_parameter_check(path) is False
    nb = nbformat.read(path, as_version=4)
    assert "check_notebook_parameters(globals(), {'a': 1, 'b': 'x'}, '01_t')" in nb.cells[2].source
    nb.cells[1].source = "a = 2\nb = 'x'"
    path.write_text(nbformat.writes(nb))
    assert book.params.sync_parameter_check(path) is True
    nb = nbformat.read(path, as_version=4)
    assert len(nb.cells) == 3 and "{'a': 2, 'b': 'x'}" in nb.cells[2].source


def _pyobjects(text: str):
    """(relative file, object) of every literalinclude with a :pyobject: option."""
    pattern = re.compile(r"```\{literalinclude\}\s+(\S+)\s*\n((?::[^\n]*\n)*)")
    for match in pattern.finditer(text):
        options = dict(re.findall(r":([\w-]+):\s*(.*)", match.group(2)))
        if "pyobject" in options:
            yield match.group(1), options["pyobject"].strip(), options.get("end-before")


def _find_object(tree: ast.Module, dotted: str) -> ast.AST | None:
    body = tree.body
    node = None
    for part in dotted.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node


def test_every_code_include_of_the_book_resolves_to_a_library_object():
    seen = 0
    for page in sorted((ROOT / "book").glob("*.md")):
        for rel, obj, end_before in _pyobjects(page.read_text()):
            source = (page.parent / rel).resolve()
            assert source.is_file(), f"{page.name}: includes {rel}, which does not exist"
            node = _find_object(ast.parse(source.read_text()), obj)
            assert node is not None, f"{page.name}: {obj} not found in {rel}"
            if end_before:
                lines = source.read_text().splitlines()[node.lineno - 1 : node.end_lineno]
                assert any(end_before in line for line in lines), f"{page.name}: {end_before!r} not in {obj}"
            seen += 1
    assert seen >= 8, f"only {seen} code includes found; the architecture page should show the library's code"


def test_every_autodoc_entry_of_the_api_page_names_a_documented_library_object():
    import importlib
    import inspect

    text = (ROOT / "book" / "api.md").read_text()
    entries = re.findall(r"\.\. (auto\w+):: ([\w.]+)", text)
    assert len(entries) >= 40, f"only {len(entries)} autodoc entries on the API page"
    assert "literalinclude" not in text, "the API page should be autodoc, not pasted source"
    for kind, dotted in entries:
        parts = dotted.split(".")
        obj = None
        for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for name in parts[cut:]:
                obj = getattr(obj, name, None)
            break
        assert obj is not None, f"api.md: {kind} {dotted} does not resolve"
        doc = inspect.getdoc(obj) or ""
        assert len(doc) > 20, f"api.md: {dotted} has no docstring to show"
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert {"sphinx.ext.autodoc", "sphinx.ext.napoleon"} <= set(config["sphinx"]["extra_extensions"])


def _bib_keys() -> set[str]:
    return set(re.findall(r"@\w+\{([^,\s]+),", (ROOT / "book" / "references.bib").read_text()))


def _cited_keys(text: str) -> set[str]:
    keys = set()
    for group in re.findall(r"\{cite(?::[a-z]+)?\}`([^`]+)`", text):
        keys.update(k.strip() for k in group.split(","))
    return keys


def test_every_citation_has_a_bibliography_entry():
    keys = _bib_keys()
    assert {"jin2023gimp", "ilse2018abmil", "xiong2021nystromformer", "schroff2015facenet"} <= keys
    texts = [(p.name, p.read_text()) for p in (ROOT / "book").glob("*.md")]
    for nb_path in book.stage_notebooks(NOTEBOOKS):
        nb = nbformat.read(nb_path, as_version=4)
        texts.append((nb_path.name, "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")))
    for name, text in texts:
        unknown = _cited_keys(text) - keys
        assert not unknown, f"{name} cites keys missing from book/references.bib: {sorted(unknown)}"


def test_config_never_executes_and_needs_no_network():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    assert config["bibtex_bibfiles"] == ["book/references.bib"]
    assert "intersphinx_mapping" not in json.dumps(config)


# Tiny throwaway notebooks for the runner's own behaviour.


def _notebook(path: Path, body: str, params: str = "workdir = 'w'  # run folder\nscale = 1.0  # knob") -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), nbformat.v4.new_code_cell("import json, pathlib"), cell,
                nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


@pytest.fixture
def tiny_root(tmp_path):
    root = tmp_path / "root"
    (root / "notebooks" / "params").mkdir(parents=True)
    (root / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n  - file: notebooks/01_ok\n  - file: notebooks/02_boom\n  - file: notebooks/03_after\n"
    )
    (root / "_config.yml").write_text("title: tiny\n")
    write = "pathlib.Path(workdir, '{stem}').mkdir(parents=True, exist_ok=True)\n" \
            "pathlib.Path(workdir, '{stem}', 'metrics.json').write_text(json.dumps({{'scale': scale}}))"
    _notebook(root / "notebooks" / "01_ok.ipynb",
              "from tqdm.auto import tqdm\nsum(tqdm(range(3)))\n" + write.format(stem="01_ok"))
    _notebook(root / "notebooks" / "02_boom.ipynb", "x = 1\nraise ValueError(f'boom at scale {scale}')")
    _notebook(root / "notebooks" / "03_after.ipynb", write.format(stem="03_after"))
    (root / "notebooks" / "params" / "t.yaml").write_text("common:\n  scale: 2.0\n01_ok:\n  scale: 3.0\n")
    return root


def test_param_set_sections_merge_and_overrides_go_where_declared(tiny_root):
    ps = book.load_param_set("t", tiny_root / "notebooks" / "params")
    assert ps.common == {"scale": 2.0} and ps.per_notebook == {"01_ok": {"scale": 3.0}}
    assert book.notebook_parameters(ps, "01_ok") == {"scale": 3.0}
    assert book.notebook_parameters(ps, "03_after") == {"scale": 2.0}
    assert book.notebook_parameters(ps, "03_after", {"scale": 5, "other": 1}, {"scale": {}}) == {"scale": 5}
    assert book.check_param_set(ps, book.stage_notebooks(tiny_root / "notebooks")) == []


def test_unknown_parameter_names_the_file_key_and_notebook(tiny_root):
    (tiny_root / "notebooks" / "params" / "typo.yaml").write_text("03_after:\n  scael: 1\n04_gone:\n  scale: 1\n")
    ps = book.load_param_set("typo", tiny_root / "notebooks" / "params")
    problems = book.check_param_set(ps, book.stage_notebooks(tiny_root / "notebooks"))
    assert any("'scael'" in p and "03_after.ipynb" in p and "typo.yaml" in p for p in problems), problems
    assert any("'04_gone' names no notebook" in p for p in problems), problems
    # the runner refuses before executing anything
    code = book.main(["--root", str(tiny_root), "--params", "typo", "--no-build"])
    assert code == 2
    assert not (tiny_root / "_build" / "site" / "notebooks" / "01_ok.ipynb").exists()


def test_bad_parameter_files_are_named(tiny_root):
    with pytest.raises(book.ParamError, match=r"nope.*known sets: \['t'\]"):
        book.load_param_set("nope", tiny_root / "notebooks" / "params")
    bad = tiny_root / "notebooks" / "params" / "bad.yaml"
    bad.write_text("common:\n  scale: 1\nfigures:\n  dpi: 3\n")
    with pytest.raises(book.ParamError, match=r"bad.yaml.*'figures'"):
        book.load_param_set(bad)


def test_failing_notebook_stops_the_run_with_its_name_and_traceback(tiny_root, capsys):
    work = tiny_root / "work"
    code = book.main(["--root", str(tiny_root), "--params", "t", "--workdir", str(work), "--no-build"])
    err = capsys.readouterr().err
    assert code == 1
    assert "notebook 02_boom failed at cell" in err
    assert "ValueError" in err and "boom at scale 2.0" in err
    assert "\x1b[" not in err  # colour codes stripped from the traceback
    site = tiny_root / "_build" / "site" / "notebooks"
    assert json.loads((work / "01_ok" / "metrics.json").read_text()) == {"scale": 3.0}
    assert (site / "01_ok.ipynb").is_file()
    assert not (site / "02_boom.ipynb").exists(), "a failed notebook must not look executed"
    assert (tiny_root / "_build" / "failed" / "02_boom.ipynb").is_file()
    assert not (work / "03_after").exists(), "notebooks after the failing one must not run"
    runs = json.loads((tiny_root / "_build" / "site" / "_runs.json").read_text())
    assert runs["01_ok"]["status"] == "executed" and runs["02_boom"]["status"] == "failed"
    # the executed copy carries the injected parameters and a banner naming the set
    executed = nbformat.read(site / "01_ok.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert "parameter set **t**" in executed.cells[1].source
    # no progress-bar noise reaches the rendered page
    streams = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"]
    assert not any(o.name == "stderr" for o in streams), [o.text[:80] for o in streams]


def test_only_and_overrides_reach_just_the_chosen_notebook(tiny_root):
    work = tiny_root / "work"
    code = book.main(["--root", str(tiny_root), "--params", "t", "--workdir", str(work), "--only", "03",
                      "-p", "scale=7", "--no-build"])
    assert code == 0
    assert json.loads((work / "03_after" / "metrics.json").read_text()) == {"scale": 7}
    assert not (work / "01_ok").exists()
    # an override no selected notebook declares is refused
    assert book.main(["--root", str(tiny_root), "--params", "t", "--only", "03", "-p", "nope=1", "--no-build"]) == 2


@pytest.mark.slow
def test_prose_pages_build_without_warnings_from_the_committed_notebooks(tmp_path):
    """The site from the committed (unexecuted) notebooks: every page, include and citation resolves."""
    result = book.run_book("smoke", root=ROOT, output=tmp_path, execute=False, quiet_build=True)
    assert result.build_status == 0, "jupyter-book build -W -n failed; see the warnings above"
    html = result.html
    intro = (html / "book" / "intro.html").read_text()
    assert "without executing the notebooks" in intro
    api = (html / "book" / "api.html").read_text()
    assert "class GiMP" in re.sub(r"<[^>]+>", "", api), "the API page does not show the library source"
    for stem in STAGES:
        page = (html / "notebooks" / f"{stem}.html").read_text()
        assert "was not executed for this build" in page


# ------------------------------------------------------------------------ notebooks tier


@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """Execute every stage notebook with the smoke set, in order, then build the site (once)."""
    out = tmp_path_factory.mktemp("smoke_book")
    missing = [s for s in STAGES if not (NOTEBOOKS / f"{s}.ipynb").is_file()]
    assert not missing, f"stage notebooks missing: {missing}"
    try:
        result = book.run_book("smoke", root=ROOT, output=out, workdir=out / "work", quiet_build=True)
    except book.NotebookFailed as err:
        pytest.fail(str(err), pytrace=False)
    return out, result


@pytest.mark.notebooks
@pytest.mark.timeout(1800)
def test_every_stage_notebook_executes_with_smoke_parameters(smoke_book):
    out, result = smoke_book
    assert list(result.seconds) == STAGES
    for stem in STAGES:
        metrics = json.loads((out / "work" / stem / "metrics.json").read_text())
        assert isinstance(metrics, dict) and metrics, f"{stem}/metrics.json is empty"
        nb = nbformat.read(out / "_build" / "site" / "notebooks" / f"{stem}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, f"{stem}: error outputs in the executed copy"
    work = out / "work"
    record = json.loads((work / "cohort.json").read_text())
    assert record["kind"] == "synthetic" and record["profile"] == "smoke" and record["recorded_by"] == "01_data"
    for run in ("02_genes/groupmsa", "03_mpm/mpm", "04_pretrain/gimp", "05_finetune/gimp", "06_figures/gimp_no_genes"):
        assert (work / run).is_dir(), f"{run}: the runs of the book's own parameter set keep their plain names"
    finetune = json.loads((work / "05_finetune" / "metrics.json").read_text())
    assert finetune["pretrained"] == "04_pretrain/gimp" and finetune["run"] == "gimp"


@pytest.mark.notebooks
@pytest.mark.timeout(1800)
def test_built_book_has_every_chapter_and_its_figures(smoke_book):
    out, result = smoke_book
    assert result.build_status == 0, "jupyter-book build -W -n --keep-going failed (warnings are errors)"
    html = result.html
    for entry in ["book/intro", "book/method", "book/architecture", "book/data", "book/results",
                  "book/reproduce", "book/api", "book/bibliography", "book/provenance", "book/running"]:
        assert (html / f"{entry}.html").is_file(), f"{entry}.html not built"
    for stem in STAGES:
        page = (html / "notebooks" / f"{stem}.html").read_text()
        images = re.findall(r'<img[^>]+src="([^"]+)"', page)
        if stem in TABLE_STAGES:
            tables = page.count("<table")
            assert tables >= 2, f"{stem}.html should show the regenerated Tables 1 and 2, found {tables} tables"
        else:
            assert images, f"{stem}.html shows no figure"
        for src in images:
            if not src.startswith("data:"):
                assert (html / "notebooks" / src).resolve().is_file(), f"{stem}.html: image {src} missing"
        assert "parameter set <strong>smoke</strong>" in page, f"{stem}.html does not say which parameters made it"
    intro = (html / "book" / "intro.html").read_text()
    assert "<strong>synthetic</strong>" in intro and "<strong>smoke</strong>" in intro
    results = (html / "book" / "results.html").read_text()
    assert "0.9947" in results and "0.9974" in results
    # the regenerated tables name rows as the paper does, beside the paper's figure for each row
    assert "GiMP w/o pre-training" in results and "aggregator + GroupMSA + triplet" in results
    assert "0.7737" in results and "0.9263" in results  # ABMIL (Table 1), aggregator + triplet (Table 2)
    assert "Systems compared in" not in results  # the old per-recipe-id table
    assert "five testable claims" in results
    assert any(verdict in results for verdict in ("holds", "does not hold", "cannot tell at this size"))
    for stem in STAGES:
        assert f"{stem}/metrics.json" in results, f"results page lacks the metrics of {stem}"
    method = (html / "book" / "method.html").read_text()
    numbers = re.findall(r'class="eqno">\((\d)\)', method)
    assert numbers == ["1", "2", "3", "4"], f"method page should number equations (1)-(4), found {numbers}"
    bib = (html / "book" / "bibliography.html").read_text()
    assert "gene-induced multimodal pre-training" in bib.lower() and "Ting Jin" in bib


def _chromium_or_skip() -> str:
    chromium = render_check.find_chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); .ci/run installs it")
    return chromium


def _headless(chromium: str, profile: Path, *args: str) -> list[str]:
    """A headless Chromium command that reaches no network of its own accord."""
    return render_check.headless_command(chromium, profile, *args)


def _screenshot(chromium: str, url: str, png: Path, profile: Path) -> np.ndarray:
    from PIL import Image

    cmd = _headless(chromium, profile, "--hide-scrollbars", "--window-size=1280,900", "--virtual-time-budget=4000",
                    f"--screenshot={png}", url)
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot of {url}"
    return np.asarray(Image.open(png).convert("L"), dtype=np.float32)


@pytest.mark.notebooks
@pytest.mark.timeout(1800)
def test_front_page_and_a_chapter_render_non_blank(smoke_book, tmp_path):
    chromium = _chromium_or_skip()
    out, result = smoke_book
    for name, page in [("front", result.html / "index.html"), ("chapter", result.html / "notebooks" / "05_finetune.html")]:
        pixels = _screenshot(chromium, page.as_uri(), tmp_path / f"{name}.png", tmp_path / f"profile_{name}")
        assert pixels.shape == (900, 1280)
        assert pixels.std() > 10, f"{name} screenshot is blank (pixel sd {pixels.std():.1f})"
        assert (pixels < 128).mean() > 0.01, f"{name} screenshot has almost no dark (text) pixels"


@pytest.mark.notebooks
@pytest.mark.timeout(1800)
def test_equations_render_from_the_site_itself(smoke_book, tmp_path):
    """MathJax ships with the site: no page loads it from a CDN, and a browser typesets the
    method page's equations from the local copy."""
    out, result = smoke_book
    html = result.html
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in html.rglob("*.html"):
        text = page.read_text()
        assert "cdn.jsdelivr.net/npm/mathjax" not in text, f"{page} loads MathJax from a CDN"
    method = (html / "book" / "method.html").read_text()
    assert 'src="../_static/mathjax/tex-chtml.js"' in method
    cmd = _headless(_chromium_or_skip(), tmp_path / "profile", "--virtual-time-budget=8000", "--dump-dom",
                    (html / "book" / "method.html").as_uri())
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<mjx-container") >= 4, "MathJax did not typeset the method page's equations"


# ------------------------------------------------------------------------ the GiMP figure


def test_gimp_figure_regenerates_and_matches_the_committed_svg(tmp_path):
    import xml.etree.ElementTree as ET

    import matplotlib

    from gimplib.book import figure

    committed = ROOT / figure.FIGURE_PATH
    assert committed.is_file(), f"{committed} missing: run python -m gimplib.book.figure"
    out = figure.write_gimp_figure(tmp_path / "gimp.svg")
    text = out.read_text()
    assert text == figure.svg_text(), "drawing the figure twice gave different SVG"
    root = ET.fromstring(text)
    assert root.tag.endswith("svg") and float(root.get("width").removesuffix("pt")) > 400
    assert figure.main(["--out", str(tmp_path / "cli.svg")]) == 0 and (tmp_path / "cli.svg").read_text() == text
    # the committed file is this code's drawing (compared where the same matplotlib drew it)
    made_by = re.search(r"gimplib\.book\.figure \(matplotlib ([^)]+)\)", committed.read_text())
    assert made_by, f"{committed} was not written by gimplib.book.figure"
    if made_by.group(1) == matplotlib.__version__:
        assert committed.read_text() == text, f"{committed} is stale: run python -m gimplib.book.figure"


def test_gimp_figure_is_on_the_architecture_and_intro_pages():
    arch = (ROOT / "book" / "architecture.md").read_text()
    intro = (ROOT / "book" / "intro.md").read_text()
    for page, text in (("architecture.md", arch), ("intro.md", intro)):
        assert "figures/gimp.svg" in text, f"{page} does not show the GiMP figure"
        assert ":alt:" in text[text.index("figures/gimp.svg"):][:600], f"{page}: the GiMP figure has no alt text"
    assert ":name: fig-gimp" in arch and "{numref}`fig-gimp`" in arch and "{numref}`fig-gimp`" in intro
    assert "```text" not in arch.split("## Tensor shapes")[0], "the ASCII drawing is back on the architecture page"


# ------------------------------------------------------------------------ rendered pages at 1280 px


def _mathjax_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or spec.origin is None:
        pytest.skip("sphinx-mathjax-offline (the book's local MathJax) is not installed")
    return Path(spec.origin).parent / "static" / "mathjax"


_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<style>body {{ margin: 0; font-family: sans-serif; }} article.bd-article {{ width: 600px; margin-left: 100px; }}
pre {{ overflow-x: auto; }}</style>
<script>window.MathJax = {{ tex: {{ tags: "ams" }} }};</script>
<script defer src="{mathjax}"></script></head>
<body><article class="bd-article"><h1>Probe</h1><p>Some text.</p>{body}</article></body></html>"""


def test_render_check_finds_clipping_and_mathjax_errors(tmp_path, monkeypatch):
    """The page probe on hand-made pages: what it must flag, and a clean page it must pass."""
    chromium = _chromium_or_skip()
    mathjax = (_mathjax_dir() / "tex-chtml.js").as_uri()
    pages = {
        "clean": "<p>Short text.</p><pre>short code</pre><p>$$a = b \\tag{1}$$</p>",
        "wide_code": "<pre>" + "x = 1  # " + "long " * 60 + "</pre>",
        "wide_image": '<div style="width: 900px; height: 20px; background: red">wide</div>',
        "bad_math": "<p>$$\\begin{split} a &= b \\tag{1} \\end{split}$$</p>",
    }
    for name, body in pages.items():
        (tmp_path / f"{name}.html").write_text(_PAGE.format(mathjax=mathjax, body=body))
    reports = {r.page: r for r in render_check.check_site(tmp_path, out=tmp_path / "shots", chromium=chromium)}
    assert set(reports) == {f"{n}.html" for n in pages}
    clean = reports["clean.html"]
    assert clean.ok, clean.problems()
    assert clean.formulas >= 1 and clean.column_width == 600 and clean.screenshot.is_file()
    assert reports["wide_code.html"].scrolled and not reports["wide_code.html"].ok
    assert reports["wide_image.html"].outside and reports["wide_image.html"].outside[0].startswith("div")
    bad = reports["bad_math.html"]
    assert bad.math_errors and "not allowed" in " ".join(bad.math_errors), bad.math_errors
    assert not list(tmp_path.glob("_gimp_probe_*")), "the probe's temporary copies were left behind"
    monkeypatch.chdir(tmp_path.parent)  # a site given as a relative path (python -m ... _build/html)
    again = render_check.check_site(Path(tmp_path.name), chromium=chromium, pages=[tmp_path / "clean.html"])
    assert [r.ok for r in again] == [True]


#: Where the rendered-book test leaves its screenshots (one PNG per page, full page height).
SCREENSHOTS = ROOT / "_build" / "screenshots"


@pytest.fixture(scope="session")
def rendered_pages(smoke_book):
    chromium = _chromium_or_skip()
    out, result = smoke_book
    assert result.build_status == 0
    return render_check.check_site(result.html, out=SCREENSHOTS, chromium=chromium)


@pytest.mark.notebooks
@pytest.mark.timeout(1800)
def test_every_page_renders_at_1280px_without_mathjax_errors(rendered_pages):
    """Every page of the smoke book, in headless Chromium at 1280 px: no MathJax error
    (``merror``, e.g. "\\tag not allowed in split environment"), a screenshot of each in
    _build/screenshots/, and nothing clipped on the prose pages."""
    pages = {r.page for r in rendered_pages}
    assert {"book/intro.html", "book/architecture.html", "notebooks/03_mpm.html"} <= pages
    errors = [line for r in rendered_pages for line in r.problems() if "MathJax error" in line or r.error]
    assert not errors, "\n".join(errors)
    assert all(r.screenshot is not None and r.screenshot.is_file() for r in rendered_pages)
    assert next(r for r in rendered_pages if r.page == "book/method.html").formulas >= 20
    clipped = [line for r in rendered_pages if not r.page.startswith("notebooks/") for line in r.problems()]
    assert not clipped, "content clipped at 1280 px:\n" + "\n".join(clipped)


@pytest.mark.notebooks
@pytest.mark.timeout(1800)
def test_notebook_pages_render_at_1280px_without_clipping(rendered_pages):
    clipped = [line for r in rendered_pages if r.page.startswith("notebooks/") for line in r.problems()]
    assert not clipped, "content clipped at 1280 px:\n" + "\n".join(clipped)
