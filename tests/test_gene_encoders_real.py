"""The gene encoders on real TCGA lung expression (../shared/data/expression/tcga_nsclc_rna).

733 patients, 1,554 already-normalised genes, LUAD vs LUSC. Skipped where the shared folder
is absent (a user's clone). The full 5-fold comparison is the book page `genes_real`; these
tests check, on the folder's suggested split, that the inputs are handled as that page
assumes and that a short GroupMSA training learns the task.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

FOLDER = ("expression", "tcga_nsclc_rna")


@pytest.fixture(scope="module")
def real(shared_data):
    from gimplib.data import load_cohort

    folder = shared_data.joinpath(*FOLDER)
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    cohort = load_cohort(folder, require=("genes",), verbose=False)
    suggested = json.loads((folder / "suggested_split.json").read_text())
    val = suggested["val"]
    # the folder's train patients; its val patients halved into val and test
    return cohort, {"train": suggested["train"], "val": val[::2], "test": val[1::2]}


def test_real_table_shape_and_clipped_outliers(real):
    from gimplib.data import GeneTransform

    cohort, split = real
    assert cohort.genes.shape == (733, 1554) and len(split["train"]) == 644
    train = cohort.genes.loc[split["train"]]
    plain = GeneTransform(transform="none").fit(train)
    assert np.abs(plain.transform(cohort.genes)).max() > 20  # outliers of several thousand, standardised
    clipped = GeneTransform(transform="none", clip=5.0, order="cluster").fit(train)
    x = clipped.transform(cohort.genes)
    assert np.abs(x).max() <= 5.0 and x.shape == (733, 1554)
    assert sorted(clipped.genes) == sorted(cohort.genes.columns)
    # the co-expression order puts the squamous markers near each other
    pos = {g: clipped.genes.index(g) for g in ("KRT5", "KRT6A", "TP63") if g in clipped.genes}
    if len(pos) >= 2:
        assert max(pos.values()) - min(pos.values()) < 200, pos


@pytest.mark.slow
def test_real_groupmsa_and_linear_reference(real, tmp_path):
    from gimplib.train import train_gene_encoder
    from gimplib.train.linear import linear_gene_baseline

    cohort, split = real
    lin = linear_gene_baseline(cohort, split, gene_transform="none", clip=5.0)
    assert lin["test_accuracy"] >= 0.85 and lin["test_auc"] >= 0.9, lin
    res = train_gene_encoder(
        cohort, split, out_dir=tmp_path, gene_transform="none", clip=5.0, num_epochs=8, lr=1e-3, batch_size=32,
        encoder_kwargs=dict(fragment_size=32, num_groups=8, embed_dim=32, num_heads=4, fragment_proj="per_fragment",
                            gene_dropout=0.5),
        device="cpu", progress=False, n_boot=0,
    )
    assert res.metrics["val_accuracy"] >= 0.85 and res.metrics["test_auc"] >= 0.9, res.metrics
