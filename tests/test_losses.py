"""Losses against hand-computed values, and their behaviour on degenerate batches."""

from __future__ import annotations

import math

import pytest
import torch

from gimplib.losses import info_nce, masked_l1, pairwise_distances, triplet_loss

# 1-d embeddings 0, 2, 1.5, 10 with labels 0, 0, 1, 1.
# Squared distances: d01=4, d02=2.25, d03=100, d12=0.25, d13=64, d23=72.25.
# Batch-all triplets (a, p, n), margin 0.8:
#   (0,1,2) 4-2.25+.8=2.55   (0,1,3) <0
#   (1,0,2) 4-0.25+.8=4.55   (1,0,3) <0
#   (2,3,0) 72.25-2.25+.8=70.8   (2,3,1) 72.25-0.25+.8=72.8
#   (3,2,0) <0   (3,2,1) 72.25-64+.8=9.05
# active sum 159.75 over 5 active / 8 valid triplets.
EMB = torch.tensor([[0.0], [2.0], [1.5], [10.0]])
Y = torch.tensor([0, 0, 1, 1])


def test_pairwise_distances_hand_values():
    d = pairwise_distances(EMB)
    assert d[0, 1] == 4 and d[0, 2] == 2.25 and d[2, 3] == 72.25
    assert torch.all(d.diagonal() == 0)
    assert torch.allclose(pairwise_distances(EMB, squared=False)[1, 3], torch.tensor(8.0))


def test_triplet_batch_all_active_and_valid():
    loss = triplet_loss(EMB, Y, margin=0.8, mining="all", reduction="active")
    assert loss.item() == pytest.approx(159.75 / 5, rel=1e-6)
    loss = triplet_loss(EMB, Y, margin=0.8, mining="all", reduction="valid")
    assert loss.item() == pytest.approx(159.75 / 8, rel=1e-6)


def test_triplet_batch_hard():
    # per anchor: hardest positive / hardest negative -> 2.55, 4.55, 72.8, 9.05
    loss = triplet_loss(EMB, Y, margin=0.8, mining="hard")
    assert loss.item() == pytest.approx((2.55 + 4.55 + 72.8 + 9.05) / 4, rel=1e-6)


def test_triplet_not_squared():
    # distances 2, 1.5, 10, 0.5, 8, 8.5 -> active losses 1.3, 2.3, 7.8, 8.8, 1.3
    loss = triplet_loss(EMB, Y, margin=0.8, squared=False)
    assert loss.item() == pytest.approx(21.5 / 5, rel=1e-5)


def test_triplet_gradient_matches_hand_derivative():
    emb = EMB.clone().requires_grad_(True)
    triplet_loss(emb, Y, margin=0.8, reduction="valid").backward()
    # d/dx of sum over active triplets of (x_a-x_p)^2 - (x_a-x_n)^2, divided by 8; for x0:
    # (0,1,2): 2(x0-x1) - 2(x0-x2) = -4 + 3 = -1 ; (1,0,2): -2(x1-x0) = -4 ;
    # (2,3,0): +2(x2-x0) = 3 ; total -2 / 8
    assert emb.grad[0, 0].item() == pytest.approx(-2 / 8, rel=1e-6)


@pytest.mark.parametrize("mining", ["all", "hard"])
@pytest.mark.parametrize("y", [[0, 0, 0], [0, 1, 2], [1]])
def test_triplet_no_valid_triplet_is_zero_with_grad(mining, y):
    emb = torch.randn(len(y), 4, requires_grad=True)
    loss = triplet_loss(emb, torch.tensor(y), mining=mining)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(emb.grad == 0)


def test_triplet_all_satisfied_active_is_zero():
    emb = torch.tensor([[0.0], [0.1], [5.0], [5.1]], requires_grad=True)
    loss = triplet_loss(emb, torch.tensor([0, 0, 1, 1]), margin=0.8)
    assert loss.item() == 0.0 and math.copysign(1.0, loss.item()) == 1.0  # +0.0, not -0.0
    loss.backward()
    assert not torch.isnan(emb.grad).any()


def test_triplet_bad_arguments():
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(EMB, Y, mining="semi")
    with pytest.raises(ValueError, match="reduction"):
        triplet_loss(EMB, Y, reduction="sum")


def test_masked_l1_hand_value_and_only_masked_positions():
    target = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    pred = torch.zeros_like(target, requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    loss = masked_l1(pred, target, mask)
    assert loss.item() == pytest.approx((1 + 2 + 5 + 6) / 4)
    loss.backward()
    assert torch.all(pred.grad[0, 1] == 0) and torch.all(pred.grad[0, 0] == -0.25)


def test_masked_l1_nothing_masked_is_zero():
    pred = torch.randn(2, 3, 4, requires_grad=True)
    loss = masked_l1(pred, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(pred.grad == 0)


def test_info_nce_hand_value():
    a = torch.eye(2)
    # logits = I / 1: each row's CE = log(1 + e^-1)
    expected = math.log(1 + math.exp(-1))
    assert info_nce(a, a.clone(), temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(a, a.clone(), temperature=1.0, symmetric=False).item() == pytest.approx(expected, rel=1e-6)
    # asymmetric pairs: a->b differs from b->a
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    one_way = info_nce(a, b, temperature=1.0, symmetric=False)
    other_way = info_nce(b, a, temperature=1.0, symmetric=False)
    assert info_nce(a, b, temperature=1.0).item() == pytest.approx(0.5 * (one_way + other_way).item(), rel=1e-6)
