"""Attention-vs-tumour AUC per test slide of the demo build's fine-tuned GiMP (synthetic)."""
import sys, json
import numpy as np, pandas as pd, torch

from gimplib.data import load_cohort
from gimplib.data.bags import read_bag
from gimplib.data.synthetic import tumour_masks
from gimplib.metrics import attention_tumour_aucs
from gimplib.train import load_model, load_gene_transform
from gimplib import plots
work = sys.argv[1] if len(sys.argv) > 1 else "_build/workdir/demo"
cohort_dir = f"{work}/01_data/cohort"
cohort = load_cohort(cohort_dir, verbose=False)
split = json.load(open(f"{work}/01_data/split.json"))
clf = load_model(f"{work}/05_finetune/gimp/best.pt", device="cpu")
tr = load_gene_transform(f"{work}/05_finetune/gimp/best.pt") if clf.uses_genes else None
slides = cohort.slides[cohort.slides["case_id"].isin(split["test"])]
masks = tumour_masks(cohort_dir, list(slides["slide_id"]))
attention = {}
for row in slides.itertuples():
    bag = read_bag(row.path)
    genes = torch.from_numpy(tr.transform(cohort.genes.loc[[row.case_id]])) if tr is not None else None
    with torch.no_grad():
        _, attn = clf(torch.from_numpy(bag.feats)[None], genes=genes, return_attn=True)
    attention[row.slide_id] = attn[0].numpy()
rec = pd.DataFrame(attention_tumour_aucs(attention, masks))
print(rec.describe().to_string())
print("median AUC", rec.auc.median(), "slides", len(rec), "AUC>0.5:", (rec.auc > 0.5).mean())
label = dict(zip(slides["slide_id"], cohort.cases.loc[slides["case_id"], "label"]))
out = f"{work}/attention_tumour_auc.png"  # beside the build it measured, not in the repository
plots.plot_attention_tumour_auc(rec, label=label).savefig(out, dpi=90)
print("figure:", out)
