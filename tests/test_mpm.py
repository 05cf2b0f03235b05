"""Masked patch modelling (MPM) wiring: context reaches the masked positions, the target does
not leak, the loss is Eq. 3, and padded / tiled / multi-slide windows behave alike (issue 19)."""

from __future__ import annotations

import math

import pytest
import torch

from _data_helpers import make_cohort
from gimplib.data import WindowDataset, load_cohort
from gimplib.losses import masked_l1
from gimplib.models.gimp import DECODER_OUT_INIT_SCALE, GiMP, mpm_reference_l1, random_patch_mask

D_IN = 8


def _mpm(**kw) -> GiMP:
    cfg = dict(in_dim=D_IN, embed_dim=16, num_heads=2, num_landmarks=4, decoder_hidden=32, dropout=0.0,
               use_triplet=False)
    return GiMP(**(cfg | kw))


def _segments(g: torch.Generator, *, b: int, n: int, seg: int) -> torch.Tensor:
    """(b, n, D_IN) windows that are piecewise constant along the sequence (segments of ``seg``):
    a common level (like CLAM's non-negative features) plus a zero-mean pattern per segment."""
    protos = torch.rand(b, n // seg, D_IN, generator=g)
    protos = protos - protos.mean(-1, keepdim=True)
    return 0.5 + 0.5 * protos.repeat_interleave(seg, dim=1)


def _train_and_score(seg: int, *, cut_context: bool = False, steps: int = 300) -> tuple[float, dict[str, float]]:
    """Train a tiny MPM model on fresh piecewise-constant windows (n = 32); its L1 per feature
    on held-out windows and the references of :func:`mpm_reference_l1` on the same masks."""
    torch.manual_seed(0)
    n = 32
    model = _mpm()
    g = torch.Generator().manual_seed(0)
    model.init_decoder_bias(_segments(g, b=64, n=n, seg=seg).mean((0, 1)))
    if cut_context:  # a deliberately broken wiring: every token sees only itself
        model.aggregator.encode = lambda x, mask=None, return_attn=False, need=None: type("Out", (), {"tokens": x})()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = model(_segments(g, b=8, n=n, seg=seg))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    x = _segments(torch.Generator().manual_seed(123), b=32, n=n, seg=seg)
    mpm = random_patch_mask(torch.ones(32, n, dtype=torch.bool), 0.5, torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred, _ = model.reconstruct(x, mpm_mask=mpm)
    refs = mpm_reference_l1(x, None, mpm, x.mean((0, 1)))
    return masked_l1(pred, x, mpm).item(), {k: v.item() for k, v in refs.items()}


# ------------------------------------------------------------------------- learning from context


def test_mpm_reconstructs_a_constant_window_from_its_visible_patches():
    # every masked patch equals the visible ones: a few hundred steps reach near-zero L1
    l1, refs = _train_and_score(seg=32)
    assert refs["window_mean"] < 1e-6 and refs["mean_patch"] > 0.08
    assert l1 < 0.15 * refs["mean_patch"], (l1, refs)


def test_mpm_uses_local_context_on_piecewise_constant_windows():
    # segments of 16: the window mean is wrong near half of the patches, the neighbours are right
    l1, refs = _train_and_score(seg=16)
    assert l1 < 0.5 * refs["window_mean"], (l1, refs)


def test_mpm_learning_test_fails_when_context_is_cut():
    # the control that shows the two tests above can fail: no context, no better than a constant
    l1, refs = _train_and_score(seg=32, cut_context=True, steps=100)
    assert l1 > 0.8 * refs["mean_patch"], (l1, refs)


# ------------------------------------------------------------------------- gradients: context in, no leak


def _grad_of_one_reconstruction(model: GiMP, feats: torch.Tensor, mask: torch.Tensor | None, mpm: torch.Tensor,
                                b: int, i: int) -> torch.Tensor:
    feats = feats.clone().requires_grad_(True)
    pred, _ = model.reconstruct(feats, mask, mpm_mask=mpm)
    pred[b, i].sum().backward()
    return feats.grad.abs().sum(-1)  # (b, n)


@pytest.mark.parametrize("train", [True, False])
def test_masked_reconstruction_sees_visible_inputs_and_never_its_own(train):
    torch.manual_seed(0)
    model = _mpm().train(train)
    feats = torch.rand(2, 24, D_IN)
    mpm = random_patch_mask(torch.ones(2, 24, dtype=torch.bool), 0.5, torch.Generator().manual_seed(0))
    i = int(mpm[1].nonzero()[3])
    grad = _grad_of_one_reconstruction(model, feats, None, mpm, 1, i)
    assert grad[1, i] == 0  # exactly: its own input is replaced by the mask token
    assert torch.all(grad[1][mpm[1]] == 0)  # no masked input reaches anything
    assert torch.all(grad[1][~mpm[1]] > 0)  # every visible patch of the window does
    # the other window of the batch only through the package's pseudo-inverse, whose initial
    # scale is taken over the whole batch (see gimplib.models.aggregator): negligibly
    assert grad[0].max() < 1e-6 * grad[1].max()


def test_padding_reaches_no_reconstruction_and_is_never_masked():
    torch.manual_seed(0)
    model = _mpm().eval()
    feats = torch.rand(2, 30, D_IN)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, 20:] = False
    mpm = random_patch_mask(valid, 0.5, torch.Generator().manual_seed(0))
    assert not (mpm & ~valid).any() and mpm[1].sum() == 10 and mpm[0].sum() == 15
    i = int(mpm[1].nonzero()[0])
    grad = _grad_of_one_reconstruction(model, feats, valid, mpm, 1, i)
    assert torch.all(grad[1, 20:] == 0) and grad[1, i] == 0 and torch.all(grad[1][valid[1] & ~mpm[1]] > 0)
    with pytest.raises(ValueError, match="padded positions"):
        model.reconstruct(feats, valid, mpm_mask=mpm | ~valid)


def test_padded_window_reconstructs_as_the_unpadded_window_alone():
    torch.manual_seed(0)
    model = _mpm().eval()
    short = torch.rand(1, 20, D_IN)
    padded = torch.cat([short, torch.full((1, 10, D_IN), 7.0)], dim=1)  # junk on the padding
    valid = torch.arange(30)[None] < 20
    mpm_short = random_patch_mask(torch.ones(1, 20, dtype=torch.bool), 0.5, torch.Generator().manual_seed(3))
    mpm_padded = torch.cat([mpm_short, torch.zeros(1, 10, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        alone, _ = model.reconstruct(short, mpm_mask=mpm_short)
        inside, _ = model.reconstruct(padded, valid, mpm_mask=mpm_padded)
        loss_alone = model(short, mpm_mask=mpm_short)["loss_rec"]
        loss_inside = model(padded, valid, mpm_mask=mpm_padded)["loss_rec"]
    torch.testing.assert_close(inside[:, :20], alone)
    torch.testing.assert_close(loss_inside, loss_alone)


@pytest.fixture(scope="module")
def window_cohort(tmp_path_factory):
    # case 0: two slides of 30 + 25 rows (one sequence of 55); case 1: a short bag of 12 rows
    root = make_cohort(tmp_path_factory.mktemp("mpm") / "cohort", n_cases=2, dim=D_IN, lengths=[30, 25, 12],
                       two_slides=(0,), genes=False)
    return load_cohort(root, verbose=False)


@pytest.mark.parametrize("tile_short", [True, False])
def test_tiled_padded_and_multi_slide_windows_behave_alike(window_cohort, tile_short):
    torch.manual_seed(0)
    model = _mpm().eval()
    ds = WindowDataset(window_cohort, list(window_cohort.cases.index), window_len=40, seed=0, tile_short=tile_short)
    items = [ds[0], ds[1]]
    slides = (items[0]["feats"][:, 0] // 10 % 10).unique()
    if len(slides) < 2:  # pick an epoch whose window of case 0 crosses the slide boundary
        for epoch in range(1, 50):
            ds.set_epoch(epoch)
            items[0] = ds[0]
            if len((items[0]["feats"][:, 0] // 10 % 10).unique()) == 2:
                break
    assert len((items[0]["feats"][:, 0] // 10 % 10).unique()) == 2  # rows of both slides of case 0
    feats = torch.stack([it["feats"] for it in items])
    valid = torch.stack([it["mask"] for it in items])
    assert bool(valid[1].all()) == tile_short  # the 12-row bag: repeated, or padded to 40
    mpm = random_patch_mask(valid, 0.5, torch.Generator().manual_seed(0))
    assert mpm.sum(1).tolist() == [20, 20 if tile_short else 6]
    for b in (0, 1):
        i = int(mpm[b].nonzero()[1])
        grad = _grad_of_one_reconstruction(model, feats, valid, mpm, b, i)
        assert grad[b, i] == 0 and torch.all(grad[b][mpm[b] | ~valid[b]] == 0)
        assert torch.all(grad[b][valid[b] & ~mpm[b]] > 0)
    # the padded row of the batch reconstructs as its valid rows alone (tiled rows: trivially)
    n1 = int(valid[1].sum())
    with torch.no_grad():
        batch_pred, _ = model.reconstruct(feats, valid, mpm_mask=mpm)
        alone, _ = model.reconstruct(feats[1:, :n1], mpm_mask=mpm[1:, :n1])
    torch.testing.assert_close(batch_pred[1:, :n1], alone, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- Eq. 3: the two reductions


def test_masked_l1_sum_is_eq3_averaged_over_windows():
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    pred = torch.zeros_like(target, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    loss = masked_l1(pred, target, mask, reduction="sum")
    # window 0: ||(1,2)||_1 + ||(5,6)||_1 = 14; window 1: ||(2,2)||_1 = 4; mean over the 2 windows
    assert loss.item() == pytest.approx((14 + 4) / 2)
    loss.backward()
    assert torch.all(pred.grad[0, 0] == -0.5) and torch.all(pred.grad[0, 1] == 0)
    mean = masked_l1(pred, target, mask, reduction="mean")
    assert mean.item() == pytest.approx(18 / (3 * 2))  # the same errors per masked value
    assert loss.item() == pytest.approx(mean.item() * mask.sum().item() * 2 / 2)


def test_masked_l1_rejects_unknown_reduction_and_is_zero_when_nothing_is_masked():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="reduction"):
        masked_l1(pred, pred.detach(), torch.ones(2, 3, dtype=torch.bool), reduction="none")
    loss = masked_l1(pred, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool), reduction="sum")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(pred.grad == 0)


def test_gimp_rec_reduction_scales_the_loss_and_rejects_unknown_values():
    torch.manual_seed(0)
    feats = torch.rand(3, 20, D_IN)
    mpm = random_patch_mask(torch.ones(3, 20, dtype=torch.bool), 0.5, torch.Generator().manual_seed(0))
    mean_model = _mpm(rec_reduction="mean").eval()
    sum_model = _mpm(rec_reduction="sum").eval()
    sum_model.load_state_dict(mean_model.state_dict())
    with torch.no_grad():
        mean = mean_model(feats, mpm_mask=mpm)["loss_rec"]
        total = sum_model(feats, mpm_mask=mpm)["loss_rec"]
    assert total.item() == pytest.approx(mean.item() * 10 * D_IN, rel=1e-5)  # 10 masked of 20 per window
    with pytest.raises(ValueError, match="rec_reduction"):
        _mpm(rec_reduction="median")


# ------------------------------------------------------------------------- references and initialisation


def test_mpm_reference_l1_hand_values():
    feats = torch.arange(6.0).reshape(1, 6, 1).expand(1, 6, 2).contiguous()
    mpm = torch.tensor([[True, False, True, True, False, True]])  # visible: rows 1 and 4
    refs = mpm_reference_l1(feats, None, mpm, torch.zeros(2))
    assert refs["window_mean"].item() == pytest.approx((2.5 + 0.5 + 0.5 + 2.5) / 4)  # visible mean 2.5
    assert refs["nearest"].item() == pytest.approx(1.0)  # rows 0, 2 <- 1; rows 3, 5 <- 4
    assert refs["mean_patch"].item() == pytest.approx((0 + 2 + 3 + 5) / 4)
    valid = torch.tensor([[True] * 5 + [False]])
    refs = mpm_reference_l1(feats, valid, mpm & valid)  # padding is neither visible nor scored
    assert set(refs) == {"window_mean", "nearest"}
    assert refs["nearest"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="visible"):
        mpm_reference_l1(feats, None, torch.ones(1, 6, dtype=torch.bool))


def test_init_decoder_bias_makes_the_first_reconstruction_the_mean_patch():
    torch.manual_seed(0)
    model = _mpm().eval()
    mean_patch = torch.linspace(0.1, 0.8, D_IN)
    model.init_decoder_bias(mean_patch)
    with torch.no_grad():
        pred, _ = model.reconstruct(torch.rand(2, 16, D_IN))
    # the output layer starts at DECODER_OUT_INIT_SCALE of PyTorch's default: nearly constant
    assert (pred - mean_patch).abs().max() < 5 * DECODER_OUT_INIT_SCALE
    with pytest.raises(ValueError, match="mean_patch"):
        model.init_decoder_bias(torch.zeros(D_IN + 1))
    with pytest.raises(ValueError, match="non-finite"):
        model.init_decoder_bias(torch.full((D_IN,), math.nan))
    with pytest.raises(RuntimeError, match="use_mpm"):
        _mpm(use_mpm=False, use_triplet=True).init_decoder_bias(mean_patch)


# ------------------------------------------------------------------------- the pretraining run


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pretraining_logs_mpm_l1_and_references_on_the_same_masks(smoke, tmp_path, reduction):
    from gimplib.train import load_checkpoint, pretrain_gimp

    cohort, split = smoke
    kw = dict(embed_dim=16, num_heads=2, num_landmarks=8, decoder_hidden=32, use_triplet=False, rec_reduction=reduction)
    run = pretrain_gimp(cohort, split, out_dir=tmp_path / "mpm", model_kwargs=kw, window_len=32, num_epochs=2,
                        batch_size=6, lr=1e-3, device="cpu", progress=False, n_boot=10)
    m = run.metrics
    for key in ("val_rec_l1", "val_ref_window_mean", "val_ref_nearest", "val_ref_mean_patch"):
        assert math.isfinite(m[key]) and m[key] > 0, key
    per_value = 1.0 if reduction == "mean" else 1.0 / (16 * cohort.feat_dim)  # 16 of 32 masked per window
    assert m["val_rec_l1"] == pytest.approx(m["val_loss_rec"] * per_value, rel=1e-5)
    # the references do not depend on the model: the same windows and masks every epoch
    hist = run.history
    assert hist["val_ref_window_mean"].nunique() == 1 and hist["val_ref_mean_patch"].nunique() == 1
    assert load_checkpoint(run.checkpoint)["config"]["model_kwargs"]["rec_reduction"] == reduction


# ------------------------------------------------------------------------- the masked-rows decoder (issue 14)


def _full_path_loss_rec(model: GiMP, feats: torch.Tensor, mask: torch.Tensor | None, mpm: torch.Tensor) -> torch.Tensor:
    """L_rec the way it was computed before issue 14: every position projected, the mask token
    put in with torch.where, the decoder run on every token, masked_l1 on the full (b, n, D)."""
    tokens = model.aggregator.embed(feats)
    tokens = torch.where(mpm[..., None], model.mask_token, tokens)
    pred = model.decoder(model.aggregator.encode(tokens, mask).tokens)
    return masked_l1(pred, feats, mpm, reduction=model.rec_reduction)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("padded", [False, True])
def test_masked_rows_decoder_gives_the_full_paths_loss_and_gradients(reduction, padded):
    """The training path projects only the visible rows and decodes only the masked ones; L_rec
    and every gradient equal those of the full path (decoder on every token) to 1e-6."""
    torch.manual_seed(0)
    model = _mpm(rec_reduction=reduction, num_landmarks=8).double().train()
    feats = torch.rand(3, 41, D_IN, dtype=torch.float64)
    valid = torch.ones(3, 41, dtype=torch.bool)
    if padded:
        valid[1, 30:] = False
        valid[2, 7:] = False
    mask = valid if padded else None
    mpm = random_patch_mask(valid, 0.5, torch.Generator().manual_seed(0))
    params = model.trainable_parameters()

    loss = model(feats, mask, mpm_mask=mpm)["loss_rec"]
    grads = torch.autograd.grad(loss, params)
    ref = _full_path_loss_rec(model, feats, mask, mpm)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6 * r.abs().max().item(), msg=name)


def test_masked_rows_decoder_matches_in_float32():
    torch.manual_seed(1)
    model = _mpm(num_landmarks=8).train()
    feats = torch.rand(2, 64, D_IN)
    mpm = random_patch_mask(torch.ones(2, 64, dtype=torch.bool), 0.5, torch.Generator().manual_seed(1))
    params = model.trainable_parameters()
    loss = model(feats, mpm_mask=mpm)["loss_rec"]
    ref = _full_path_loss_rec(model, feats, None, mpm)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6 * r.abs().max().item())


def test_masked_rows_decoder_with_nothing_masked_is_an_exact_zero():
    model = _mpm()
    out = model(torch.rand(2, 1, D_IN))  # floor(0.5 * 1) = 0 masked positions
    assert out["loss_rec"].item() == 0.0
    out["loss"].backward()  # a graph all the same
