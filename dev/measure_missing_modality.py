"""Measure the missing-modality extension on the demo cohort (synthetic): accuracy of one model with
both modalities, image only and genes only, against models trained on one modality.

    PYTHONPATH=. OMP_NUM_THREADS=1 python dev/measure_missing_modality.py --workdir /tmp/mm --seeds 0 1 2

Settings are demo.yaml's (stages 02, 04, 05); writes ``<workdir>/missing_modality_e<epochs>_p<p>.json``
and a CSV (one row per seed, model and input).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from gimplib.data.cohort import load_cohort
from gimplib.data.datasets import BagDataset
from gimplib.data.splits import train_val_test_split
from gimplib.data.synthetic import generate_cohort
from gimplib.train import finetune, load_gene_transform, load_model, pretrain_gimp, train_gene_encoder
from gimplib.train.common import gene_matrix

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def accuracies(ckpt: Path, cohort, ids: list[str]) -> dict[str, float]:
    """Test accuracy of a fine-tuned classifier from both modalities, the image alone and the genes alone."""
    net, gt = load_model(ckpt), load_gene_transform(ckpt)
    data = BagDataset(cohort, ids, gene_matrix=gene_matrix(cohort, gt, ids) if gt is not None else None)
    modes = {"both": (True, True)}
    if hasattr(net, "missing_img"):
        modes.update(image_only=(True, False), genes_only=(False, True))
    elif not net.uses_genes:
        modes = {"image_only": (True, False)}
    hits = {m: 0 for m in modes}
    for i in range(len(data)):
        item = data[i]
        for m, (img, gen) in modes.items():
            feats = item["feats"][None] if img else None
            genes = item["genes"][None] if gen and "genes" in item else None
            logits = net(feats, None, genes)
            hits[m] += int(logits.argmax(-1).item() == int(item["y"]))
    return {m: h / len(data) for m, h in hits.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/missing_modality")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--modality-dropout", type=float, default=0.5)
    p.add_argument("--finetune-epochs", type=int, default=None, help="default: demo.yaml's 05_finetune num_epochs")
    args = p.parse_args()
    work = Path(args.workdir)
    params = yaml.safe_load((ROOT / "notebooks" / "params" / "demo.yaml").read_text())
    g, pre, ft = params["02_genes"], params["04_pretrain"], params["05_finetune"]
    folder = generate_cohort(work / "cohort", preset="demo", seed=0, progress=False)
    cohort = load_cohort(folder, verbose=False)
    rows = []
    for seed in args.seeds:
        split = train_val_test_split(cohort, seed=seed)
        run = work / f"seed_{seed}"
        common = dict(device="cpu", progress=False, seed=seed, n_boot=0)
        genes = train_gene_encoder(cohort, split, out_dir=run / "genes", num_epochs=g["num_epochs"],
                                   batch_size=g["batch_size"], lr=g["lr"],
                                   encoder_kwargs=dict(fragment_size=g["fragment_size"], num_groups=g["num_groups"],
                                                       embed_dim=g["embed_dim"], num_heads=g["num_heads"]), **common)
        pretrained = pretrain_gimp(cohort, split, out_dir=run / "pretrain", gene_encoder_ckpt=genes.checkpoint,
                                   model_kwargs=dict(embed_dim=pre["embed_dim"], num_heads=pre["num_heads"],
                                                     num_landmarks=pre["num_landmarks"],
                                                     decoder_hidden=pre["decoder_hidden"]),
                                   window_len=pre["window_len"], num_epochs=pre["num_epochs"],
                                   batch_size=pre["batch_size"], lr=pre["lr"], **common)
        epochs = args.finetune_epochs or ft["num_epochs"]
        kw = dict(pretrained_ckpt=pretrained.checkpoint, head_kwargs=dict(hidden=ft["hidden"]),
                  max_patches=ft["max_patches"], num_epochs=epochs, lr=ft["lr"], **common)
        tag = "" if epochs == ft["num_epochs"] else f"_e{epochs}"
        any_tag = tag + ("" if args.modality_dropout == 0.5 else f"_p{args.modality_dropout:g}")
        runs = {
            "paper (CLS_pat)": finetune(cohort, split, out_dir=run / f"ft_paper{tag}", **kw),
            f"modality dropout {args.modality_dropout:g}": finetune(cohort, split, out_dir=run / f"ft_any{any_tag}",
                                                                    modality_dropout=args.modality_dropout, **kw),
            "image only (CLS_img)": finetune(cohort, split, out_dir=run / f"ft_image{tag}", use_genes=False, **kw),
        }
        test = list(split["test"])
        for name, res in runs.items():
            for mode, acc in accuracies(res.checkpoint, cohort, test).items():
                rows.append({"seed": seed, "model": name, "input": mode, "accuracy": acc, "n_test": len(test)})
        rows.append({"seed": seed, "model": "genes only (GroupMSA)", "input": "genes_only",
                     "accuracy": genes.metrics["test_accuracy"], "n_test": len(test)})
        print(pd.DataFrame(rows).query("seed == @seed").to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    table["finetune_epochs"] = args.finetune_epochs or ft["num_epochs"]
    name = f"missing_modality_e{table['finetune_epochs'].iloc[0]}_p{args.modality_dropout:g}"
    table.to_csv(work / f"{name}.csv", index=False)
    summary = table.groupby(["model", "input"])["accuracy"].agg(["mean", "std", "count"]).reset_index()
    (work / f"{name}.json").write_text(json.dumps(summary.to_dict(orient="records"), indent=2))
    print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
