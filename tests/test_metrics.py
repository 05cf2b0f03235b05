"""gimplib.metrics against hand-computed values (and scikit-learn as a second opinion)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from gimplib.metrics import binary_auc, classification_metrics, mean_sd


def test_binary_by_hand():
    y = [0, 0, 1, 1]
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = classification_metrics(y, p1, n_boot=0)
    # positive/negative pairs ordered correctly: (0.35>0.1), (0.8>0.1), (0.8>0.4) -> 3 of 4
    assert m["auc"] == pytest.approx(0.75)
    # predictions [0, 0, 0, 1]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["confusion"] == [[2, 0], [1, 1]]
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    # positive class: precision 1, recall 1/2 -> F1 = 2/3
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["n"] == 4
    assert "accuracy_ci_low" not in m
    # (n, 2) input gives the same figures as (n,) probabilities of class 1
    m2 = classification_metrics(y, np.stack([1 - p1, p1], 1), n_boot=0)
    assert {k: m2[k] for k in m} == m


def test_auc_ties_count_half():
    assert binary_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert binary_auc([0, 1, 1], [0.3, 0.3, 0.9]) == pytest.approx((0.5 + 1) / 2)
    assert np.isnan(binary_auc([1, 1], [0.2, 0.4]))


def test_multiclass_by_hand():
    y = [0, 1, 2, 2]
    prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]])
    m = classification_metrics(y, prob, n_boot=0)
    assert m["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # one-vs-rest AUCs 1, 2/3, 3.5/4 (a tie at 0.3 counts a half)
    assert m["auc"] == pytest.approx((1 + 2 / 3 + 0.875) / 3)


def test_agrees_with_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    for num_classes in (2, 4):
        y = rng.integers(0, num_classes, 200)
        logits = rng.normal(size=(200, num_classes)) + np.eye(num_classes)[y]
        prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        m = classification_metrics(y, prob, n_boot=0)
        pred = prob.argmax(1)
        if num_classes == 2:
            assert m["auc"] == pytest.approx(roc_auc_score(y, prob[:, 1]))
            assert m["f1"] == pytest.approx(f1_score(y, pred))
        else:
            assert m["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr"))
            assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_bootstrap_intervals():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 150)
    p1 = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.3, 150), 0, 1)
    m = classification_metrics(y, p1, n_boot=300, seed=1)
    for name in ("accuracy", "balanced_accuracy", "auc", "f1"):
        low, high = m[f"{name}_ci_low"], m[f"{name}_ci_high"]
        assert low <= m[name] <= high, name
        assert 0.0 < high - low < 0.3, name  # a real interval, not a point, not everything
    # the same seed gives the same interval; another seed a different one
    again = classification_metrics(y, p1, n_boot=300, seed=1)
    other = classification_metrics(y, p1, n_boot=300, seed=2)
    assert again["auc_ci_low"] == m["auc_ci_low"]
    assert other["auc_ci_low"] != m["auc_ci_low"]
    # a perfect classifier: every resample is perfect
    perfect = classification_metrics([0, 1, 0, 1, 1], [0.1, 0.9, 0.2, 0.8, 0.7], n_boot=100)
    assert perfect["accuracy_ci_low"] == perfect["accuracy_ci_high"] == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="only 2 columns"):
        classification_metrics([0, 2], np.full((2, 2), 0.5), n_boot=0)
    with pytest.raises(ValueError, match=r"\(n,\) and prob \(n, C\)"):
        classification_metrics([0, 1, 1], np.full((2, 2), 0.5), n_boot=0)
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics([0, 1], np.array([0.2, np.nan]), n_boot=0)


def test_mean_sd():
    assert mean_sd([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_sd([0.5]) == (0.5, 0.0)


def test_clopper_pearson_known_values():
    from gimplib.metrics import clopper_pearson

    # 32 of 32 right: the bootstrap's [1, 1] is really [0.891, 1] (0.025 ** (1 / 32))
    low, high = clopper_pearson(32, 32)
    assert low == pytest.approx(0.025 ** (1 / 32)) and low == pytest.approx(0.891, abs=5e-4) and high == 1.0
    assert clopper_pearson(0, 32) == (0.0, pytest.approx(1 - 0.025 ** (1 / 32)))
    # textbook values (e.g. R's binom.test(5, 10)$conf.int: 0.187086 0.812914)
    assert clopper_pearson(5, 10) == (pytest.approx(0.187086, abs=1e-6), pytest.approx(0.812914, abs=1e-6))
    # 189 of 190 (the paper's 0.9947): [0.9710, 0.9999]
    low, high = clopper_pearson(189, 190)
    assert low == pytest.approx(0.97101, abs=1e-4) and high == pytest.approx(0.99987, abs=1e-4)
    # symmetric in successes and failures, and wider at 99 % than at 95 %
    a, b = clopper_pearson(7, 20)
    c, d = clopper_pearson(13, 20)
    assert a == pytest.approx(1 - d) and b == pytest.approx(1 - c)
    e, f = clopper_pearson(7, 20, alpha=0.01)
    assert e < a and f > b


@pytest.mark.parametrize("k, n, alpha, match", [(3, 2, 0.05, "0 <= k <= n"), (-1, 5, 0.05, "0 <= k <= n"),
                                                (0, 0, 0.05, "n >= 1"), (1.5, 4, 0.05, "whole counts"),
                                                (1, 4, 0.0, "alpha")])
def test_clopper_pearson_bad_input(k, n, alpha, match):
    from gimplib.metrics import clopper_pearson

    with pytest.raises(ValueError, match=match):
        clopper_pearson(k, n, alpha=alpha)
