"""Contract and learning tests for every compared system (gimplib.models.baselines).

Tiny configurations on CPU: shapes, every parameter gets a gradient, no NaN, padding
changes nothing, and each system learns a small synthetic MIL problem beyond chance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gimplib.models.baselines import (
    BASELINES,
    BLOCKS,
    SYSTEMS,
    GatedBilinearFusion,
    build_baseline,
    register_system,
    smooth_top1_svm_loss,
)
from gimplib.models.baselines.mcat import contiguous_groups

D, G, C = 16, 12, 2


# every registered classifier, built from its record's tiny configuration
CLASSIFIERS = sorted(name for name, system in SYSTEMS.items() if system.block != "pretraining")


def make(name: str, **over) -> torch.nn.Module:
    cfg = dict(in_dim=D, num_classes=C, **SYSTEMS[name].tiny, **over)
    if SYSTEMS[name].reads_genes:
        cfg["num_genes"] = G
    return build_baseline(name, **cfg)


def genes_for(name: str, b: int, gen: torch.Generator) -> torch.Tensor | None:
    return torch.randn(b, G, generator=gen) if SYSTEMS[name].reads_genes else None


def make_bags(num_bags: int, *, seed: int, n_max: int = 24, n_min: int = 12, n_key: int = 3):
    """Bags of noise patches; a bag of class c also holds ``n_key`` noisy copies of prototype c.

    Bags have different sizes, so batches are padded (mask False) with junk values that a
    model honouring the mask never sees.
    """
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(C, D, generator=torch.Generator().manual_seed(1234))
    protos = 3.0 * protos / protos.norm(dim=-1, keepdim=True)
    y = torch.arange(num_bags) % C
    feats = 5.0 * torch.randn(num_bags, n_max, D, generator=gen)  # junk in the padding
    mask = torch.zeros(num_bags, n_max, dtype=torch.bool)
    for i in range(num_bags):
        n = int(torch.randint(n_min, n_max + 1, (1,), generator=gen))
        feats[i, :n] = torch.randn(n, D, generator=gen)
        key = torch.randperm(n, generator=gen)[:n_key]
        feats[i, key] = protos[y[i]] + 0.3 * torch.randn(n_key, D, generator=gen)
        mask[i, :n] = True
    return feats, mask, y, gen


# ---------------------------------------------------------------- registry


def test_registry_records_are_complete():
    from pathlib import Path

    bib = (Path(__file__).resolve().parents[1] / "book" / "references.bib").read_text()
    assert set(BASELINES) == set(SYSTEMS) and set(CLASSIFIERS) | set(PRETRAINERS) == set(SYSTEMS)
    for name, system in SYSTEMS.items():
        assert system.name == name and system.block in BLOCKS
        assert BASELINES[name] is system.constructor
        assert f"{{{system.cite}," in bib, f"{name}: cite key {system.cite!r} is not in book/references.bib"
        assert system.trainer == ("pretrain_baseline" if system.block == "pretraining" else "train_baseline")
        widths = system.widths(embed_dim=32, depth=1, num_heads=2, num_landmarks=8)
        assert isinstance(widths, dict) and system.recipes


def test_registration_requires_a_tiny_configuration_and_a_known_block():
    with pytest.raises(TypeError, match="tiny"):
        register_system("nope", block="pathology", cite="ilse2018abmil")
    with pytest.raises(ValueError, match="unknown block 'pretrain'"):
        register_system("nope", block="pretrain", tiny={}, cite="x")
    with pytest.raises(ValueError, match="already registered"):
        register_system("abmil", block="pathology", tiny={}, cite="x")
    with pytest.raises(ValueError, match="lower case"):
        register_system("CLAM-XL", block="pathology", tiny={}, cite="x")
    with pytest.raises(ValueError, match="cite"):
        register_system("nope", block="pathology", tiny={}, cite="")
    assert "nope" not in SYSTEMS


def test_build_baseline_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="unknown baseline 'abmill'.*abmil"):
        build_baseline("abmill")
    assert type(build_baseline("CLAM-SB", in_dim=D, **SYSTEMS["clam_sb"].tiny)).__name__ == "CLAM_SB"


# ---------------------------------------------------------------- contract


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_contract_shapes_gradients_no_nan(name):
    torch.manual_seed(0)
    model = make(name)
    feats, mask, y, gen = make_bags(4, seed=1)
    genes = genes_for(name, 4, gen)
    out = model(feats, mask, genes, y=y)
    assert out["logits"].shape == (4, C)
    assert out["loss_aux"].ndim == 0
    if out["attn"] is not None:
        assert out["attn"].shape == (4, feats.shape[1])
        assert torch.allclose(out["attn"].sum(-1), torch.ones(4), atol=1e-5)
    loss = F.cross_entropy(out["logits"], y) + out["loss_aux"]
    assert torch.isfinite(loss)
    loss.backward()
    # with both classes in the batch and the label given, every parameter is trained
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradient for {bad}"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_padding_changes_nothing(name):
    torch.manual_seed(0)
    model = make(name).eval()
    feats, mask, y, gen = make_bags(3, seed=2)
    genes = genes_for(name, 3, gen)
    with torch.no_grad():
        batched = model(feats, mask, genes)
        for i in range(3):
            n = int(mask[i].sum())
            alone = model(feats[i : i + 1, :n], None, None if genes is None else genes[i : i + 1])
            torch.testing.assert_close(batched["logits"][i], alone["logits"][0], rtol=1e-4, atol=1e-5)
            if batched["attn"] is not None:
                assert float(batched["attn"][i, n:].abs().sum()) == 0.0
                torch.testing.assert_close(batched["attn"][i, :n], alone["attn"][0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_bad_inputs_name_the_system(name):
    model = make(name)
    system = type(model).__name__
    with pytest.raises(ValueError, match=rf"{system}.*\(b, n, D\)"):
        model(torch.randn(5, D))
    with pytest.raises(ValueError, match=rf"{system}.*in_dim={D}"):
        model(torch.randn(1, 5, D + 1), genes=torch.randn(1, G))
    with pytest.raises(ValueError, match=rf"{system}.*no valid patch"):
        model(torch.randn(2, 5, D), torch.tensor([[True] * 5, [False] * 5]), genes=torch.randn(2, G))
    if SYSTEMS[name].reads_genes:
        with pytest.raises(ValueError, match=rf"{system} needs genes"):
            model(torch.randn(1, 5, D))
        with pytest.raises(ValueError, match=rf"num_genes={G}"):
            model(torch.randn(1, 5, D), genes=torch.randn(1, G + 1))


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_learns_synthetic_mil_beyond_chance(name):
    """60 steps on bags whose class lives in 3 of 12-24 patches; genes are pure noise.

    TransMIL runs padded bags one by one (exactness, see its module), which is slow on CPU,
    so it trains on equal-sized bags here; its padding path is covered above.
    """
    torch.manual_seed(0)
    model = make(name)
    n_min = 24 if name == "transmil" else 12
    feats, mask, y, gen = make_bags(96, seed=3, n_min=n_min)
    genes = genes_for(name, 96, gen)
    test_feats, test_mask, test_y, test_gen = make_bags(64, seed=4, n_min=n_min)
    test_genes = genes_for(name, 64, test_gen)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for step in range(60):
        idx = torch.randperm(96, generator=gen)[:16]
        out = model(feats[idx], mask[idx], None if genes is None else genes[idx], y=y[idx])
        loss = F.cross_entropy(out["logits"], y[idx]) + out["loss_aux"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), f"{name}: loss became {loss} at step {step}"
    model.eval()
    with torch.no_grad():
        acc = (model(test_feats, test_mask, test_genes)["logits"].argmax(-1) == test_y).float().mean().item()
    assert acc >= 0.75, f"{name}: held-out accuracy {acc:.2f} after 60 steps (chance 0.5)"


# ---------------------------------------------------------------- system-specific


def test_smooth_top1_svm_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    y = torch.tensor([0, 0])
    # row 0: log(e^{1+0} + e^{2+1}) - 1 ; row 1: log(e^{0.5} + e^{-1+1}) - 0.5
    expected = 0.5 * ((math.log(math.e + math.e**3) - 1.0) + (math.log(math.exp(0.5) + 1.0) - 0.5))
    assert smooth_top1_svm_loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    # alpha = 0, tau = 1 is the cross-entropy
    assert smooth_top1_svm_loss(logits, y, alpha=0.0).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_clam_instance_loss_needs_the_label_and_is_weighted(name):
    torch.manual_seed(0)
    model = make(name, bag_weight=0.7)
    feats, mask, y, _ = make_bags(2, seed=5)
    assert model(feats, mask)["loss_aux"].item() == 0.0
    out = model(feats, mask, y=y)
    assert out["loss_inst"].item() > 0.0
    assert out["loss_aux"].item() == pytest.approx(out["loss_inst"].item() * 0.3 / 0.7, rel=1e-5)


def test_clam_without_subtyping_leaves_absent_class_instance_classifier_untrained():
    torch.manual_seed(0)
    model = make("clam_sb", subtyping=False)
    feats, mask, _, _ = make_bags(2, seed=6)
    out = model(feats, mask, y=torch.tensor([1, 1]))
    (out["logits"].sum() + out["loss_aux"]).backward()
    assert model.instance_classifiers[0].weight.grad is None
    assert model.instance_classifiers[1].weight.grad is not None


def test_dsmil_aux_is_max_instance_cross_entropy():
    torch.manual_seed(0)
    model = make("dsmil", max_loss_weight=0.5)
    feats, mask, y, _ = make_bags(4, seed=7)
    out = model(feats, mask, y=y)
    inst = model.instance_classifier(feats).masked_fill(~mask[..., None], float("-inf")).amax(dim=1)
    torch.testing.assert_close(out["logits_max"], inst)
    assert out["loss_aux"].item() == pytest.approx(0.5 * F.cross_entropy(inst, y).item(), rel=1e-5)


def test_dsmil_values_are_features_unless_projected():
    """The reference code's default (passing_v=False) attends over the features themselves."""
    torch.manual_seed(0)
    plain, projected = make("dsmil").eval(), make("dsmil", value_projection=True).eval()
    assert isinstance(plain.value, torch.nn.Identity)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(projected) - count(plain) == D * D + D
    feats, mask, y, _ = make_bags(2, seed=3)
    for model in (plain, projected):
        out = model(feats, mask, y=y)
        assert torch.isfinite(out["logits"]).all() and out["attn"].shape == mask.shape


def test_transmil_handles_any_bag_size():
    model = make("transmil").eval()
    for n in (1, 2, 3, 5, 10, 17):
        assert model(torch.randn(2, n, D))["logits"].shape == (2, C)


def test_mcat_groups_cover_all_genes():
    assert contiguous_groups(10, 3) == [4, 3, 3]
    assert sum(contiguous_groups(60483, 6)) == 60483
    with pytest.raises(ValueError, match="num_groups"):
        contiguous_groups(3, 5)


def test_bilinear_fusion_shapes_and_skip():
    x1, x2 = torch.randn(3, 16), torch.randn(3, 8)
    # Pathomic style: the skip carries the gated outputs with their appended 1s
    fusion = GatedBilinearFusion(dim1=16, dim2=8, scale1=4, scale2=2, fused_dim=6, hidden=10, skip=True)
    assert fusion.encoder1[0].in_features == (16 // 4 + 1) * (8 // 2 + 1)
    assert fusion.encoder2[0].in_features == 10 + (4 + 1) + (4 + 1)
    assert isinstance(fusion.unimodal1.gate, torch.nn.Bilinear)
    assert fusion(x1, x2).shape == (3, 6)
    # PORPOISE style: the skip carries the raw inputs; the gate is a Linear on cat(x1, x2)
    fusion = GatedBilinearFusion(dim1=16, dim2=8, scale1=4, scale2=2, fused_dim=6, hidden=10, skip=True,
                                 use_bilinear=False, style="porpoise")
    assert fusion.encoder2[0].in_features == 10 + 16 + 8
    assert fusion.unimodal1.gate.in_features == 16 + 8
    assert not any(isinstance(m, torch.nn.Dropout) for m in (*fusion.encoder1, *fusion.encoder2))
    assert fusion(x1, x2).shape == (3, 6)


def test_ungated_branch_semantics_follow_each_official_code():
    x1, x2 = torch.randn(3, 8), torch.randn(3, 8)
    pathomic = GatedBilinearFusion(dim1=8, dim2=8, gate1=False).eval()
    assert pathomic.unimodal1.proj is None and pathomic.unimodal1.gate is None
    torch.testing.assert_close(pathomic.unimodal1(x1, x1, x2), pathomic.unimodal1.out(x1))
    porpoise = GatedBilinearFusion(dim1=8, dim2=8, scale1=2, gate1=False, style="porpoise").eval()
    torch.testing.assert_close(porpoise.unimodal1(x1, x1, x2), porpoise.unimodal1.out(porpoise.unimodal1.proj(x1)))
    with pytest.raises(ValueError, match="scale1 must be 1"):
        GatedBilinearFusion(dim1=8, dim2=8, scale1=2, gate1=False)
    with pytest.raises(ValueError, match="style"):
        GatedBilinearFusion(dim1=8, dim2=8, style="lrb")


def test_default_widths_are_the_official_ones():
    porpoise = build_baseline("porpoise", num_genes=G)
    assert porpoise.path_encoder[0].out_features == 512 and porpoise.path_rho[0].out_features == 256
    assert porpoise.path_attention.V[0].out_features == 256 and porpoise.input_dropout.p == 0.1
    assert porpoise.fusion.encoder2[0].in_features == 256 + 256 + 256  # skip of the raw embeddings
    assert porpoise.fusion.unimodal1.gate.in_features == 512  # Linear on cat(h_path, h_omic)
    pathomic = build_baseline("pathomic", num_genes=G)
    assert pathomic.fusion.out_dim == 64 and pathomic.fusion.encoder2[0].in_features == 64  # no skip
    assert isinstance(pathomic.fusion.unimodal1.gate, torch.nn.Bilinear)
    transmil = build_baseline("transmil")
    assert 0.8 < transmil.cls_token.std().item() < 1.2  # the reference code's torch.randn


def test_mcat_returns_the_raw_co_attention():
    torch.manual_seed(0)
    model = make("mcat").eval()
    feats, mask, _, gen = make_bags(2, seed=8)
    out = model(feats, mask, genes_for("mcat", 2, gen))
    assert out["coattn"].shape == (2, 3, feats.shape[1])
    assert torch.isinf(out["coattn"][~mask[:, None, :].expand_as(out["coattn"])]).all()
    torch.testing.assert_close(out["attn"], out["coattn"].softmax(dim=-1).mean(dim=1))
    with pytest.raises(ValueError, match="group_sizes"):
        make("mcat", group_sizes=(5, 5))


def test_smooth_top1_svm_hard_switch():
    logits = torch.tensor([[0.0, 10.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    # row 0: gap 10 >= log(1000): hard loss max(0 + 0, 10 + 1) - 0 = 11; row 1 stays smooth
    smooth_row1 = math.log(1.0 + math.exp(2.0))
    expected = 0.5 * (11.0 + smooth_row1)
    assert smooth_top1_svm_loss(logits, y, hard_thresh=1e3).item() == pytest.approx(expected, rel=1e-6)
    assert smooth_top1_svm_loss(logits, y).item() == pytest.approx(0.5 * (math.log(1 + math.exp(11.0)) + smooth_row1), rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_runs_on_cuda(name):
    dev = torch.device("cuda")
    model = make(name).to(dev)
    feats, mask, y, gen = make_bags(4, seed=8)
    genes = genes_for(name, 4, gen)
    out = model(feats.to(dev), mask.to(dev), None if genes is None else genes.to(dev), y=y.to(dev))
    loss = F.cross_entropy(out["logits"], y.to(dev)) + out["loss_aux"]
    loss.backward()
    assert out["logits"].device.type == "cuda" and torch.isfinite(loss)


# ---------------------------------------------------------------- image-gene pretraining baselines

from gimplib.models import GiMPClassifier  # noqa: E402
from gimplib.models.baselines import MGCAStyle, sinkhorn_knopp  # noqa: E402
from gimplib.models.baselines.refers import split_views  # noqa: E402

GP = 24  # genes of the pretraining tests
PRETRAINERS = sorted(name for name, system in SYSTEMS.items() if system.block == "pretraining")
TERMS = {
    "biovil": {"loss_global": 1.0, "loss_mgm": 1.0},
    "mgca": {"loss_instance": 1.0, "loss_token": 0.7, "loss_proto": 0.5},
    "refers": {"loss_gen": 1.0, "loss_con": 1.0},
}


def make_pretrainer(name: str, **over):
    return build_baseline(name, **{"in_dim": D, "num_genes": GP, **SYSTEMS[name].tiny, **over})


def make_pairs(num: int, *, seed: int, n_min: int = 24, n_key: int = 8):
    """Bags as in :func:`make_bags` (8 class patches) plus expression profiles: noise + a class shift."""
    feats, mask, y, gen = make_bags(num, seed=seed, n_min=n_min, n_key=n_key)
    signature = torch.where(torch.arange(GP) % 2 == 0, 1.0, -1.0)
    genes = torch.randn(num, GP, generator=gen) + 1.0 * (2.0 * y[:, None].float() - 1.0) * signature
    return feats, mask, genes, y


def test_the_pretraining_block_is_the_three_image_gene_methods():
    assert PRETRAINERS == ["biovil", "mgca", "refers"]


@pytest.mark.parametrize("name", PRETRAINERS)
def test_pretrain_step_contract(name):
    torch.manual_seed(0)
    model = make_pretrainer(name)
    feats, mask, genes, _ = make_pairs(4, seed=11, n_min=12)
    out = model.pretrain_step(feats, mask, genes)
    assert set(out) == {"loss", *TERMS[name]}
    for key, value in out.items():
        assert value.ndim == 0 and torch.isfinite(value), f"{name}: {key} = {value}"
    expected = sum(w * out[k] for k, w in TERMS[name].items())
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(out[k].item() > 0 for k in TERMS[name])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", PRETRAINERS)
def test_pretrain_padding_changes_nothing(name):
    torch.manual_seed(0)
    model = make_pretrainer(name).eval()
    feats, mask, genes, _ = make_pairs(3, seed=12, n_min=12)
    assert not mask.all()
    other = feats.clone()
    other[~mask] = 100.0 * torch.randn(int((~mask).sum()), D)
    with torch.no_grad():
        a = model.pretrain_step(feats, mask, genes, generator=torch.Generator().manual_seed(0))
        b = model.pretrain_step(other, mask, genes, generator=torch.Generator().manual_seed(0))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PRETRAINERS)
def test_pretraining_aligns_the_modalities_beyond_chance(name):
    """After 40 steps, an image's nearest expression profile (held-out pairs) is of its class."""
    torch.manual_seed(0)
    model = make_pretrainer(name)
    feats, mask, genes, _ = make_pairs(96, seed=13)
    test_feats, test_mask, test_genes, test_y = make_pairs(32, seed=14)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for step in range(40):
        idx = torch.randperm(96, generator=gen)[:16]
        loss = model.pretrain_step(feats[idx], mask[idx], genes[idx], generator=gen)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), f"{name}: loss became {loss} at step {step}"
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.embed_image(test_feats, test_mask), dim=-1)
        ge = F.normalize(model.embed_genes(test_genes), dim=-1)
    nearest = (img @ ge.T).argmax(dim=1)
    agreement = (test_y[nearest] == test_y).float().mean().item()
    assert agreement >= 0.75, f"{name}: image->gene retrieval class agreement {agreement:.2f} (chance 0.5)"


@pytest.mark.parametrize("name", PRETRAINERS)
def test_build_classifier_copies_the_pretrained_aggregator(name):
    model = make_pretrainer(name)
    clf = model.build_classifier(num_classes=3)
    assert isinstance(clf, GiMPClassifier) and clf.aggregator is not model.aggregator
    for (k, a), (_, b) in zip(model.aggregator.state_dict().items(), clf.aggregator.state_dict().items()):
        torch.testing.assert_close(a, b, msg=f"{name}: {k} differs")
    assert clf.gene_encoder is not model.gene_encoder  # image + genes, like GiMP's fine-tuning
    assert clf.head.net[0].in_features == model.aggregator.embed_dim + model.gene_encoder.embed_dim
    feats, mask, genes, _ = make_pairs(2, seed=15)
    assert clf(feats, mask, genes=genes).shape == (2, 3)
    # the engine can also load these checkpoints the GiMP way
    again = GiMPClassifier.from_pretrained(model.state_dict(), num_classes=2, num_landmarks=4)
    torch.testing.assert_close(again.aggregator.proj.weight, model.aggregator.proj.weight)


@pytest.mark.parametrize("name", PRETRAINERS)
def test_pretrainer_bad_inputs(name):
    model = make_pretrainer(name)
    system = type(model).__name__
    with pytest.raises(ValueError, match=rf"{system} needs genes"):
        model.pretrain_step(torch.randn(2, 5, D), None, None)
    with pytest.raises(ValueError, match=rf"{system}: genes must be \(b, G\) = \(2, {GP}\)"):
        model.pretrain_step(torch.randn(2, 5, D), None, torch.randn(2, GP + 1))
    with pytest.raises(ValueError, match=rf"{system}: give num_genes"):
        build_baseline(name, in_dim=D)


def test_frozen_gene_encoder_stays_frozen():
    model = make_pretrainer("refers", freeze_gene_encoder=True).train()
    assert not model.gene_encoder.training
    feats, mask, genes, _ = make_pairs(4, seed=16)
    model.pretrain_step(feats, mask, genes)["loss"].backward()
    assert all(p.grad is None for p in model.gene_encoder.parameters())
    assert all(p.grad is not None for p in model.aggregator.parameters())
    with pytest.raises(ValueError, match="mgm_weight=0"):
        make_pretrainer("biovil", freeze_gene_encoder=True)


def test_sinkhorn_balances_assignments():
    q = sinkhorn_knopp(torch.randn(8, 4))
    torch.testing.assert_close(q.sum(dim=1), torch.ones(8))
    # every sample prefers prototype 0 equally: the balanced assignment is uniform
    q = sinkhorn_knopp(torch.tensor([[5.0, 0.0, 0.0, 0.0]]).repeat(8, 1))
    torch.testing.assert_close(q, torch.full((8, 4), 0.25), rtol=1e-4, atol=1e-4)


def test_mgca_prototypes_stay_normalised():
    model = make_pretrainer("mgca")
    with torch.no_grad():
        model.prototypes.weight.mul_(3.0)
    feats, mask, genes, _ = make_pairs(4, seed=17)
    model.pretrain_step(feats, mask, genes)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=-1), torch.ones(4))
    assert isinstance(model, MGCAStyle)


def test_refers_views():
    feats = torch.randn(2, 7, D)
    mask = torch.ones(2, 7, dtype=torch.bool)
    views, vmask = split_views(feats, mask, 3)
    assert views.shape == (2, 3, 3, D) and vmask.sum().item() == 14 and not vmask[:, -1, -1].any()
    torch.testing.assert_close(views[:, 1, 0], feats[:, 3])
    model = make_pretrainer("refers")
    g = torch.randn(2, GP)
    assert torch.isfinite(model.pretrain_step(torch.randn(2, 3, 5, D), None, g)["loss"])
    bad = torch.ones(2, 3, 5, dtype=torch.bool)
    bad[1] = False
    with pytest.raises(ValueError, match=r"case\(s\) \[1\].*no valid patch"):
        model.pretrain_step(torch.randn(2, 3, 5, D), bad, g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", PRETRAINERS)
def test_pretrainers_run_on_cuda(name):
    dev = torch.device("cuda")
    model = make_pretrainer(name).to(dev)
    feats, mask, genes, _ = make_pairs(4, seed=18, n_min=12)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model.pretrain_step(feats.to(dev), mask.to(dev), genes.to(dev), generator=gen)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].device.type == "cuda"
    clf = model.build_classifier()
    assert clf(feats.to(dev), mask.to(dev), genes=genes.to(dev)).device.type == "cuda"


def test_every_system_runs_under_bf16_autocast():
    """The engine's ``amp`` setting wraps steps in autocast; no system may trip over dtypes."""
    for name in CLASSIFIERS:
        model = make(name)
        feats, mask, y, gen = make_bags(4, seed=19)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(feats, mask, genes_for(name, 4, gen), y=y)
            loss = F.cross_entropy(out["logits"].float(), y) + out["loss_aux"]
        loss.backward()
        assert torch.isfinite(loss), name
    for name in PRETRAINERS:
        model = make_pretrainer(name)
        feats, mask, genes, _ = make_pairs(4, seed=20, n_min=12)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.pretrain_step(feats, mask, genes)["loss"]
        loss.backward()
        assert torch.isfinite(loss), name
