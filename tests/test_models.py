"""Contract tests on tiny configs: shapes, gradients, NaNs, masks, frozen encoders."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from nystrom_attention import NystromAttention

from gimplib.models import (
    SNN,
    GiMP,
    GiMPClassifier,
    GroupMSA,
    MLPHead,
    NystromLayer,
    PatchAggregator,
    aggregator_state_dict,
    random_patch_mask,
)
from gimplib.models.aggregator import nystrom_attention_valid

D_IN = 12


def _agg(**kw) -> PatchAggregator:
    cfg = dict(in_dim=D_IN, embed_dim=16, num_heads=2, num_landmarks=4, dropout=0.0)
    return PatchAggregator(**(cfg | kw))


def _assert_all_grads(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    for name, p in module.named_parameters():
        if name.startswith(skip):
            continue
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


# ---------------------------------------------------------------- gene encoders


def test_groupmsa_shapes_grads_attention():
    torch.manual_seed(0)
    model = GroupMSA(num_genes=50, fragment_size=8, num_groups=3, embed_dim=16, num_heads=2, num_classes=2, dropout=0.0)
    assert (model.num_fragments, model.group_size) == (7, 3)  # 7 fragments, last one padded; 2 empty slots
    genes = torch.randn(4, 50)
    cls, attn = model(genes, return_attn=True)
    assert cls.shape == (4, 16) and attn.shape == (4, 3)
    assert torch.all(attn > 0) and torch.all(attn.sum(1) < 1)
    model.classify(genes).logsumexp(-1).sum().backward()
    _assert_all_grads(model)


def test_groupmsa_group_ranges_cover_the_genes_and_attribute_correctly():
    model = GroupMSA(num_genes=50, fragment_size=8, num_groups=3, embed_dim=16, num_heads=2, dropout=0.0).eval()
    ranges = model.group_gene_ranges()
    assert ranges == [(0, 24), (24, 48), (48, 50)]
    # a group's gene range is exactly what feeds its group token: changing genes outside
    # group 0 leaves group 0's intra-group output unchanged. Checked through the CLS:
    # changing only group 2's genes must change the output (the 2 genes are not dropped).
    g = torch.randn(1, 50)
    g2 = g.clone()
    g2[0, 48:] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(g), model(g2))


def test_groupmsa_empty_slots_are_masked():
    # with 7 fragments in 3 groups of 3, slots 8 and 9 are padding: the key mask hides them
    model = GroupMSA(num_genes=50, fragment_size=8, num_groups=3, embed_dim=16, num_heads=2, dropout=0.0).eval()
    assert model.slot_mask.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]
    captured = {}

    def keep_attention(module, inputs, output):
        captured["attn"] = output[1]

    handle = model.intra[0].register_forward_hook(keep_attention)
    with torch.no_grad():
        model(torch.randn(2, 50))
    handle.remove()
    attn = rearrange(captured["attn"], "(b g) h i j -> b g h i j", g=3)
    assert torch.all(attn[:, 2, :, :, 2:] == 0)  # nobody attends to the empty slots
    assert torch.all(attn[:, :2] > 0)


def test_groupmsa_wrong_gene_count_is_named():
    model = GroupMSA(num_genes=50, fragment_size=8, num_groups=3, embed_dim=16, num_heads=2)
    with pytest.raises(AssertionError, match="built for 50 genes, got 49"):
        model(torch.randn(2, 49))
    with pytest.raises(RuntimeError, match="num_classes"):
        model.classify(torch.randn(2, 50))


def test_groupmsa_small_gene_count_with_defaults():
    model = GroupMSA(num_genes=1000)  # 4 fragments, 16 groups: 12 groups carry only their token
    cls, attn = model(torch.randn(2, 1000), return_attn=True)
    assert cls.shape == (2, 256) and attn.shape == (2, 16) and torch.isfinite(cls).all()


def test_groupmsa_smoke_at_60480_genes():
    model = GroupMSA(num_genes=60_480, embed_dim=32, num_heads=2, num_classes=2)
    assert (model.num_fragments, model.group_size) == (237, 15)
    logits = model.classify(torch.randn(2, 60_480))
    logits.sum().backward()
    assert logits.shape == (2, 2) and torch.isfinite(model.to_fragment.weight.grad).all()


def test_snn_shapes_grads():
    torch.manual_seed(0)
    model = SNN(num_genes=40, embed_dim=8, hidden=(16, 16), num_classes=3)
    cls, attn = model(torch.randn(5, 40), return_attn=True)
    assert cls.shape == (5, 8) and attn is None
    model.classify(torch.randn(5, 40)).logsumexp(-1).sum().backward()
    _assert_all_grads(model)


def test_mlp_head():
    head = MLPHead(in_dim=8, num_classes=3, hidden=4, dropout=0.0)
    assert head(torch.randn(2, 8)).shape == (2, 3)
    assert MLPHead(in_dim=8, num_classes=3, hidden=0)(torch.randn(2, 8)).shape == (2, 3)


# ---------------------------------------------------------------- aggregator


def test_aggregator_shapes_grads_no_nan():
    torch.manual_seed(0)
    agg = _agg()
    out = agg(torch.randn(2, 23, D_IN), return_attn=True)
    assert out.cls.shape == (2, 16) and out.tokens.shape == (2, 23, 16) and out.attn.shape == (2, 23)
    assert torch.isfinite(out.tokens).all()
    (out.cls.pow(2).sum() + out.tokens.pow(2).sum()).backward()
    _assert_all_grads(agg)


@pytest.mark.parametrize("grad", [True, False])
def test_aggregator_padding_changes_nothing(grad):
    """Junk rows under mask=False leave CLS, tokens and attention of the valid rows unchanged."""
    torch.manual_seed(0)
    agg = _agg().eval()
    feats = torch.randn(2, 30, D_IN)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 19:] = False
    junk = feats.clone()
    junk[1, 19:] = 1e3 * torch.randn(11, D_IN)
    with torch.set_grad_enabled(grad):
        a = agg(feats, mask, return_attn=True)
        b = agg(junk, mask, return_attn=True)
        alone = agg(feats[1:, :19], return_attn=True)
    assert torch.allclose(a.cls, b.cls, atol=1e-6) and torch.allclose(a.tokens, b.tokens, atol=1e-6)
    assert torch.allclose(a.cls[1], alone.cls[0], atol=1e-6)
    assert torch.allclose(a.tokens[1, :19], alone.tokens[0], atol=1e-6)
    assert torch.allclose(a.attn[1, :19], alone.attn[0], atol=1e-7)
    assert torch.all(a.attn[1, 19:] == 0) and torch.all(a.tokens[1, 19:] == 0)


def test_package_mask_alone_would_leak():
    """Why the aggregator compacts: the package's own mask lets padded rows shift the output."""
    torch.manual_seed(0)
    layer = _agg().layers[0].eval()
    x = torch.randn(1, 13, 16)
    xj = torch.cat([x, 5 * torch.randn(1, 6, 16)], dim=1)
    mj = torch.cat([torch.ones(1, 13, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        plain = layer.attn(layer.norm(x), mask=torch.ones(1, 13, dtype=torch.bool))
        padded = layer.attn(layer.norm(xj), mask=mj)[:, :13]
    assert (plain - padded).abs().max() > 1e-4


def test_aggregator_rejects_an_empty_bag_mask():
    agg = _agg()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"batch item\(s\) \[1\]"):
        agg(torch.randn(2, 5, D_IN), mask)


@pytest.mark.parametrize("n", [4, 8, 9, 15, 40])
def test_chunked_inference_matches_package_forward(n, monkeypatch):
    """The chunked path (eval, no grad, long sequences) computes the package's formula."""
    torch.manual_seed(n)
    # n + 1 > 4 tokens: chunked. With 4 landmarks, n + 1 = 5 and 9 leave one landmark made
    # of padding only (the package pads 3 rows in front of segments of 2 and 3 rows).
    agg = _agg(chunk_size=4).eval()
    ref = copy.deepcopy(agg)
    ref.chunk_size = 10**9  # never chunked: the package's own forward
    feats = torch.randn(1, n, D_IN)
    calls = []
    original = NystromLayer.forward_chunked_

    def spy(self, x, chunk_size):
        calls.append(x.shape[0])
        return original(self, x, chunk_size)

    monkeypatch.setattr(NystromLayer, "forward_chunked_", spy)
    with torch.inference_mode():
        a = agg(feats, return_attn=True)
        assert calls == [n + 1, n + 1]  # both layers took the chunked path
        b = ref(feats, return_attn=True)
    assert len(calls) == 2  # the reference did not
    assert torch.allclose(a.cls, b.cls, atol=1e-5)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5)
    assert torch.allclose(a.attn, b.attn, atol=1e-7)


def _package_and_valid(attn, x, g):
    """Output and gradients (input, then every weight) of the package's forward with an all-True
    mask and of nystrom_attention_valid, for the same upstream gradient g."""
    results = []
    for fn in (lambda t: attn(t, mask=torch.ones(t.shape[:2], dtype=torch.bool)), lambda t: nystrom_attention_valid(attn, t)):
        t = x.clone().requires_grad_(True)
        out = fn(t)
        results.append([out, *torch.autograd.grad(out, [t, *attn.parameters()], g)])
    return results


# n + 1 tokens with 4 landmarks: n % 4 == 0 (no padding), padding inside the first segment,
# landmarks made only of padding (5, 9 tokens; fewer tokens than landmarks: 3)
@pytest.mark.parametrize("n,landmarks", [(4, 4), (5, 4), (9, 4), (3, 4), (16, 4), (17, 4), (61, 8), (301, 32)])
def test_valid_attention_is_the_packages_formula(n, landmarks):
    """The training path computes the package's forward (mask all True): outputs and gradients
    equal in float64 to rounding, so the formula is the same."""
    torch.manual_seed(n)
    attn = NystromAttention(dim=16, dim_head=4, heads=4, num_landmarks=landmarks, pinv_iterations=6, residual=True)
    attn = attn.double()
    x = torch.randn(2, n, 16, dtype=torch.float64)
    ref, ours = _package_and_valid(attn, x, torch.randn(2, n, 16, dtype=torch.float64))
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r, rtol=1e-7, atol=1e-8 * r.abs().max().item())


@pytest.mark.parametrize("n", [61, 6001])
def test_valid_attention_float32_gradients_are_right(n):
    """In float32 every gradient of the training path is within 1e-5 of float64 truth; the
    package's own Conv2d weight gradient (PyTorch CPU) misses by about 1e-2 at these lengths
    when run unpadded, which is why the residual convolution runs as matmuls."""
    torch.manual_seed(0)
    attn = NystromAttention(dim=32, dim_head=8, heads=4, num_landmarks=8, pinv_iterations=6, residual=True)
    x, g = torch.randn(1, n, 32), torch.randn(1, n, 32)
    truth, _ = _package_and_valid(copy.deepcopy(attn).double(), x.double(), g.double())
    _, ours = _package_and_valid(attn, x, g)
    for o, t in zip(ours, truth):
        assert ((o.double() - t).abs().max() / t.abs().max()).item() < 1e-5


def test_valid_attention_at_some_rows_is_those_rows_of_the_full_output():
    torch.manual_seed(0)
    attn = NystromAttention(dim=16, dim_head=4, heads=4, num_landmarks=4, pinv_iterations=6, residual=True).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    rows = torch.tensor([[0, 3, 4, 18], [0, 1, 7, 9]])
    full = nystrom_attention_valid(attn, x)
    torch.testing.assert_close(nystrom_attention_valid(attn, x, rows), full.gather(1, rows[..., None].expand(-1, -1, 16)))


def _encode_full_and_needed(padded: bool, seed: int, mask_seed: int):
    """A float64 aggregator, (2, 21) tokens (the second padded after 15 when ``padded``), half of
    the valid positions needed, and encode's outputs without and with ``need``."""
    torch.manual_seed(seed)
    agg = _agg().double()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    mask = torch.ones(2, 21, dtype=torch.bool)
    if padded:
        mask[1, 15:] = False
    need = random_patch_mask(mask, 0.5, torch.Generator().manual_seed(mask_seed))
    return agg, x, mask, need, agg.encode(x, mask), agg.encode(x, mask, need=need)


@pytest.mark.parametrize("padded", [False, True])
def test_encode_with_need_gives_the_needed_rows_and_cls_with_their_gradients(padded):
    """encode(need=...) (MPM: only masked rows are read) equals the full encode at those rows."""
    agg, x, mask, need, full, part = _encode_full_and_needed(padded, seed=0, mask_seed=0)
    torch.testing.assert_close(part.cls, full.cls)
    torch.testing.assert_close(part.tokens[need], full.tokens[need])
    assert torch.all(part.tokens[~need] == 0)
    loss = lambda out: out.cls.pow(2).sum() + out.tokens[need].pow(2).sum()  # noqa: E731
    params = [p for name, p in agg.named_parameters() if not name.startswith("proj.")]  # encode starts after it
    for g, r in zip(torch.autograd.grad(loss(part), params), torch.autograd.grad(loss(full), params)):
        torch.testing.assert_close(g, r)


def test_cls_attention_is_the_exact_softmax_row():
    torch.manual_seed(0)
    agg = _agg().eval()
    feats = torch.randn(1, 10, D_IN)
    with torch.no_grad():
        attn = agg(feats, return_attn=True).attn
        # brute force: input of the last layer, full softmax attention, CLS row
        x = torch.cat([agg.cls_token[None, None], agg.embed(feats)], dim=1)
        x = agg.layers[0](x)
        last = agg.layers[1]
        q, k, _ = last.attn.to_qkv(last.norm(x)).chunk(3, dim=-1)
        q, k = (rearrange(t, "b n (h d) -> b h n d", h=2) for t in (q, k))
        full = (q @ k.transpose(-1, -2) * last.attn.scale).softmax(-1)
        expected = full[:, :, 0, 1:].mean(1)
    assert torch.allclose(attn, expected, atol=1e-7)


# ---------------------------------------------------------------- MPM + GiMP


def test_random_patch_mask_counts_and_validity():
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[1, 11:] = False
    valid[2, 3:] = False
    m = random_patch_mask(valid, 0.5, torch.Generator().manual_seed(0))
    assert m.sum(1).tolist() == [10, 5, 1]
    assert not (m & ~valid).any()
    m2 = random_patch_mask(valid, 0.5, torch.Generator().manual_seed(1))
    assert not torch.equal(m, m2)


def _genes_encoder(kind: str, num_genes: int = 30):
    if kind == "groupmsa":
        return GroupMSA(num_genes=num_genes, fragment_size=8, num_groups=2, embed_dim=8, num_heads=2, num_classes=2)
    if kind == "snn":
        return SNN(num_genes=num_genes, embed_dim=8, hidden=(8,), num_classes=2)
    return None


def _gimp(kind="groupmsa", **kw) -> GiMP:
    cfg = dict(in_dim=D_IN, embed_dim=16, num_heads=2, num_landmarks=4, dropout=0.0, decoder_hidden=8, margin=10.0)
    return GiMP(gene_encoder=_genes_encoder(kind), **(cfg | kw))


@pytest.mark.parametrize("kind", ["groupmsa", "snn", None])
def test_gimp_pretrain_step_grads_and_frozen_encoder(kind):
    torch.manual_seed(0)
    model = _gimp(kind).train()
    enc = model.gene_encoder
    if enc is not None:
        before = copy.deepcopy(enc.state_dict())
        assert not enc.training and all(not p.requires_grad for p in enc.parameters())
    feats, y = torch.randn(4, 20, D_IN), torch.tensor([0, 0, 1, 1])
    genes = torch.randn(4, 30) if kind else None
    out = model.pretrain_step(feats, None, genes, y)
    assert set(out) == {"loss", "loss_tri", "loss_rec"}
    assert torch.isclose(out["loss"], out["loss_tri"] + out["loss_rec"])
    assert out["loss_tri"] > 0 and out["loss_rec"] > 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    _assert_all_grads(model, skip=("gene_encoder.",))
    if enc is not None:
        assert all(p.grad is None for p in enc.parameters())
        assert not enc.training
        torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
        assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
        assert len(model.trainable_parameters()) == len(list(model.aggregator.parameters())) + 1 + len(list(model.decoder.parameters()))


def test_gimp_genes_change_the_triplet_loss():
    torch.manual_seed(0)
    model = _gimp("groupmsa", use_mpm=False).eval()
    feats, y = torch.randn(4, 20, D_IN), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        a = model.pretrain_step(feats, None, torch.randn(4, 30), y)["loss_tri"]
        b = model.pretrain_step(feats, None, torch.randn(4, 30), y)["loss_tri"]
    assert a != b


def test_gimp_table2_switches():
    torch.manual_seed(0)
    feats, y = torch.randn(4, 20, D_IN), torch.tensor([0, 1, 0, 1])
    mpm_only = _gimp(None, use_triplet=False)
    out = mpm_only.pretrain_step(feats, None, None, None)
    assert out["loss_tri"] == 0 and out["loss_rec"] > 0
    tri_only = _gimp("groupmsa", use_mpm=False)
    assert not hasattr(tri_only, "decoder")
    out = tri_only.pretrain_step(feats, None, torch.randn(4, 30), y)
    assert out["loss_rec"] == 0 and out["loss_tri"] > 0
    out = _gimp("groupmsa", triplet_input="full", normalize="none", mining="hard").pretrain_step(
        feats, None, torch.randn(4, 30), y
    )
    assert out["loss_tri"] > 0 and out["loss_rec"] > 0
    with pytest.raises(ValueError, match="nothing to pretrain"):
        _gimp(None, use_mpm=False, use_triplet=False)
    with pytest.raises(ValueError, match="needs genes"):
        _gimp("snn").pretrain_step(feats, None, None, y)


def test_gimp_mpm_respects_the_window_mask():
    torch.manual_seed(0)
    model = _gimp(None, use_triplet=False).eval()
    feats = torch.randn(2, 20, D_IN)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    junk = feats.clone()
    junk[1, 12:] = 1e3
    g = torch.Generator().manual_seed(0)
    a = model.pretrain_step(feats, mask, None, None, generator=g)["loss_rec"]
    g = torch.Generator().manual_seed(0)
    b = model.pretrain_step(junk, mask, None, None, generator=g)["loss_rec"]
    assert torch.allclose(a, b)


def test_classifier_from_pretrained(tmp_path):
    torch.manual_seed(0)
    gimp = _gimp("groupmsa", depth=3, num_heads=4)
    path = tmp_path / "gimp_pretrain.pt"
    torch.save({"model": {f"module.{k}": v for k, v in gimp.state_dict().items()}, "epoch": 1}, path)
    for source in (gimp, gimp.state_dict(), path):
        clf = GiMPClassifier.from_pretrained(source, num_classes=3, hidden=8, dropout=0.0, num_landmarks=4)
        assert len(clf.aggregator.layers) == 3 and clf.aggregator.embed_dim == 16
        for k, v in gimp.aggregator.state_dict().items():
            assert torch.equal(clf.aggregator.state_dict()[k], v), k
    logits, attn = clf(torch.randn(2, 9, D_IN), return_attn=True)
    assert logits.shape == (2, 3) and attn.shape == (2, 9)
    logits.logsumexp(-1).sum().backward()
    _assert_all_grads(clf)
    with pytest.raises(KeyError, match="aggregator"):
        aggregator_state_dict({"encoder.weight": torch.zeros(1)})


def test_classifier_masks_padding():
    torch.manual_seed(0)
    clf = GiMPClassifier(aggregator=_agg(), num_classes=2, hidden=8, dropout=0.0).eval()
    feats = torch.randn(1, 10, D_IN)
    padded = torch.cat([feats, torch.randn(1, 5, D_IN)], dim=1)
    mask = torch.arange(15)[None] < 10
    with torch.no_grad():
        assert torch.allclose(clf(feats), clf(padded, mask), atol=1e-6)


def test_chunked_inference_batch_with_padding_matches_per_sample_package_forward():
    torch.manual_seed(0)
    agg = _agg(chunk_size=5).eval()
    ref = copy.deepcopy(agg)
    ref.chunk_size = 10**9
    feats = torch.randn(2, 17, D_IN)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[0, 11:] = False
    with torch.no_grad():
        out = agg(feats, mask, return_attn=True)
        for i, n in enumerate((11, 17)):
            alone = ref(feats[i : i + 1, :n], return_attn=True)
            assert torch.allclose(out.cls[i], alone.cls[0], atol=1e-5)
            assert torch.allclose(out.tokens[i, :n], alone.tokens[0], atol=1e-5)
            assert torch.allclose(out.attn[i, :n], alone.attn[0], atol=1e-7)
    assert torch.all(out.tokens[0, 11:] == 0) and torch.all(out.attn[0, 11:] == 0)


def test_benchmarks_run_at_tiny_shapes():
    """`python -m gimplib.bench step|slide` at tiny shapes: the JSON has its figures."""
    from gimplib.bench import slide, step

    res = step.run(
        "--window-len 40 --in-dim 16 --embed-dim 8 --num-heads 2 --num-landmarks 8 --genes 100 "
        "--gene-embed-dim 8 --warmup 0 --repeats 1 --matmul-size 64 --matmul-seconds 0.05 --device cpu".split()
    )
    assert res["gimplib"]["flops"] > 0 and res["reference"]["flops"] > 0
    assert res["gimplib"]["seconds"] > 0 and res["matmul_fp32_gflops"] > 0
    assert res["time_ratio_gimplib_over_reference"] > 0
    res = slide.run("--sizes 30,50 --in-dim 16 --embed-dim 8 --num-heads 2 --num-landmarks 8 --chunk-size 16 --device cpu".split())
    assert [c["patches"] for c in res["cases"]] == [30, 50]
    assert all(c["finite"] and c["peak_gib"] > 0 for c in res["cases"])


def test_center_proj_removes_per_patch_offset_and_keeps_keys():
    torch.manual_seed(0)
    agg = PatchAggregator(in_dim=16, embed_dim=8, num_heads=2, num_landmarks=4).eval()
    plain = PatchAggregator(in_dim=16, embed_dim=8, num_heads=2, num_landmarks=4, center_proj=False).eval()
    assert agg.center_proj and not plain.center_proj
    assert agg.state_dict().keys() == plain.state_dict().keys()  # checkpoints stay interchangeable
    plain.load_state_dict(agg.state_dict())
    x = torch.rand(2, 5, 16)
    w, b = agg.proj.weight, agg.proj.bias
    expected = F.relu((x - x.mean(dim=-1, keepdim=True)) @ w.T + b)
    torch.testing.assert_close(agg.embed(x), expected)
    # a common offset added to every feature of a patch (the non-negative common mode) is invisible ...
    torch.testing.assert_close(agg.embed(x + torch.rand(2, 5, 1) * 3), expected, rtol=1e-5, atol=1e-5)
    # ... but not to the plain projection, which is what center_proj=False gives
    torch.testing.assert_close(plain.embed(x), F.relu(x @ w.T + b))
    assert not torch.allclose(plain.embed(x + 3.0), plain.embed(x))
    # the whole forward uses it, and a (single) row's gradient has zero sum: Adam cannot shift all weights alike
    agg.train()
    agg(x).cls.sum().backward()
    assert agg.proj.weight.grad.sum(dim=1).abs().max() < 1e-5


def test_build_gene_encoder_by_name_and_unknown_name_lists_the_known_ones():
    from gimplib.models import build_gene_encoder

    assert isinstance(build_gene_encoder("snn", num_genes=12, embed_dim=8), SNN)
    with pytest.raises(ValueError, match=r"encoder must be one of \['groupmsa', 'snn'\], got 'mlp'"):
        build_gene_encoder("mlp", num_genes=12)


# ---------------------------------------------------------------- the training path's pieces (issue 14)


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 65, 200])
@pytest.mark.parametrize("kernel", [3, 33, 65])
def test_residual_conv_blocks_equal_the_packages_conv2d(n, kernel):
    """The block-Toeplitz residual convolution equals the package's depth-wise Conv2d (and its
    weight and value gradients) in float64, on values given as a strided (b, h, n, dh) view of
    a (b, n, h * dh) projection, as the layer passes them."""
    from gimplib.models.aggregator import _residual_conv

    torch.manual_seed(n + kernel)
    b, h, dh = 2, 3, 5
    proj = torch.randn(b, n, h * dh, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(h, 1, kernel, 1, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(b, h, n, dh, dtype=torch.float64)
    results = []
    for conv in (lambda w, v: F.conv2d(v, w, padding=(kernel // 2, 0), groups=h), _residual_conv):
        out = conv(weight, rearrange(proj, "b n (h d) -> b h n d", h=h))
        results.append([out, *torch.autograd.grad(out, (weight, proj), grad)])
    for ours, ref in zip(*results[::-1]):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_attention_output_dropout_keeps_the_packages_distribution():
    """The layer's output dropout: identity in eval mode and at p = 0, zeros at p = 1, and in
    training each value kept with probability 1 - p and scaled by 1 / (1 - p), as nn.Dropout."""
    from gimplib.models.aggregator import _dropout

    x = torch.rand(200, 500) + 1.0
    drop = torch.nn.Dropout(0.1)
    assert _dropout(x, drop.eval()) is x and _dropout(x, torch.nn.Dropout(0.0)) is x
    assert torch.all(_dropout(x, torch.nn.Dropout(1.0)) == 0)
    torch.manual_seed(0)
    y = _dropout(x, drop.train())
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.005  # 100,000 draws: 0.9 +- 0.001 (1 sd)
    torch.testing.assert_close(y[kept], x[kept] / 0.9)
    x.requires_grad_(True)
    y = _dropout(x, drop)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, (y != 0).to(g.dtype) / 0.9)


@pytest.mark.parametrize("padded", [False, True])
def test_encode_gives_the_needed_rows_in_order_without_building_tokens(padded):
    """encode(need=...).needed are the full encode's outputs at the needed positions in row-major
    order; ``tokens`` is only scattered when read, and then equals the full tokens there."""
    agg, x, mask, need, full, part = _encode_full_and_needed(padded, seed=1, mask_seed=3)
    torch.testing.assert_close(part.needed, full.tokens[need])
    if not padded:
        assert part._tokens is None  # the rows were never scattered into (b, n, d)
    torch.testing.assert_close(part.tokens[need], full.tokens[need])
    assert torch.all(part.tokens[~need] == 0)
    assert agg.encode(x, mask).needed is None
