"""The GiMP figure: pre-training and fine-tuning, drawn with matplotlib, tensor shapes on the arrows.

The book's picture of the method (the counterpart of the paper's Fig. 1), drawn by this
code so that it can be regenerated and checked: ``python -m gimplib.book.figure`` rewrites
``book/figures/gimp.svg``, and ``tests/test_book.py`` checks that the committed file is what
this code draws. Symbols follow the notation table of ``book/method.md``.

Panel (a), pre-training: the frozen GroupMSA turns the expression ``genes (b, g)`` into
``CLS_ge``; the Nystrom aggregator reads a contiguous window of L patch embeddings
``feats (b, L, 1024)`` in which half of the positions carry the mask token ``m``; its class
token ``CLS_img`` and ``CLS_ge`` are concatenated into ``CLS_pat`` for the triplet loss
(Eq. 4), and the MPM decoder maps the output tokens back to 1024-d patches for ``L_rec``
(Eq. 3). Panel (b), fine-tuning: the pre-trained aggregator reads the whole bag
``feats (b, n, 1024)``, and an MLP maps ``CLS_pat = [CLS_img; CLS_ge]`` to the LUAD / LUSC
logits.
"""

from __future__ import annotations

import argparse
import io
import os
import re
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

__all__ = ["FIGURE_PATH", "draw_gimp_figure", "main", "svg_text", "write_gimp_figure"]

#: Where the book keeps the figure (relative to the repository root).
FIGURE_PATH = Path("book") / "figures" / "gimp.svg"

# colours: image branch, gene branch, losses, fused / head
_IMG, _GENE, _LOSS, _FUSE, _DATA = "#d8ebf5", "#dcefd9", "#f8ddd5", "#ece3f3", "#f4f4f4"
_EDGE = "#4a4a4a"
_FONT = 8.0


def _box(ax, x: float, y: float, w: float, h: float, text: str, color: str, *, size: float = _FONT,
         bold: bool = False, dashed: bool = False) -> tuple[float, float, float, float]:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.8", facecolor=color,
                                edgecolor=_EDGE, linewidth=0.9, linestyle="--" if dashed else "-"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            fontweight="bold" if bold else "normal", linespacing=1.25)
    return x, y, w, h


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "", *, side: str = "above",
           shift: float = 0.0, size: float = _FONT - 0.5) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, color=_EDGE, linewidth=0.9,
                                 shrinkA=0, shrinkB=0))
    if label:
        mx, my = (start[0] + end[0]) / 2 + shift, (start[1] + end[1]) / 2
        if side == "above":
            ax.text(mx, my + 0.9, label, ha="center", va="bottom", fontsize=size, color="#1f3b57")
        elif side == "below":
            ax.text(mx, my - 0.9, label, ha="center", va="top", fontsize=size, color="#1f3b57")
        elif side == "right":
            ax.text(mx + 0.8, my, label, ha="left", va="center", fontsize=size, color="#1f3b57")
        else:
            ax.text(mx - 0.8, my, label, ha="right", va="center", fontsize=size, color="#1f3b57")


def _right(b):
    return b[0] + b[2], b[1] + b[3] / 2


def _left(b):
    return b[0], b[1] + b[3] / 2


def _top(b, f: float = 0.5):
    return b[0] + f * b[2], b[1] + b[3]


def _bottom(b, f: float = 0.5):
    return b[0] + f * b[2], b[1]


def _pretraining(ax) -> None:
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 50)
    ax.text(0, 49.5, "(a) Pre-training (GroupMSA trained on genes alone first, then frozen)",
            ha="left", va="top", fontsize=_FONT + 1.5, fontweight="bold")
    # gene branch (top)
    genes = _box(ax, 0.5, 33, 11.5, 8, "expression\nprofile", _DATA)
    gmsa = _box(ax, 21, 31.5, 24, 11, "GroupMSA (frozen)\nfragments → K groups\nMSA in groups, then across",
                _GENE, dashed=True)
    _arrow(ax, _right(genes), _left(gmsa), "genes\n(b, g)")
    # image branch (bottom)
    feats = _box(ax, 0.5, 9, 11.5, 12, "window of L\ncontiguous\npatches", _DATA)
    proj = _box(ax, 21, 10, 12, 10, "input\nprojection\n$\\mathbf{t}_j$ = ReLU(W$\\mathbf{h}_j$)", _IMG,
                size=_FONT - 0.5)
    mask = _box(ax, 39, 10, 12, 10, "MPM mask:\n50 % of $\\mathbf{t}_j$\n→ mask token $\\mathbf{m}$", _IMG,
                size=_FONT - 0.5)
    agg = _box(ax, 57, 8, 14, 14, "[CLS; tokens]\n→ 2 × Nyström\nattention\n(Eqs. 1, 2)", _IMG)
    dec = _box(ax, 80, 10, 11, 10, "MPM\ndecoder\n(MLP)", _IMG)
    rec = _box(ax, 70, 0.3, 29.5, 6.2, "$\\mathcal{L}_{rec}$ = L1 on masked $j \\in M$ (Eq. 3)", _LOSS,
               size=_FONT - 0.5)
    _arrow(ax, _right(feats), _left(proj), "feats\n(b, L, 1024)")
    _arrow(ax, _right(proj), _left(mask), "(b, L, d)")
    _arrow(ax, _right(mask), _left(agg), "(b, L, d)")
    _arrow(ax, _right(agg), _left(dec), "$\\mathbf{z}_j$\n(b, L, d)", side="below")
    _arrow(ax, _bottom(dec), (_bottom(dec)[0], rec[1] + rec[3]), "$\\hat{\\mathbf{h}}_j$ (b, L, 1024)", side="right")
    ax.text(6.25, 7.8, "L = 6000; a shorter\nbag is repeated", ha="center", va="top", fontsize=_FONT - 1.5,
            color="#555555")
    # fusion and triplet loss
    cat = _box(ax, 57, 31.5, 16, 11, "concat\n$\\mathrm{CLS}_{pat}$\n= [CLS$_{img}$; CLS$_{ge}$]", _FUSE)
    tri = _box(ax, 81, 31.5, 18.5, 11, "$\\mathcal{L}_{tri}$ (Eq. 4)\ntriplets by class\nmargin δ = 0.8", _LOSS)
    _arrow(ax, _right(gmsa), _left(cat), "CLS$_{ge}$\n(b, d)")
    _arrow(ax, _top(agg), (_top(agg)[0], cat[1]), "CLS$_{img}$ (b, d)", side="left")
    _arrow(ax, _right(cat), _left(tri), "(b, 2d)")
    ax.text(99.5, 26.5, "$\\mathcal{L}_{pre} = \\mathcal{L}_{tri} + \\mathcal{L}_{rec}$", ha="right", va="center",
            fontsize=_FONT + 1)


def _finetuning(ax) -> None:
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 30)
    ax.text(0, 29.5, "(b) Multimodal fine-tuning and test (slide and genes are both inputs)",
            ha="left", va="top", fontsize=_FONT + 1.5, fontweight="bold")
    genes = _box(ax, 0.5, 16, 11.5, 7, "expression\nprofile", _DATA)
    gmsa = _box(ax, 21, 15.5, 20, 8, "GroupMSA\n(frozen by default)", _GENE, dashed=True)
    feats = _box(ax, 0.5, 2, 11.5, 9, "whole bag:\nall n patches\nof the slide(s)", _DATA)
    agg = _box(ax, 21, 2, 20, 9, "aggregator\n(pre-trained,\nfine-tuned)", _IMG)
    cat = _box(ax, 54, 2, 14, 21.5, "concat\n$\\mathrm{CLS}_{pat}$\n(b, 2d)", _FUSE)
    head = _box(ax, 76, 8.25, 9, 9, "MLP\nhead", _FUSE)
    out = _box(ax, 91, 8.25, 8.5, 9, "LUAD /\nLUSC", _DATA, bold=True)
    _arrow(ax, _right(genes), _left(gmsa), "genes\n(b, g)")
    _arrow(ax, _right(feats), _left(agg), "feats\n(b, n, 1024)")
    _arrow(ax, _right(gmsa), (cat[0], _right(gmsa)[1]), "CLS$_{ge}$ (b, d)")
    _arrow(ax, _right(agg), (cat[0], _right(agg)[1]), "CLS$_{img}$ (b, d)")
    _arrow(ax, (cat[0] + cat[2], _left(head)[1]), _left(head), "(b, 2d)")
    _arrow(ax, _right(head), _left(out), "logits\n(b, 2)", size=_FONT - 1)


def draw_gimp_figure() -> Figure:
    """The two-panel GiMP figure (pre-training above, fine-tuning below) as a Figure."""
    fig = Figure(figsize=(7.6, 6.2))
    top = fig.add_axes((0.01, 0.34, 0.98, 0.65))
    bottom = fig.add_axes((0.01, 0.0, 0.98, 0.32))
    for ax in (top, bottom):
        ax.set_axis_off()
    _pretraining(top)
    _finetuning(bottom)
    return fig


def svg_text(fig: Figure | None = None) -> str:
    """The figure as SVG text with the volatile parts (date, ids from the renderer) fixed, so
    that drawing it twice gives the same bytes."""
    import matplotlib

    fig = fig or draw_gimp_figure()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": "gimp-figure", "svg.fonttype": "path"}):
        fig.savefig(buf, format="svg",
                    metadata={"Date": None, "Creator": f"gimplib.book.figure (matplotlib {matplotlib.__version__})"})
    return re.sub(r"\s+$", "", buf.getvalue()) + "\n"


def write_gimp_figure(path: str | os.PathLike = FIGURE_PATH) -> Path:
    """Draw the figure and write it as SVG to ``path`` (folders created; atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(svg_text(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gimplib.book.figure [--out book/figures/gimp.svg]``."""
    parser = argparse.ArgumentParser(prog="python -m gimplib.book.figure", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=FIGURE_PATH, help=f"SVG to write ({FIGURE_PATH})")
    args = parser.parse_args(argv)
    print(write_gimp_figure(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
