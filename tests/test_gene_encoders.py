"""GroupMSA's fragment projections and gene dropout, the SNN's options, the linear reference
and the gene-encoder task's transform settings (tiny synthetic inputs; the real-data
comparison is in test_gene_encoders_real.py)."""

from __future__ import annotations

import pytest
import torch

from gimplib.models import GroupMSA, SNN


def _tiny(**kw) -> GroupMSA:
    base = dict(num_genes=50, fragment_size=8, num_groups=3, embed_dim=16, num_heads=2, num_classes=2, dropout=0.0)
    return GroupMSA(**{**base, **kw})


def test_per_fragment_projection_shapes_grads_and_padding():
    torch.manual_seed(0)
    model = _tiny(fragment_proj="per_fragment")
    assert model.fragment_weight.shape == (7, 8, 16) and not hasattr(model, "to_fragment")
    genes = torch.randn(4, 50)
    cls, attn = model(genes, return_attn=True)
    assert cls.shape == (4, 16) and attn.shape == (4, 3) and torch.isfinite(cls).all()
    model.classify(genes).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the 6 padded gene slots of the last fragment never see an input: their weights get no gradient
    assert torch.all(model.fragment_weight.grad[-1, 2:] == 0)
    assert model.embed_dim == 16


def test_per_fragment_equals_shared_when_all_fragments_share_weights():
    torch.manual_seed(0)
    shared = _tiny(fragment_proj="shared").eval()
    per = _tiny(fragment_proj="per_fragment").eval()
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("to_fragment")}
    state["fragment_weight"] = shared.to_fragment.weight.T.expand(7, -1, -1).clone()
    state["fragment_bias"] = shared.to_fragment.bias.expand(7, -1).clone()
    per.load_state_dict(state)
    genes = torch.randn(3, 50)
    with torch.no_grad():
        torch.testing.assert_close(per(genes), shared(genes), rtol=1e-5, atol=1e-5)


def test_per_fragment_gives_each_gene_its_own_weights():
    # gene 0 of fragment 0 and gene 0 of fragment 1: in the shared projection they move a
    # fragment's embedding along the same direction, in the per-fragment one they do not
    model = _tiny(fragment_proj="per_fragment")
    assert not torch.allclose(model.fragment_weight[0, 0], model.fragment_weight[1, 0])


def test_gene_dropout_only_in_training():
    torch.manual_seed(0)
    model = _tiny(gene_dropout=0.5, fragment_proj="per_fragment")
    genes = torch.randn(2, 50)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(genes), model(genes))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(genes), model(genes))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(fragment_proj="dense"), "fragment_proj must be 'per_fragment' or 'shared'"),
        (dict(gene_dropout=1.0), r"gene_dropout must be in \[0, 1\)"),
        (dict(gene_dropout=-0.1), r"gene_dropout must be in \[0, 1\)"),
    ],
)
def test_groupmsa_bad_options_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kw)


def test_per_fragment_at_60480_genes_stays_small():
    model = GroupMSA(num_genes=60_480, embed_dim=32, num_heads=2, num_classes=2, fragment_proj="per_fragment")
    assert model.fragment_weight.numel() == 237 * 256 * 32  # one weight per gene and output, like an MLP's first layer
    logits = model.classify(torch.randn(2, 60_480))
    logits.sum().backward()
    assert logits.shape == (2, 2) and torch.isfinite(model.fragment_weight.grad).all()


def test_snn_gene_dropout_only_in_training():
    torch.manual_seed(0)
    model = SNN(num_genes=40, embed_dim=8, hidden=(16,), num_classes=2, dropout=0.0, gene_dropout=0.5)
    genes = torch.randn(3, 40)
    assert model(genes).shape == (3, 8)
    with torch.no_grad():
        assert not torch.allclose(model(genes), model(genes))
        model.eval()
        torch.testing.assert_close(model(genes), model(genes))
    with pytest.raises(ValueError, match=r"gene_dropout must be in \[0, 1\)"):
        SNN(num_genes=40, gene_dropout=1.5)


# --------------------------------------------------------------------------- task + linear reference


def test_train_gene_encoder_stores_clip_and_order(smoke, tmp_path):
    from gimplib.train import load_gene_transform, train_gene_encoder

    cohort, split = smoke
    kw = dict(encoder_kwargs=dict(fragment_size=16, num_groups=2, embed_dim=8, num_heads=2, fragment_proj="per_fragment"),
              num_epochs=1, batch_size=8, progress=False, n_boot=0, device="cpu")
    res = train_gene_encoder(cohort, split, out_dir=tmp_path / "a", clip=3.0, gene_order="random", seed=2, **kw)
    gt = load_gene_transform(res.checkpoint)
    assert (gt.clip, gt.order, gt.order_seed) == (3.0, "random", 2)
    assert sorted(gt.genes) == sorted(cohort.genes.columns) and gt.genes != list(cohort.genes.columns)
    assert abs(gt.transform(cohort.genes)).max() <= 3.0
    assert res.config["gene_transform"]["clip"] == 3.0
    # without the new settings the stored config keeps its old keys (older run folders stay reusable)
    plain = train_gene_encoder(cohort, split, out_dir=tmp_path / "b", **kw)
    assert set(plain.config["gene_transform"]) == {"transform", "standardize", "top_k_var"}
    with pytest.raises(ValueError, match="order must be one of"):
        train_gene_encoder(cohort, split, out_dir=tmp_path / "c", gene_order="chromosome", **kw)
    assert not (tmp_path / "c").exists()


def test_linear_gene_baseline_picks_C_on_val(smoke):
    from gimplib.train.linear import linear_gene_baseline

    cohort, split = smoke
    out = linear_gene_baseline(cohort, split, Cs=(0.01, 1.0), clip=5.0)
    assert out["C"] in (0.01, 1.0)
    for key in ("val_accuracy", "val_auc", "test_accuracy", "test_auc"):
        assert 0.0 <= out[key] <= 1.0, key
    no_val = linear_gene_baseline(cohort, {"train": split["train"], "test": split["test"]}, Cs=(0.01, 0.1, 1.0))
    assert no_val["C"] == 0.1 and "val_accuracy" not in no_val
    with pytest.raises(ValueError, match="Cs must be positive"):
        linear_gene_baseline(cohort, split, Cs=(0.0,))
