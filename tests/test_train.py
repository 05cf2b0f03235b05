"""gimplib.train: the generic engine (resume, NaN guard, config checks, accumulation) and the
task functions on the synthetic smoke cohort (overfit through each path, gene-only k-fold CV)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gimplib.train.engine import (
    ConfigMismatchError,
    NonFiniteLossError,
    cosine_schedule,
    fit,
    load_checkpoint,
)
from gimplib.utils import seed_everything

# --------------------------------------------------------------------------- engine on a toy task


class _Points(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, poison: int | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, 0] - self.x[:, 2] > 0).long()
        if poison is not None:
            self.x[poison] = float("nan")
        self.epochs_seen: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}

    def set_epoch(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)


def _toy_model(dropout: float = 0.2) -> nn.Module:
    seed_everything(0, deterministic=True)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))


def _step(model: nn.Module, batch: dict) -> dict:
    logits = model(batch["x"])
    # a random draw inside the step: resumption must restore the torch RNG for it to match
    noise = 1e-3 * torch.randn(())
    return {"loss": nn.functional.cross_entropy(logits, batch["y"]) + noise, "noise": noise}


def _eval(model: nn.Module) -> dict:
    data = _Points()
    logits = model(data.x)
    return {"val_accuracy": float((logits.argmax(1) == data.y).float().mean()),
            "val_loss": float(nn.functional.cross_entropy(logits, data.y))}


def _fit(out_dir, model=None, data=None, **kw):
    args = dict(step_fn=_step, out_dir=out_dir, config={"task": "toy", "lr": 1e-2}, num_epochs=6, lr=1e-2,
                batch_size=8, device="cpu", seed=3, eval_fn=_eval, select="val_accuracy", progress=False)
    args.update(kw)
    return fit(model if model is not None else _toy_model(), data if data is not None else _Points(), **args)


class _Kill(Exception):
    pass


def test_kill_and_resume_is_bit_exact(tmp_path):
    whole = _fit(tmp_path / "whole")

    def kill_after_epoch_2(epoch, row):
        if epoch == 2:
            raise _Kill

    with pytest.raises(_Kill):
        _fit(tmp_path / "killed", callbacks=[kill_after_epoch_2])
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 2
    # a fresh process would build a fresh model (other init) and a fresh dataset
    seed_everything(123)
    data = _Points()
    fresh = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    resumed = _fit(tmp_path / "killed", model=fresh, data=data)
    assert data.epochs_seen == [3, 4, 5]  # only the missing epochs ran
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), f"resumed run differs at {k}"
    pd.testing.assert_frame_equal(whole.history.drop(columns="time_s"), resumed.history.drop(columns="time_s"))
    csv = pd.read_csv(tmp_path / "killed" / "metrics.csv")
    assert list(csv["epoch"]) == list(range(6))
    assert resumed.best["epoch"] == whole.best["epoch"]
    best = load_checkpoint(tmp_path / "killed" / "best.pt")
    assert best["epoch"] == whole.best["epoch"]
    # training really happened
    assert whole.history["val_accuracy"].iloc[-1] > 0.7


def test_finished_run_is_not_retrained(tmp_path):
    _fit(tmp_path)
    data = _Points()
    again = _fit(tmp_path, data=data)
    assert data.epochs_seen == [] and len(again.history) == 6


def test_config_mismatch_names_both_values(tmp_path):
    _fit(tmp_path, num_epochs=1)
    with pytest.raises(ConfigMismatchError, match=r"lr: saved 0\.01 vs requested 0\.001") as err:
        _fit(tmp_path, num_epochs=1, config={"task": "toy", "lr": 1e-3})
    assert "checkpoint.pt" in str(err.value)
    with pytest.raises(ConfigMismatchError, match="task"):
        load_checkpoint(tmp_path / "checkpoint.pt", expected_config={"task": "other", "lr": 1e-2})


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    _fit(tmp_path, num_epochs=2)  # two good epochs
    good = load_checkpoint(tmp_path / "checkpoint.pt")
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 \(0-based\), step \d+ .*last good checkpoint .*epoch 1"):
        _fit(tmp_path, num_epochs=4, data=_Points(poison=5), config={"task": "toy", "lr": 1e-2},
             # same config as the good run: the engine resumes, then meets the poisoned sample
             )
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["epoch"] == 1
    for k in good["model"]:
        assert torch.equal(good["model"][k], after["model"][k])


def test_gradient_accumulation_matches_large_batch(tmp_path):
    def plain_step(model, batch):
        return {"loss": nn.functional.cross_entropy(model(batch["x"]), batch["y"])}

    kw = dict(step_fn=plain_step, eval_fn=None, select=None, num_epochs=2)
    big = _fit(tmp_path / "big", model=_toy_model(0.0), batch_size=16, **kw)
    acc = _fit(tmp_path / "acc", model=_toy_model(0.0), batch_size=4, accumulate=4, **kw)
    # 48 samples: 3 optimiser steps of 16 either way (the step count drives the schedule too)
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # an uneven tail (48 = 5 * 9 + 3) is averaged over its own size, not the nominal one
    odd = _fit(tmp_path / "odd", model=_toy_model(0.0), batch_size=9, accumulate=2, **kw)
    assert math.isfinite(odd.history["train_loss"].iloc[-1])


def test_cosine_schedule_with_warmup():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_schedule(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at its peak
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


# --------------------------------------------------------------------------- tasks on the smoke cohort

TINY_GENES = dict(encoder_kwargs=dict(fragment_size=32, num_groups=4, embed_dim=32, num_heads=2, dropout=0.0))
TINY_AGG = dict(embed_dim=64, depth=2, num_heads=4, num_landmarks=16, dropout=0.0)
FAST = dict(device="cpu", progress=False, n_boot=50, seed=0)


def _train_accuracy(ckpt, cohort, ids, kind):
    """Accuracy of a saved model on the TRAINING cases, in eval mode."""
    from gimplib.data.datasets import BagDataset
    from gimplib.train import load_gene_transform, load_model

    model = load_model(ckpt)
    y = cohort.cases.loc[ids, "y"].to_numpy()
    with torch.no_grad():
        if kind == "genes":
            genes = torch.from_numpy(load_gene_transform(ckpt).transform(cohort.genes.loc[ids]))
            pred = model.classify(genes).argmax(1).numpy()
        else:  # a GiMPClassifier: image + genes when it has a gene encoder
            gt = load_gene_transform(ckpt) if model.uses_genes else None
            data = BagDataset(cohort, ids, gene_matrix=None if gt is None else gt.transform(cohort.genes.loc[ids]))
            items = (data[i] for i in range(len(data)))
            pred = np.array([model(d["feats"][None], d["mask"][None], genes=d["genes"][None] if gt else None)
                             .argmax(1).item() for d in items])
    return float((pred == y).mean())


def test_overfit_gene_only(smoke, tmp_path):
    from gimplib.train import train_gene_encoder

    cohort, split = smoke
    res = train_gene_encoder(cohort, split, out_dir=tmp_path, num_epochs=25, lr=1e-3, batch_size=8,
                             **TINY_GENES, **FAST)
    assert _train_accuracy(tmp_path / "checkpoint.pt", cohort, split["train"], "genes") == 1.0
    assert res.history["train_loss"].iloc[-1] < 0.5 * res.history["train_loss"].iloc[0]
    for key in ("best_epoch", "val_accuracy", "test_accuracy", "test_auc", "test_f1", "test_accuracy_ci_low"):
        assert key in res.metrics
    preds = res.predictions
    assert set(preds["split"]) == {"val", "test"} and len(preds) == len(split["val"]) + len(split["test"])
    assert set(preds["case_id"][preds["split"] == "test"]) == set(split["test"])


def test_overfit_image_only_and_run_reuse(smoke, tmp_path):
    from gimplib.train import finetune

    cohort, split = smoke
    kw = dict(out_dir=tmp_path, aggregator_kwargs=TINY_AGG, head_kwargs=dict(hidden=32, dropout=0.0),
              num_epochs=14, lr=1e-3, **FAST)
    res = finetune(cohort, split, **kw)
    assert _train_accuracy(tmp_path / "checkpoint.pt", cohort, split["train"], "bag") == 1.0
    assert 0 <= res.metrics["best_epoch"] < 14
    # a finished run is reused, not retrained ...
    stamp = (tmp_path / "best.pt").stat().st_mtime_ns
    again = finetune(cohort, split, **kw)
    assert (tmp_path / "best.pt").stat().st_mtime_ns == stamp and again.metrics == res.metrics
    # ... a different config in the same folder is refused, naming the key
    with pytest.raises(ConfigMismatchError, match="lr: saved 0.001 vs requested 0.002"):
        finetune(cohort, split, **{**kw, "lr": 2e-3})
    with pytest.raises(TypeError, match="unexpected keyword"):
        finetune(cohort, split, **{**kw, "learning_rate": 2e-3})


def test_overfit_gimp_pretrain_then_finetune(smoke, tmp_path):
    from gimplib.models.gimp import GiMPClassifier
    from gimplib.train import embed, finetune, load_model, pretrain_gimp, train_gene_encoder

    cohort, split = smoke
    genes = train_gene_encoder(cohort, split, out_dir=tmp_path / "genes", num_epochs=5, lr=1e-3, batch_size=8,
                               **TINY_GENES, **FAST)
    pre = pretrain_gimp(cohort, split, out_dir=tmp_path / "pre", gene_encoder_ckpt=genes.checkpoint,
                        model_kwargs=dict(TINY_AGG, decoder_hidden=64), window_len=64, num_epochs=4, batch_size=6,
                        lr=1e-3, **FAST)
    hist = pre.history
    assert {"train_loss", "train_loss_tri", "train_loss_rec", "val_loss"} <= set(hist.columns)
    assert hist["train_loss_rec"].iloc[-1] < hist["train_loss_rec"].iloc[0]  # MPM learns
    # the frozen gene encoder is untouched by pretraining
    gimp = load_model(pre.checkpoint)
    encoder = load_model(genes.checkpoint)
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, gimp.gene_encoder.state_dict()[k]), k
    # the model's own keys: the models' helper reads our checkpoint directly
    GiMPClassifier.from_pretrained(pre.checkpoint, num_classes=2, num_landmarks=16, num_heads=4)

    ft = finetune(cohort, split, out_dir=tmp_path / "ft", pretrained_ckpt=pre.checkpoint,
                  head_kwargs=dict(hidden=32, dropout=0.0), num_epochs=14, lr=1e-3, **FAST)
    assert _train_accuracy(tmp_path / "ft" / "checkpoint.pt", cohort, split["train"], "bag") == 1.0
    assert ft.config["pretrained"]["ckpt"] == str(pre.checkpoint)
    assert ft.config["gene_encoder"]["encoder"] == "groupmsa" and ft.config["freeze_gene_encoder"] is True

    # the fine-tuned model is the paper's image-omic classifier on CLS_pat = concat(CLS_img, CLS_ge)
    clf = load_model(ft.checkpoint)
    assert clf.uses_genes and clf.head.net[0].in_features == TINY_AGG["embed_dim"] + 32
    for k, v in encoder.state_dict().items():  # frozen by default: the gene encoder is the pre-trained one
        assert torch.equal(v, clf.gene_encoder.state_dict()[k]), k

    ids = split["test"]
    z = embed(ft.checkpoint, cohort, ids, device="cpu", progress=False)
    assert z.shape == (len(ids), TINY_AGG["embed_dim"] + 32) and np.isfinite(z).all()
    zp = embed(pre.checkpoint, cohort, ids, device="cpu", progress=False)  # CLS_pat after pre-training (Fig. 2)
    assert zp.shape == (len(ids), TINY_AGG["embed_dim"] + 32)
    np.testing.assert_allclose(np.linalg.norm(zp, axis=1), np.sqrt(2), rtol=1e-5)  # two L2-normalised halves
    zg = embed(genes.checkpoint, cohort, ids, device="cpu", progress=False)
    assert zg.shape == (len(ids), 32)


def test_finetuned_gimp_reads_each_patients_expression(smoke, tmp_path):
    """Done-when of the fidelity issue: the head's input is d_img + d_ge, a case's expression changes
    its logits, and a case without expression is refused by name."""
    import dataclasses

    from gimplib.data.datasets import BagDataset
    from gimplib.train import finetune, load_gene_transform, load_model, pretrain_gimp, train_gene_encoder
    from gimplib.utils import DataError

    cohort, split = smoke
    genes = train_gene_encoder(cohort, split, out_dir=tmp_path / "genes", num_epochs=1, **TINY_GENES, **FAST)
    pre = pretrain_gimp(cohort, split, out_dir=tmp_path / "pre", gene_encoder_ckpt=genes.checkpoint,
                        model_kwargs=dict(TINY_AGG, decoder_hidden=16), window_len=32, num_epochs=1, batch_size=6,
                        **FAST)
    ft = finetune(cohort, split, out_dir=tmp_path / "ft", pretrained_ckpt=pre.checkpoint, num_epochs=1, **FAST)
    clf = load_model(ft.checkpoint)
    assert clf.head.net[0].in_features == clf.aggregator.embed_dim + clf.gene_encoder.embed_dim == 64 + 32

    case = split["test"][0]
    gt = load_gene_transform(ft.checkpoint)
    item = BagDataset(cohort, [case], gene_matrix=gt.transform(cohort.genes.loc[[case]]))[0]
    with torch.no_grad():
        logits = clf(item["feats"][None], item["mask"][None], genes=item["genes"][None])
        other = clf(item["feats"][None], item["mask"][None], genes=item["genes"][None] + 2.0)
        assert not torch.allclose(logits, other)  # the expression reaches the prediction
        with pytest.raises(ValueError, match="needs the patients' expression"):
            clf(item["feats"][None], item["mask"][None])

    # a case of the split without expression is named before anything trains
    no_genes = dataclasses.replace(cohort, genes=cohort.genes.drop(index=case))
    with pytest.raises(DataError, match=case):
        finetune(no_genes, split, out_dir=tmp_path / "ft2", pretrained_ckpt=pre.checkpoint, num_epochs=1, **FAST)
    assert not (tmp_path / "ft2" / "best.pt").exists()

    # fine-tuning the gene encoder too is an option; the frozen default leaves it as pre-trained
    ft3 = finetune(cohort, split, out_dir=tmp_path / "ft3", pretrained_ckpt=pre.checkpoint, num_epochs=1,
                   freeze_gene_encoder=False, lr=1e-2, **FAST)
    tuned, frozen = load_model(ft3.checkpoint).gene_encoder, clf.gene_encoder
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), frozen.state_dict().values()))


@pytest.fixture(scope="module")
def genes_only(tmp_path_factory):
    """A genes-only cohort (dataset.csv + genes.parquet, no slides): the smoke preset with 60 patients."""
    import shutil

    from gimplib.data.cohort import load_cohort
    from gimplib.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("genes_only")
    full = generate_cohort(root / "full", preset="smoke", seed=0, n_patients=60, progress=False)
    (root / "genes").mkdir()
    for name in ("dataset.csv", "genes.parquet"):
        shutil.copy(full / name, root / "genes" / name)
    cohort = load_cohort(root / "genes", require=("genes",), verbose=False)
    assert not cohort.has_slides
    return cohort


def test_gene_only_kfold_beats_chance(genes_only, tmp_path):
    from gimplib.data.splits import kfold_splits
    from gimplib.metrics import classification_metrics
    from gimplib.train import kfold, train_gene_encoder

    cohort = genes_only
    folds = kfold_splits(cohort, k=3, seed=0)
    results, summary = kfold(train_gene_encoder, cohort, folds, out_dir=tmp_path, num_epochs=20, lr=1e-3,
                             batch_size=8, **TINY_GENES, **FAST)
    assert len(results) == 3 and list(summary.index) == ["fold_0", "fold_1", "fold_2", "mean", "sd"]
    accs = [r.metrics["test_accuracy"] for r in results]
    assert summary.loc["mean", "test_accuracy"] == pytest.approx(np.mean(accs))
    assert summary.loc["sd", "test_accuracy"] == pytest.approx(np.std(accs, ddof=1))
    oof = pd.concat([r.predictions.query("split == 'test'") for r in results])
    assert sorted(oof["case_id"]) == sorted(cohort.cases.index)  # every patient tested exactly once
    # pooled out-of-fold predictions beat chance (0.5) with 95% bootstrap confidence
    pooled = classification_metrics(oof["y"].to_numpy(), oof[["prob_0", "prob_1"]].to_numpy(), n_boot=500)
    assert pooled["accuracy_ci_low"] > 0.5 and pooled["auc"] > 0.7, pooled
    assert (tmp_path / "summary.csv").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["n_folds"] == 3


def test_baselines_train(smoke, tmp_path):
    from gimplib.train import load_model, train_baseline

    cohort, split = smoke
    for name, kwargs in (("abmil", dict(embed_dim=32, attn_dim=16)), ("porpoise", dict(embed_dim=16))):
        res = train_baseline(name, cohort, split, out_dir=tmp_path / name, model_kwargs=kwargs, num_epochs=2,
                             lr=1e-3, **FAST)
        assert 0.0 <= res.metrics["test_accuracy"] <= 1.0
        assert type(load_model(res.checkpoint)).__name__.lower() == name
    with pytest.raises(ValueError, match="pretrain_baseline"):
        train_baseline("biovil", cohort, split, out_dir=tmp_path / "wrong", num_epochs=1, **FAST)


def test_pretraining_baseline_then_finetune(smoke, tmp_path):
    from gimplib.train import embed, finetune, load_model, pretrain_baseline

    cohort, split = smoke
    model_kwargs = dict(embed_dim=32, depth=1, num_heads=2, num_landmarks=8, proj_dim=16,
                        gene_cfg=dict(fragment_size=32, num_groups=4, embed_dim=32, num_heads=2))
    pre = pretrain_baseline("biovil", cohort, split, out_dir=tmp_path / "pre", model_kwargs=model_kwargs,
                            window_len=32, num_epochs=2, batch_size=6, lr=1e-3, **FAST)
    assert {"train_loss", "val_loss"} <= set(pre.history.columns) and math.isfinite(pre.metrics["train_loss"])
    assert type(load_model(pre.checkpoint)).__name__ == "BioViLStyle"
    z = embed(pre.checkpoint, cohort, split["test"], device="cpu", progress=False)
    assert z.shape == (len(split["test"]), 32 + 32)  # CLS_pat after pre-training
    ft = finetune(cohort, split, out_dir=tmp_path / "ft", pretrained_ckpt=pre.checkpoint, num_epochs=1, **FAST)
    assert ft.config["aggregator_kwargs"]["embed_dim"] == 32 and 0 <= ft.metrics["test_accuracy"] <= 1
    # like GiMP, the pre-training baselines are fine-tuned on image + genes (Table 1's pre-training block)
    assert ft.config["gene_encoder"]["encoder"] == "groupmsa" and load_model(ft.checkpoint).uses_genes


def test_cli_gene_run(smoke, tmp_path, capsys):
    import json

    from gimplib.train import main

    cohort, _ = smoke
    argv = ["genes", "--data-dir", str(cohort.data_dir), "--out", str(tmp_path), "--num-epochs", "2",
            "--device", "cpu", "--no-progress", "--set", "encoder=snn", "--set", "encoder_kwargs.embed_dim=16",
            "--set", "n_boot=10"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "metrics.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text())["encoder_kwargs"] == {"embed_dim": 16}
    # another config in the same folder: a clear error, exit code 1
    assert main(argv[:-1] + ["n_boot=20"]) == 1
    assert "n_boot: saved 10 vs requested 20" in capsys.readouterr().err


def test_pretraining_kill_and_resume_matches_uninterrupted(smoke, tmp_path):
    """Random windows and random MPM masks: a resumed run must still match bit for bit."""
    from gimplib.train import load_checkpoint, pretrain_gimp

    cohort, split = smoke
    kw = dict(model_kwargs=dict(TINY_AGG, decoder_hidden=32), window_len=32, num_epochs=3, batch_size=6, lr=1e-3,
              deterministic=True, **FAST)
    whole = pretrain_gimp(cohort, split, out_dir=tmp_path / "whole", **kw)

    def kill(epoch, row):
        if epoch == 0:
            raise _Kill

    with pytest.raises(_Kill):
        pretrain_gimp(cohort, split, out_dir=tmp_path / "killed", callbacks=[kill], **kw)
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = pretrain_gimp(cohort, split, out_dir=tmp_path / "killed", **kw)
    a = load_checkpoint(whole.checkpoint)["model"]
    b = load_checkpoint(resumed.checkpoint)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed pretraining differs at {k}"
    assert resumed.metrics == whole.metrics


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GIMP_PAPER_SCALE") != "1",
                    reason="paper-scale memory check (about 1-2 min, ~4 GiB); set GIMP_PAPER_SCALE=1 to run")
def test_paper_scale_window_trains_one_step(tmp_path):
    """3 windows of 6,000 x 1024 + a frozen GroupMSA over 60,480 genes: one step through fit, on CPU."""
    import resource

    from gimplib.models.gimp import GiMP
    from gimplib.models.groupmsa import GroupMSA
    from gimplib.train.inference import Task

    n, dim, num_genes, b = 6000, 1024, 60_480, 3

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return b

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"feats": torch.rand(n, dim, generator=g), "mask": torch.ones(n, dtype=torch.bool),
                    "genes": torch.randn(num_genes, generator=g), "y": torch.tensor(int(i >= b // 2))}

    torch.manual_seed(0)
    net = GiMP(in_dim=dim, embed_dim=512, gene_encoder=GroupMSA(num_genes=num_genes, num_classes=2))
    res = fit(Task(net, "pretrain"), Windows(), step_fn=lambda m, batch: m(batch), out_dir=tmp_path,
              config={"paper_scale": 1}, num_epochs=1, batch_size=b, device="cpu", progress=False)
    row = res.history.iloc[0]
    assert math.isfinite(row["train_loss"]) and row["train_loss_tri"] > 0 and row["train_loss_rec"] > 0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gib < 8, f"peak RSS {peak_gib:.2f} GiB"


def test_terminal_progress_draws_bars_on_the_real_stderr_only(tmp_path, monkeypatch, capfd):
    """The book runner sets GIMPLIB_TERMINAL_PROGRESS for its kernels: with progress off (so the
    notebook, and the book, show no bar text) the epochs still advance on the terminal's stderr."""
    import sys

    from gimplib.train.engine import TERMINAL_PROGRESS

    monkeypatch.setenv(TERMINAL_PROGRESS, "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")  # as in the runner's kernels
    monkeypatch.setattr(sys, "stderr", __import__("io").StringIO())  # what a notebook cell would capture
    _fit(tmp_path / "on", num_epochs=2, desc="toy")
    assert sys.stderr.getvalue() == ""  # nothing in the notebook's output
    assert "toy 2/2" in capfd.readouterr().err  # the bar went to the process's own stderr
    monkeypatch.delenv(TERMINAL_PROGRESS)
    _fit(tmp_path / "off", num_epochs=2, desc="toy")
    assert "toy" not in capfd.readouterr().err
