"""The linear reference for a gene encoder: logistic regression on the same gene input.

A gene encoder is only worth its cost if it is at least as accurate as a regularised
linear model on the same standardised expression. :func:`linear_gene_baseline` fits the
same :class:`~gimplib.data.genes.GeneTransform` as :func:`~gimplib.train.train_gene_encoder`
on the training patients, picks the inverse regularisation ``C`` on the validation
patients (as the encoder picks its epoch there) and reports the test patients.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

from gimplib.metrics import classification_metrics
from gimplib.train.tasks import _fit_transform, gene_transform_settings
from gimplib.utils import DataError

__all__ = ["linear_gene_baseline"]


def linear_gene_baseline(
    cohort: Any,
    split: Mapping[str, Sequence[str]],
    *,
    Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0),
    gene_transform: str = "log2p1",
    standardize: bool = True,
    top_k_var: int | None = None,
    clip: float | None = None,
    seed: int = 0,
    max_iter: int = 5000,
) -> dict[str, Any]:
    """L2 logistic regression on the gene table, ``C`` chosen on validation.

    Args:
        cohort: a cohort with a gene table.
        split: ``{"train", "val", "test": [case_id, ...]}``; without ``val`` cases the
            middle of ``Cs`` is used.
        Cs: inverse regularisation strengths tried (scikit-learn's ``C``).
        gene_transform, standardize, top_k_var, clip: as for :func:`train_gene_encoder`
            (the gene order does not matter to a linear model).
        seed: seed of the solver.
        max_iter: solver iterations.

    Returns:
        ``{"C", "val_accuracy", "val_auc", "test_accuracy", "test_auc", ...}``: the
        :func:`~gimplib.metrics.classification_metrics` figures of each part present
        (no intervals), prefixed by the part.

    Raises:
        DataError: the cohort has no gene table, or the training cases hold one class.
    """
    if not Cs or any(c <= 0 for c in Cs):
        raise ValueError(f"Cs must be positive numbers, got {list(Cs)}")
    settings = gene_transform_settings(gene_transform=gene_transform, standardize=standardize, top_k_var=top_k_var,
                                       clip=clip)
    gt = _fit_transform(cohort, split["train"], settings)
    parts = {p: list(split[p]) for p in ("train", "val", "test") if split.get(p)}
    x = {p: gt.transform(cohort.genes.loc[ids]) for p, ids in parts.items()}
    y = {p: np.asarray(cohort.labels_of(ids)) for p, ids in parts.items()}
    if len(np.unique(y["train"])) < 2:
        raise DataError(f"linear_gene_baseline: the {len(y['train'])} training cases hold one class only")

    def fit(c: float) -> Any:
        return LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x["train"], y["train"])

    if "val" in x:  # best validation accuracy; ties go to the lower validation log-loss
        scored = []
        for c in Cs:
            model = fit(c)
            prob = np.clip(model.predict_proba(x["val"]), 1e-12, 1.0)
            nll = -np.log(prob[np.arange(len(y["val"])), y["val"]]).mean()
            scored.append((model.score(x["val"], y["val"]), -nll, c, model))
        _, _, best_c, model = max(scored, key=lambda r: r[:2])
    else:
        best_c = sorted(Cs)[len(Cs) // 2]
        model = fit(best_c)
    out: dict[str, Any] = {"C": float(best_c)}
    for part in ("val", "test"):
        if part in x:
            prob = np.zeros((len(y[part]), len(cohort.label_names)))
            prob[:, model.classes_] = model.predict_proba(x[part])
            metrics = classification_metrics(y[part], prob, n_boot=0)
            out.update({f"{part}_{k}": v for k, v in metrics.items() if k not in ("confusion", "n")})
    return out
