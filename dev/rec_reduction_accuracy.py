"""GiMP (the comparison's gimp recipe) pre-trained with rec_reduction "mean" vs "sum" on the demo, 3 seeds.

Usage (from the repo root, after `make book`): .venv/bin/python dev/rec_reduction_accuracy.py
Runs go to /tmp/recred/<reduction>/; the sum runs reproduce the book's GiMP row."""
import json, dataclasses
from pathlib import Path
import numpy as np, yaml
from gimplib.data import load_cohort
from gimplib.data.bags import set_bag_cache
from gimplib.train.compare import Job, SweepConfig, run_recipe
from gimplib.utils import load_json

work = Path("_build/workdir/demo")
p = {**yaml.safe_load(open("notebooks/params/demo.yaml"))["07_compare"]}
keys = {f.name for f in dataclasses.fields(SweepConfig)}
cfg = SweepConfig(**{k: v for k, v in p.items() if k in keys}, device="cpu", progress=False)
set_bag_cache(2)
cohort = load_cohort(work / "01_data" / "cohort", verbose=False)
split = {k: v for k, v in load_json(work / "01_data" / "split.json").items() if k in ("train", "val", "test")}
out = {}
for red in ("mean", "sum"):
    c = dataclasses.replace(cfg, rec_reduction=red)
    accs, aucs, rec = [], [], []
    for s in p["seeds"]:
        gene = work / "07_compare" / "runs" / "genes_groupmsa" / f"seed_{s}" / "best.pt"
        d = run_recipe(Job("gimp", s), cohort, split, out_root=Path("/tmp/recred") / red, config=c, gene_ckpt=gene)
        m = load_json(d / "metrics.json"); pm = load_json(d / "pretrain" / "metrics.json")
        accs.append(m["test_accuracy"]); aucs.append(m["test_auc"]); rec.append(pm.get("val_rec_l1"))
    out[red] = dict(acc=accs, acc_mean=float(np.mean(accs)), acc_sd=float(np.std(accs, ddof=1)),
                    auc_mean=float(np.mean(aucs)), val_rec_l1=rec, window_mean=pm.get("val_ref_window_mean"))
print(json.dumps(out, indent=1))
