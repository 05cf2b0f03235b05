"""Figures and words a stage notebook hands to its rendered page (myst-nb's ``glue``).

A figure glued under a name is shown where a markdown cell places it with
``{glue:figure}``, which gives it a caption, a label for ``{numref}`` and alt text: what an
inline matplotlib output cannot have. The book builds with warnings as errors, so a name a
page refers to must always be glued: :func:`glue_figure` glues a small note figure in place
of a figure the run could not draw (a cohort without slides, a missing run).
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["cohort_words", "glue_figure", "glue_text"]


class _Words(str):
    """A string whose repr is itself, so that ``{glue:text}`` pastes it without quotes."""

    def __repr__(self) -> str:
        return str(self)


def _glue(name: str, value: Any) -> None:
    from myst_nb import glue  # the book's renderer; imported here so gimplib.book works without it

    glue(name, value, display=False)


def glue_text(name: str, text: str) -> None:
    """Glue words for ``{glue:text}`name``` in a caption or a sentence of the page."""
    _glue(name, _Words(text))


def glue_figure(name: str, fig: Any, *, missing: str = "not drawn in this run") -> None:
    """Glue ``fig`` under ``name`` for a ``{glue:figure}`` cell, and close it (no inline copy).

    Args:
        name: the glue key the page's markdown refers to.
        fig: a matplotlib figure or any displayable image (``IPython.display.SVG``), or None
            when this run has nothing to draw.
        missing: the note drawn in place of a None figure, saying why.
    """
    if fig is None:
        fig, ax = plt.subplots(figsize=(6.0, 0.8))
        ax.axis("off")
        ax.text(0.5, 0.5, missing, ha="center", va="center", fontsize=10, color="0.3")
    _glue(name, fig)
    if isinstance(fig, Figure):
        plt.close(fig)


def cohort_words(kind: str, profile: str, cohort_dir: Any) -> str:
    """How a caption names the cohort a figure came from: "synthetic" where it is.

    Args:
        kind: :attr:`gimplib.book.Stage.cohort_kind` (``synthetic``, ``slides``, ``data_dir``).
        profile: the synthetic preset.
        cohort_dir: the cohort folder.
    """
    if kind == "synthetic":
        return f"synthetic cohort ({profile} profile), not TCGA"
    if kind == "slides":
        return f"cohort tiled from raw slides in {cohort_dir}"
    return f"cohort in {cohort_dir}"
