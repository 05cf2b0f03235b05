"""Fine-tuning variants on the demo comparison's own GiMP pre-training runs (3 seeds):
CLS_pat (the paper; frozen gene encoder) vs image-only (use_genes=False, the old behaviour)
vs CLS_pat with the gene encoder fine-tuned. Usage (from the repo root, after `make book`): .venv/bin/python dev/finetune_variants.py _build/workdir/demo"""
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from gimplib.data import load_cohort
from gimplib.data.bags import set_bag_cache
from gimplib.train import finetune
from gimplib.utils import load_json

work = Path(sys.argv[1])
params = yaml.safe_load(open("notebooks/params/demo.yaml"))["07_compare"]
set_bag_cache(2)
cohort = load_cohort(work / "01_data" / "cohort", verbose=False)
split = {k: v for k, v in load_json(work / "01_data" / "split.json").items() if k in ("train", "val", "test")}
out = {}
for name, kw in {"cls_pat_frozen": {}, "image_only": {"use_genes": False},
                 "cls_pat_tuned": {"freeze_gene_encoder": False}}.items():
    accs, aucs = [], []
    for seed in params["seeds"]:
        run = work / "07_compare" / "runs" / "gimp" / f"seed_{seed}"
        if name == "cls_pat_frozen":
            m = load_json(run / "metrics.json")
        else:
            m = finetune(cohort, split, pretrained_ckpt=run / "pretrain" / "checkpoint.pt",
                         out_dir=work / "variants" / name / f"seed_{seed}", input="bag",
                         max_patches=params["max_patches"], num_epochs=params["finetune_epochs"], lr=params["lr"],
                         seed=seed, device="cpu", progress=False, **kw).metrics
        accs.append(m["test_accuracy"]); aucs.append(m["test_auc"])
    out[name] = dict(acc=accs, auc=aucs, acc_mean=float(np.mean(accs)), acc_sd=float(np.std(accs, ddof=1)),
                     auc_mean=float(np.mean(aucs)))
print(json.dumps(out, indent=1))
