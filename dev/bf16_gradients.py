"""bf16 autocast against fp32 for one GiMP pretraining step at paper shapes (CPU): loss and
per-parameter relative gradient error, same masks, dropout off. Usage (repo root):
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python dev/bf16_gradients.py [cpu|cuda]"""
import statistics
import sys

import torch

from gimplib.models import GiMP, GroupMSA, random_patch_mask
from gimplib.utils import seed_everything

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
seed_everything(0)
model = GiMP(in_dim=1024, embed_dim=512, gene_encoder=GroupMSA(num_genes=60480, embed_dim=512, num_classes=2),
             num_heads=8, num_landmarks=256).to(device).eval()  # eval: dropout off, the same step twice
feats = torch.rand(2, 6000, 1024, device=device)
genes = torch.randn(2, 60480, device=device)
y = torch.tensor([0, 1], device=device)
mpm = random_patch_mask(torch.ones(2, 6000, dtype=torch.bool, device=device), 0.5,
                        torch.Generator(device=device).manual_seed(0))
res = {}
for amp in ("fp32", "bf16"):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        out = model(feats, None, genes, y, mpm_mask=mpm)
    out["loss"].backward()
    res[amp] = ({k: v.item() for k, v in out.items()},
                {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None})
    print(amp, res[amp][0])
errs = sorted((((res["bf16"][1][n] - g).norm() / g.norm()).item(), n) for n, g in res["fp32"][1].items() if g.norm() > 0)
print(f"relative gradient error over {len(errs)} parameters: median {statistics.median(e for e, _ in errs):.4f}")
for e, n in errs[-5:]:
    print(f"  {n}: {e:.3f}")
