"""The gene-encoder search behind book/genes_real.md (5-fold CV, seeds 0 and 1).

A lean copy of the training loop of `gimplib.train.train_gene_encoder` (same models, AdamW,
cosine schedule to 0, the epoch with the best validation accuracy kept, ties to the lower
validation loss), without checkpoints or bootstrap intervals, so that a row of the search
(ten trainings) takes minutes on one CPU core. The folds are the notebook's
(`kfold_splits(cohort, k=5, seed=s)`); every statistic (standardisation, clipping, gene
order) is fitted on the training patients of each fold through `GeneTransform`. The
figures the book quotes as final come from the notebook itself (papermill), not from here.

    OMP_NUM_THREADS=1 python dev/gene_search.py ../shared/data/expression/tcga_nsclc_rna out.jsonl [ROW ...]

Without ROW names every row runs (about an hour on one core).
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from gimplib.data import GeneTransform, kfold_splits, load_cohort
from gimplib.metrics import binary_auc
from gimplib.models.gene_encoders import build_gene_encoder

GM = dict(fragment_size=32, num_groups=8, embed_dim=64, num_heads=4, dropout=0.1, fragment_proj="per_fragment",
          gene_dropout=0.5)
SNN = dict(embed_dim=256, hidden=(256, 256), dropout=0.25)
CL = dict(clip=5.0, order="cluster")
#: name -> (model, GeneTransform settings, model settings, training settings)
ROWS = {
    "lr": ("logreg", {}, {}, {}),
    "lr_clip5": ("logreg", dict(clip=5.0), {}, {}),
    "gm_shared_clip5": ("groupmsa", dict(clip=5.0), {**GM, "fragment_proj": "shared", "gene_dropout": 0.0}, {}),
    "gm_pf_clip5": ("groupmsa", dict(clip=5.0), {**GM, "gene_dropout": 0.0}, {}),
    "gm_pf_gdrop0.2": ("groupmsa", dict(clip=5.0), {**GM, "gene_dropout": 0.2}, {}),
    "gm_pf_gdrop0.5": ("groupmsa", dict(clip=5.0), GM, {}),
    "gm_pf_gdrop0.7": ("groupmsa", dict(clip=5.0), {**GM, "gene_dropout": 0.7}, {}),
    "gm_pf_gdrop0.5_noclip": ("groupmsa", {}, GM, {}),
    "gm_pf_gdrop0.5_random": ("groupmsa", dict(clip=5.0, order="random"), GM, {}),
    "gm_pf_gdrop0.5_cluster": ("groupmsa", CL, GM, {}),
    "gm_cluster_fs64": ("groupmsa", CL, {**GM, "fragment_size": 64}, {}),
    "gm_cluster_g4": ("groupmsa", CL, {**GM, "num_groups": 4}, {}),
    "gm_cluster_shared": ("groupmsa", CL, {**GM, "fragment_proj": "shared"}, {}),
    "gm_cluster_lr1e-4": ("groupmsa", CL, GM, dict(lr=1e-4)),
    "snn_noclip": ("snn", {}, SNN, dict(lr=1e-4)),
    "snn_clip5": ("snn", dict(clip=5.0), SNN, dict(lr=1e-4)),
    "snn_clip5_lr3e-4": ("snn", dict(clip=5.0), SNN, {}),
    "snn_clip5_gdrop0.5": ("snn", dict(clip=5.0), {**SNN, "gene_dropout": 0.5}, dict(lr=1e-4)),
}


def evaluate(net, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    net.eval()
    with torch.no_grad():
        logits = net.classify(torch.from_numpy(x)).float()
    loss = F.cross_entropy(logits, torch.from_numpy(y)).item()
    return float((logits.argmax(-1).numpy() == y).mean()), binary_auc(y, logits.softmax(-1)[:, 1].numpy()), loss


def train_net(x, y, encoder, kwargs, *, num_epochs=30, lr=3e-4, weight_decay=1e-2, batch_size=32, seed=0) -> dict:
    torch.manual_seed(seed)
    net = build_gene_encoder(encoder, num_genes=x["train"].shape[1], num_classes=2, **kwargs)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(x["train"])
    total = num_epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    xt, yt = torch.from_numpy(x["train"]), torch.from_numpy(y["train"])
    gen = torch.Generator().manual_seed(seed)
    best = None
    for epoch in range(num_epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net.classify(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc, _, val_loss = evaluate(net, x["val"], y["val"])
        if best is None or (acc, -val_loss) > best[0]:
            best = ((acc, -val_loss), epoch, evaluate(net, x["test"], y["test"]))
    return dict(best_epoch=best[1], accuracy=best[2][0], auc=best[2][1])


def train_logreg(x, y, *, Cs=(0.001, 0.01, 0.1, 1.0), seed=0) -> dict:
    from sklearn.linear_model import LogisticRegression

    fits = [LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(x["train"], y["train"]) for c in Cs]
    scores = [m.score(x["val"], y["val"]) for m in fits]
    model = fits[int(np.argmax(scores))]  # ties: the smallest C (the notebook breaks them by validation loss)
    return dict(accuracy=model.score(x["test"], y["test"]), auc=binary_auc(y["test"], model.predict_proba(x["test"])[:, 1]))


def run_row(cohort, name: str) -> dict:
    model, transform, kwargs, train = ROWS[name]
    t0, rows = time.time(), []
    for seed in (0, 1):
        for fold, split in enumerate(kfold_splits(cohort, k=5, seed=seed)):
            gt = GeneTransform(transform="none", order_seed=seed, **transform).fit(cohort.genes.loc[split["train"]])
            x = {p: gt.transform(cohort.genes.loc[split[p]]) for p in ("train", "val", "test")}
            y = {p: np.asarray(cohort.labels_of(split[p])) for p in ("train", "val", "test")}
            res = train_logreg(x, y, seed=seed) if model == "logreg" else train_net(x, y, model, kwargs, seed=seed, **train)
            rows.append(dict(seed=seed, fold=fold, **res))
    df = pd.DataFrame(rows)
    by_seed = df.groupby("seed")[["accuracy", "auc"]].mean()
    return dict(row=name, model=model, transform=transform, kwargs=kwargs, train=train,
                accuracy=df.accuracy.mean(), auc=df.auc.mean(),
                accuracy_seed0=by_seed.accuracy[0], accuracy_seed1=by_seed.accuracy[1],
                auc_seed0=by_seed.auc[0], auc_seed1=by_seed.auc[1], accuracy_sd=df.accuracy.std(),
                seconds_per_training=(time.time() - t0) / len(df))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__)
        return 2
    torch.set_num_threads(1)
    cohort = load_cohort(argv[0], require=("genes",), verbose=False)
    for name in argv[2:] or list(ROWS):
        out = run_row(cohort, name)
        print(json.dumps(out, default=str), flush=True)
        with open(argv[1], "a") as fh:
            fh.write(json.dumps(out, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
