"""GiMP step by step on a tiny model, the shape of every tensor asserted on the way.

:func:`shape_walkthrough` runs one pre-training step and one fine-tuning forward by hand,
from ``feats (b, n, 1024)`` and ``genes (b, g)`` to both losses and the logits, calling the
same library pieces that :class:`~gimplib.models.GiMP` chains in its ``forward``, and checks
at the end that the hand-made losses equal the module's. It is meant to be read (the book
shows its source) and run (``tests/test_models.py`` runs it in ``make test``; a notebook can
call it and display the table it returns). Symbols as in the book's notation table
(``book/method.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ShapeStep", "shape_walkthrough"]


@dataclass(frozen=True)
class ShapeStep:
    """One row of the walk-through: what was computed, its shape, and what it is."""

    step: str
    tensor: str
    shape: tuple[int, ...]
    meaning: str


def shape_walkthrough(*, b: int = 4, n: int = 48, g: int = 200, d: int = 32, seed: int = 0) -> list[ShapeStep]:
    """Push a random batch through a tiny GiMP and assert every shape.

    Args:
        b: patients in the batch (even, at least 4, so that every anchor has a positive
            and a negative of the other class).
        n: patches per bag (the pre-training window takes all of them: ``L = n``).
        g: genes per expression profile.
        d: width of each class token (GroupMSA and the aggregator share it, as in the paper).
        seed: seed of the random inputs and weights.

    Returns:
        The steps in order, each with its tensor's shape (a notebook can show them as a
        table: ``pd.DataFrame(shape_walkthrough())``).

    Raises:
        ValueError: ``b`` odd or below 4, or ``n``, ``g``, ``d`` too small for the tiny model.
        AssertionError: a tensor has the wrong shape (the message names the step), or the
            hand-made losses differ from :meth:`GiMP.forward`'s.
    """
    from gimplib.losses import masked_l1, triplet_loss
    from gimplib.models import GiMP, GiMPClassifier, GroupMSA, random_patch_mask

    if b < 4 or b % 2:
        raise ValueError(f"b must be even and at least 4 (two patients per class), got {b}")
    if n < 4 or g < 8 or d < 8 or d % 4:
        raise ValueError(f"need n >= 4, g >= 8 and d >= 8 divisible by 4 heads; got n={n}, g={g}, d={d}")
    D = 1024
    steps: list[ShapeStep] = []

    def check(step: str, name: str, x: torch.Tensor, shape: tuple[int, ...], meaning: str) -> torch.Tensor:
        assert tuple(x.shape) == shape, f"{step}: {name} should be {shape}, got {tuple(x.shape)}"
        assert torch.isfinite(x).all(), f"{step}: {name} has NaN or inf"
        steps.append(ShapeStep(step, name, shape, meaning))
        return x

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # inputs: b patients, each a bag of n patch embeddings and an expression profile
    feats = check("input", "feats", torch.rand(b, n, D, generator=gen), (b, n, D), "patch embeddings h_j")
    genes = check("input", "genes", torch.randn(b, g, generator=gen), (b, g), "expression profiles")
    y = torch.arange(b) % 2  # LUAD, LUSC, LUAD, ...

    gene_encoder = GroupMSA(num_genes=g, fragment_size=max(2, g // 8), num_groups=4, embed_dim=d, num_heads=4)
    model = GiMP(in_dim=D, embed_dim=d, gene_encoder=gene_encoder, num_heads=4, num_landmarks=8,
                 decoder_hidden=2 * d, depth=2).eval()  # eval: no dropout, so the losses can be compared

    # --- pre-training (Sect. 2.3): MPM on the image branch ------------------------------
    t = check("1 project", "t", model.aggregator.embed(feats), (b, n, d), "tokens t_j = ReLU(W h_j)")
    valid = torch.ones(b, n, dtype=torch.bool)
    M = check("2 choose M", "mpm_mask", random_patch_mask(valid, 0.5, gen), (b, n), "True at masked positions")
    assert (M.sum(1) == n // 2).all(), "2 choose M: half of each window should be masked"
    t_masked = check("3 mask", "t", torch.where(M[..., None], model.mask_token, t), (b, n, d),
                     "t_j replaced by the mask token m for j in M")
    out = model.aggregator.encode(t_masked)
    cls_img = check("4 Nystrom x2", "CLS_img", out.cls, (b, d), "the aggregator's class token")
    z = check("4 Nystrom x2", "z", out.tokens, (b, n, d), "output tokens z_j")
    h_hat = check("5 decode", "h_hat", model.decoder(z), (b, n, D), "reconstructions of every h_j")
    loss_rec = check("6 Eq. 3", "L_rec", masked_l1(h_hat, feats, M, reduction="sum"), (), "L1 on the masked j")

    # --- pre-training: gene-induced triplets ---------------------------------------------
    with torch.no_grad():
        cls_ge = check("7 GroupMSA", "CLS_ge", gene_encoder(genes), (b, d), "frozen gene encoder's class token")
    cls_pat = check("8 concat", "CLS_pat", torch.cat([F.normalize(cls_img, dim=-1), F.normalize(cls_ge, dim=-1)], -1),
                    (b, 2 * d), "[CLS_img; CLS_ge], each L2-normalised (ours)")
    loss_tri = check("9 Eq. 4", "L_tri", triplet_loss(cls_pat, y, margin=0.8), (), "triplets by class, margin 0.8")
    loss_pre = check("10 L_pre", "L_pre", loss_tri + loss_rec, (), "L_tri + L_rec")

    # the module does the same in one call
    ref = model(feats, genes=genes, y=y, mpm_mask=M)
    assert torch.allclose(ref["loss_rec"], loss_rec, rtol=1e-5, atol=1e-6), "L_rec differs from GiMP.forward"
    assert torch.allclose(ref["loss_tri"], loss_tri, rtol=1e-5, atol=1e-6), "L_tri differs from GiMP.forward"
    assert torch.allclose(ref["loss"], loss_pre, rtol=1e-5, atol=1e-6), "L_pre differs from GiMP.forward"

    # --- multimodal fine-tuning: the whole bag, no mask; the decoder is dropped ----------
    clf = GiMPClassifier.from_pretrained(model, num_classes=2, hidden=d, num_landmarks=8).eval()
    emb, _ = clf.cls_pat(feats, genes=genes)
    check("11 CLS_pat", "CLS_pat", emb, (b, 2 * d), "[CLS_img; CLS_ge] of the whole bag (raw, not normalised)")
    logits = check("12 MLP head", "logits", clf.head(emb), (b, 2), "LUAD / LUSC scores")
    check("13 loss", "cross-entropy", F.cross_entropy(logits, y), (), "the fine-tuning loss")
    assert torch.allclose(clf(feats, genes=genes), logits, atol=1e-6), "GiMPClassifier.forward differs"
    return steps
