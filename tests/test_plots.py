"""gimplib.plots: every figure renders on the Agg backend, and the scores it prints are right."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gimplib import plots


def _rendered(fig: Figure) -> np.ndarray:
    """Draw the figure and return its RGBA buffer (fails on any drawing error)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())


def _not_blank(fig: Figure) -> bool:
    img = _rendered(fig)[..., :3]
    return img.std() > 5  # a blank canvas is uniformly white


def _titles(fig: Figure) -> str:
    return " | ".join(ax.get_title() for ax in fig.axes)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_bag_sizes_reports_range(rng):
    sizes = rng.integers(485, 148_569, size=40)
    fig = plots.plot_bag_sizes(sizes, ["LUAD"] * 20 + ["LUSC"] * 20)
    assert isinstance(fig, Figure) and _not_blank(fig)
    title = _titles(fig)
    assert "n=40" in title and f"{sizes.min():,}" in title and f"{sizes.max():,}" in title


def test_bag_sizes_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels has 1 entries"):
        plots.plot_bag_sizes([10, 20], ["LUAD"])


def test_tissue_maps_with_and_without_values(rng):
    coords = [rng.integers(0, 5000, size=(n, 2)) for n in (50, 120, 8)]
    fig = plots.plot_tissue_maps(coords, ncols=2)
    assert _not_blank(fig)
    # 3 maps on a 2x2 grid: the 4th axis is switched off
    assert sum(ax.axison for ax in fig.axes) == 3
    fig = plots.plot_tissue_maps(coords[:1], [rng.random(50)], titles=["s0"])
    assert _not_blank(fig) and "s0" in _titles(fig)
    with pytest.raises(ValueError, match=r"values\[0\] must have shape \(50,\)"):
        plots.plot_tissue_maps(coords[:1], [rng.random(49)])
    with pytest.raises(ValueError, match=r"coords\[0\]"):
        plots.plot_tissue_maps([rng.random((5, 3))])


def test_tissue_map_on_a_grid_is_an_image():
    # CLAM coords: a 256-px grid; each patch becomes one raster cell at its place, also when
    # a second tissue region sits on a grid with another origin (offset 100 px here)
    cells = np.array([[0, 0], [1, 0], [2, 0], [3, 2]])
    coords = cells * 256 + 512
    coords[3] += 100
    fig = plots.plot_tissue_maps([coords], [np.array([1.0, 2.0, 3.0, 4.0])])
    image = fig.axes[0].get_images()[0].get_array()
    assert image.shape == (3, 4)
    assert image[0, 0] == 1.0 and image[0, 2] == 3.0 and image[2, 3] == 4.0
    assert np.ma.getmaskarray(image).sum() == 12 - 4  # background stays empty


def test_attention_map(rng):
    fig = plots.plot_attention_map(rng.integers(0, 1000, (30, 2)), rng.random(30), title="case-1")
    assert _not_blank(fig) and "case-1" in _titles(fig)


def test_gene_heatmap_picks_discriminative_genes(rng):
    y = np.repeat([0, 1], 30)
    x = rng.normal(size=(60, 500))
    x[y == 1, 7] += 5.0  # the one gene that separates the classes
    names = [f"ENSG{j:05d}" for j in range(500)]
    fig = plots.plot_gene_heatmap(x, y, gene_names=names, label_names=["LUAD", "LUSC"], max_genes=10)
    assert _not_blank(fig)
    shown = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    assert "ENSG00007" in shown


def test_learning_curves_from_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    pd.DataFrame(
        {"epoch": [0, 1, 2], "lr": [1e-4, 5e-5, 0.0], "train_loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.8, 0.7],
         "train_loss_tri": [0.0, 0.0, 0.0], "train_acc": [0.5, 0.8, 0.9], "val_accuracy": [0.5, 0.7, 0.8],
         "time_s": [3.0, 2.0, 2.0]}
    ).to_csv(csv, index=False)
    fig = plots.plot_learning_curves(csv, title="finetune")
    assert _not_blank(fig)
    # loss and accuracy panels; the all-zero triplet term, lr and time are not drawn
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]
    assert [l.get_label() for l in fig.axes[0].get_lines()] == ["train", "val"]
    # train_acc and val_accuracy share a panel
    assert [l.get_label() for l in fig.axes[1].get_lines()] == ["train", "val"]
    np.testing.assert_allclose(fig.axes[1].get_lines()[1].get_ydata(), [0.5, 0.7, 0.8])


def test_learning_curves_keys_and_errors():
    frame = pd.DataFrame({"epoch": [0, 1], "train_loss": [2.0, 1.0], "val_auc": [0.5, 0.6]})
    fig = plots.plot_learning_curves(frame, keys=["auc"])
    assert [ax.get_title() for ax in fig.axes] == ["auc"]
    with pytest.raises(ValueError, match="no metric columns"):
        plots.plot_learning_curves(pd.DataFrame({"epoch": [0, 1], "note": ["a", "b"]}))


def test_reconstructions_reports_l1(rng):
    truth = rng.normal(size=(40, 16))
    mask = np.zeros(40, bool)
    mask[::2] = True
    pred = truth + 0.1
    fig = plots.plot_reconstructions(truth, pred, mask, n_dims=8)
    assert _not_blank(fig)
    assert "L1 0.100" in _titles(fig)
    with pytest.raises(ValueError, match="no masked position"):
        plots.plot_reconstructions(truth, pred, np.zeros(40, bool))


def test_confusion_accuracy_in_title():
    fig = plots.plot_confusion([[8, 2], [1, 9]], ["LUAD", "LUSC"])
    assert _not_blank(fig) and "accuracy 0.850" in _titles(fig)
    with pytest.raises(ValueError, match="C=3"):
        plots.plot_confusion([[1, 0], [0, 1]], ["a", "b", "c"])


def test_roc_auc_in_legend(rng):
    y = np.repeat([0, 1], 20)
    perfect = np.stack([1 - y, y], 1).astype(float)
    fig = plots.plot_roc({"perfect": (y, perfect), "random": (y, rng.random(40))})
    assert _not_blank(fig)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "perfect (AUC 1.000)"
    with pytest.raises(ValueError, match="single class"):
        plots.plot_roc({"bad": (np.zeros(5), rng.random(5))})


def test_embedding_scores_separable_vs_random(rng):
    y = np.repeat([0, 1], 25)
    sep = rng.normal(size=(50, 8)) + 6.0 * y[:, None]
    noise = rng.normal(size=(50, 8))
    good, bad = plots.embedding_scores(sep, y), plots.embedding_scores(noise, y)
    assert good["knn_accuracy"] == 1.0 and good["silhouette"] > 0.5
    assert bad["knn_accuracy"] < 0.8 and abs(bad["silhouette"]) < 0.2
    with pytest.raises(ValueError, match="samples each"):
        plots.embedding_scores(sep[:3], np.array([0, 0, 1]))


def test_tsne_panels_titles_carry_scores(rng):
    y = np.repeat([0, 1], 12)
    panels = {"GiMP": (rng.normal(size=(24, 6)) + 5 * y[:, None], y), "no genes": (rng.normal(size=(24, 6)), y)}
    fig = plots.plot_tsne_panels(panels, label_names=["LUAD", "LUSC"], ncols=3)
    assert _not_blank(fig)
    titles = _titles(fig)
    assert "GiMP\nsilhouette" in titles and "kNN acc 1.00" in titles
    assert sum(ax.axison for ax in fig.axes) == 2


def test_gene_attributions(rng):
    a = rng.dirichlet(np.ones(6), size=30)
    y = np.repeat([0, 1], 15)
    fig = plots.plot_gene_attributions(a, y, label_names=["LUAD", "LUSC"], top=4)
    assert _not_blank(fig)
    assert len(fig.axes[0].get_yticklabels()) == 4
    with pytest.raises(ValueError, match="2 names for 6 groups"):
        plots.plot_gene_attributions(a, y, group_names=["a", "b"])


def test_save_figure(tmp_path):
    fig = plots.plot_confusion([[1, 0], [0, 1]], ["a", "b"])
    out = plots.save_figure(fig, tmp_path / "sub" / "cm.png")
    assert out.stat().st_size > 1000


def test_seed_accuracies_points_paper_and_interval():
    runs = pd.DataFrame({"system": ["ABMIL"] * 3 + ["GiMP"] * 3, "seed": [0, 1, 2] * 2,
                         "accuracy": [0.8125, 0.75, 0.59375, 1.0, 1.0, 0.96875]})
    fig = plots.plot_seed_accuracies(runs, paper={"GiMP": 0.9947, "ABMIL": 0.7737}, n_test=32, title="seeds")
    assert _not_blank(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ABMIL", "GiMP"]  # order kept, not sorted
    assert "one patient = 3.1 points" in ax.get_xlabel()
    labels = [h.get_label() for h in ax.get_legend_handles_labels()[0]]
    assert labels.count("paper (TCGA)") == 1 and "one seed" in labels
    # six seeds drawn as points, two paper diamonds
    offsets = [c.get_offsets() for c in ax.collections]
    assert sum(len(o) for o in offsets) == 6 + 2
    with pytest.raises(ValueError, match="missing"):
        plots.plot_seed_accuracies(pd.DataFrame({"accuracy": [1.0]}))
    with pytest.raises(ValueError, match="no run"):
        plots.plot_seed_accuracies(pd.DataFrame({"system": ["a"], "accuracy": [np.nan]}))


def test_use_book_figures_outside_ipython_is_a_no_op():
    plots.use_book_figures("svg")
    with pytest.raises(ValueError, match="retina"):
        plots.use_book_figures("jpeg")


def test_attention_tumour_auc_figure():
    records = [dict(slide_id="a", tumour_fraction=0.1, auc=0.9), dict(slide_id="b", tumour_fraction=0.3, auc=0.7),
               dict(slide_id="c", tumour_fraction=1.0, auc=float("nan"))]
    fig = plots.plot_attention_tumour_auc(records, label={"a": "LUAD", "b": "LUSC", "c": "LUSC"})
    assert _not_blank(fig)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "LUAD (n = 1)" in labels and "LUSC (n = 1)" in labels and "median 0.80" in labels
    with pytest.raises(ValueError, match="no slide"):
        plots.plot_attention_tumour_auc([dict(slide_id="c", tumour_fraction=1.0, auc=float("nan"))])
    with pytest.raises(ValueError, match="missing"):
        plots.plot_attention_tumour_auc([dict(slide_id="c")])


def test_tsne_four_panels_are_two_by_two(rng):
    y = np.repeat([0, 1], 15)
    panels = {name: (rng.normal(size=(30, 4)) + y[:, None], y) for name in ("GiMP", "no genes", "BioViL", "MGCA")}
    fig = plots.plot_tsne_panels(panels, label_names=["LUAD", "LUSC"])
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    rows = {round(ax.get_position().y0, 2) for ax in shown}
    assert len(shown) == 4 and len(rows) == 2
