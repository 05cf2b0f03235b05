"""Run the book: execute the stage notebooks with papermill, then build the site.

``python -m gimplib.book --params demo`` does what ``make book`` does:

1. reads a parameter set, ``notebooks/params/<name>.yaml``: a ``common:`` mapping given to
   every notebook plus one mapping per notebook, keyed by its stem (``02_genes:``); every
   key must be a parameter the notebook declares in its ``parameters`` cell (papermill
   itself only warns about unknown keys, which hides typos);
2. executes ``notebooks/NN_*.ipynb`` in order with papermill into the build tree
   (``_build/site/notebooks/``); the committed notebooks stay output-free. A failing
   notebook stops the run with its name and the failing cell's traceback, and its partial
   copy is kept under ``_build/failed/``;
3. writes what produced the build (parameter set, data, date, commit, time per notebook,
   hardware) and the stages' ``metrics.json`` tables into the build tree's copy of the
   book pages, stamps each executed notebook with a banner saying which parameters and
   data made it (synthetic data is said to be synthetic);
4. builds the site with ``jupyter-book build _build/site -W -n --keep-going --all`` into
   ``_build/html``.

The build tree (``<output>/_build``):

``site/``      the Sphinx source: copies of ``_config.yml``, ``_toc.yml``, ``book/`` and the
               library sources (for ``literalinclude``), plus the executed notebooks
``html/``      the rendered book
``failed/``    partial copies of notebooks that raised

Modules: :mod:`gimplib.book.params` (parameter sets), :mod:`gimplib.book.site` (the build
tree's pages, provenance and results), :mod:`gimplib.book.runner` (papermill and
jupyter-book), :mod:`gimplib.book.stage` (what a notebook opens first: the workdir's one
cohort and split, and run folders named by their settings).
"""

from gimplib.book.params import (
    ParamError,
    ParamSet,
    check_param_set,
    declared_parameters,
    load_param_set,
    notebook_parameters,
    stage_notebooks,
    toc_notebooks,
)
from gimplib.book.runner import BookRun, NotebookFailed, build_book, execute_notebook, main, run_book
from gimplib.book.stage import Stage

__all__ = [
    "BookRun",
    "NotebookFailed",
    "ParamError",
    "ParamSet",
    "Stage",
    "build_book",
    "check_param_set",
    "declared_parameters",
    "execute_notebook",
    "load_param_set",
    "main",
    "notebook_parameters",
    "run_book",
    "stage_notebooks",
    "toc_notebooks",
]
