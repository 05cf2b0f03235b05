"""The shape walk-through: a tiny GiMP, every tensor's shape asserted from the inputs to both
losses and the logits (gimplib.models.walkthrough; shown in the book, run in `make test`)."""

from __future__ import annotations

import pytest

from gimplib.models.walkthrough import ShapeStep, shape_walkthrough


def test_shape_walkthrough_runs_and_covers_every_step():
    steps = shape_walkthrough(b=4, n=24, g=64, d=16)
    assert all(isinstance(s, ShapeStep) for s in steps)
    shapes = {(s.step, s.tensor): s.shape for s in steps}
    assert shapes[("input", "feats")] == (4, 24, 1024) and shapes[("input", "genes")] == (4, 64)
    assert shapes[("4 Nystrom x2", "CLS_img")] == (4, 16) and shapes[("7 GroupMSA", "CLS_ge")] == (4, 16)
    assert shapes[("8 concat", "CLS_pat")] == (4, 32)  # 2d
    assert shapes[("5 decode", "h_hat")] == (4, 24, 1024)
    assert shapes[("6 Eq. 3", "L_rec")] == () and shapes[("9 Eq. 4", "L_tri")] == ()
    assert shapes[("12 MLP head", "logits")] == (4, 2)
    assert [s.step for s in steps][-1] == "13 loss"


@pytest.mark.parametrize("kw, match", [(dict(b=3), "even"), (dict(b=2), "at least 4"), (dict(d=10), "divisible"),
                                       (dict(n=2), "n >= 4")])
def test_shape_walkthrough_bad_sizes(kw, match):
    with pytest.raises(ValueError, match=match):
        shape_walkthrough(**kw)
