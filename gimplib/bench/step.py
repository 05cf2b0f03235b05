"""``python -m gimplib.bench step``: one GiMP pretraining step at the paper's shapes.

A mini-batch of 2 windows of 6,000 patches x 1024 features, aggregator width d = 512
(8 heads, 256 landmarks), MPM at 50 % and the triplet loss on ``concat(CLS_img, CLS_ge)``
with a frozen GroupMSA (d = 512) over 60,480 genes. Reports:

* forward+backward wall seconds (median of ``--repeats`` steps after ``--warmup`` steps),
  process CPU seconds (all threads) and peak memory of a step (see :class:`gimplib.bench.slide.PeakMemory`);
* FLOPs of one forward+backward counted with ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions and attention kernels; element-wise work is not counted);
* this machine's fp32 matmul throughput measured in the same run (square matmuls of
  ``--matmul-size``), and the achieved fraction ``FLOPs / seconds / throughput``;
* the same step with the aggregator composed directly from ``nystrom-attention``,
  TransMIL-style (Linear + ReLU, CLS, two ``x + NystromAttention(LayerNorm(x))`` layers
  called without a mask, LayerNorm), and the time ratio gimplib / reference.

With 2 windows, a batch holds no valid triplet when the labels differ (the loss is then an
exact 0), but the triplet path -- frozen gene encoder, concatenation, distances -- runs
and is timed all the same.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from nystrom_attention import NystromAttention
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from gimplib.bench.slide import PeakMemory
from gimplib.losses import masked_l1, triplet_loss
from gimplib.models import GiMP, GroupMSA, random_patch_mask
from gimplib.utils import get_device, seed_everything

__all__ = ["ReferenceAggregator", "matmul_throughput", "run"]


class ReferenceAggregator(nn.Module):
    """The aggregator composed directly from ``nystrom-attention`` as TransMIL does (no masks)."""

    def __init__(self, *, in_dim: int, embed_dim: int, depth: int, num_heads: int, num_landmarks: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(depth)])
        self.attns = nn.ModuleList(
            [
                NystromAttention(
                    dim=embed_dim,
                    dim_head=embed_dim // num_heads,
                    heads=num_heads,
                    num_landmarks=num_landmarks,
                    pinv_iterations=6,
                    residual=True,
                    dropout=0.1,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(b, n, d) projected tokens -> CLS (b, d), tokens (b, n, d)."""
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        x = self.norm(x)
        return x[:, 0], x[:, 1:]


def matmul_throughput(device: torch.device, size: int = 2048, min_seconds: float = 1.0) -> float:
    """Measured fp32 matmul throughput of ``device`` in FLOP/s (square ``size`` matmuls)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    _sync(device)
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 2 * size**3 * reps / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(step: Callable[[], Tensor], device: torch.device, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        step().backward()
    times, cpu_times = [], []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step().backward()
            _sync(device)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    with FlopCounterMode(display=False) as counter:
        step().backward()
    return {
        "seconds": round(statistics.median(times), 4),
        "seconds_all": [round(t, 4) for t in times],
        "cpu_seconds": round(statistics.median(cpu_times), 4),
        "peak_gib": round(mem.peak_gib, 3),
        "start_gib": round(mem.start_gib, 3),
        "flops": int(counter.get_total_flops()),
    }


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run the benchmark; returns the JSON-able result."""
    parser = argparse.ArgumentParser(prog="python -m gimplib.bench step", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--windows", type=int, default=2, help="windows per mini-batch")
    parser.add_argument("--window-len", type=int, default=6000)
    parser.add_argument("--in-dim", type=int, default=1024)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-landmarks", type=int, default=256)
    parser.add_argument("--genes", type=int, default=60_480)
    parser.add_argument("--gene-embed-dim", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-seconds", type=float, default=2.0, help="how long to time the matmuls")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference composition")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    seed_everything(args.seed)
    device = get_device(args.device)
    b, n = args.windows, args.window_len
    gene_encoder = GroupMSA(num_genes=args.genes, embed_dim=args.gene_embed_dim, num_classes=2)
    model = GiMP(
        in_dim=args.in_dim,
        embed_dim=args.embed_dim,
        gene_encoder=gene_encoder,
        num_heads=args.num_heads,
        num_landmarks=args.num_landmarks,
    ).to(device).train()
    feats = torch.rand(b, n, args.in_dim, device=device)  # CLAM features are non-negative
    genes = torch.randn(b, args.genes, device=device)
    y = torch.arange(b, device=device) % 2

    def gimp_step() -> Tensor:
        model.zero_grad(set_to_none=True)
        return model.pretrain_step(feats, None, genes, y)["loss"]

    result = {
        "benchmark": "step",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "shapes": {"windows": b, "window_len": n, "in_dim": args.in_dim, "embed_dim": args.embed_dim, "genes": args.genes},
        "gimplib": _measure(gimp_step, device, args.warmup, args.repeats),
    }

    if not args.no_reference:
        reference = ReferenceAggregator(
            in_dim=args.in_dim, embed_dim=args.embed_dim, depth=2, num_heads=args.num_heads, num_landmarks=args.num_landmarks
        ).to(device).train()
        # the same MPM + triplet step around it: mask token, decoder and frozen encoder from the GiMP model
        valid = torch.ones(b, n, dtype=torch.bool, device=device)

        def reference_step() -> Tensor:
            reference.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            tokens = reference.proj(feats)
            mpm = random_patch_mask(valid, model.mask_ratio)
            tokens = torch.where(mpm[..., None], model.mask_token, tokens)
            cls, out = reference(tokens)
            loss_rec = masked_l1(model.decoder(out), feats, mpm)
            with torch.no_grad():
                cls_ge = model.gene_encoder(genes)
            emb = torch.cat([nn.functional.normalize(cls, dim=-1), nn.functional.normalize(cls_ge, dim=-1)], -1)
            return loss_rec + triplet_loss(emb, y, margin=model.margin)

        result["reference"] = _measure(reference_step, device, args.warmup, args.repeats)
        result["time_ratio_gimplib_over_reference"] = round(
            result["gimplib"]["seconds"] / result["reference"]["seconds"], 3
        )

    throughput = matmul_throughput(device, args.matmul_size, args.matmul_seconds)
    result["matmul_fp32_gflops"] = round(throughput / 1e9, 2)
    for key in ("gimplib", "reference"):
        if key in result:
            achieved = result[key]["flops"] / result[key]["seconds"]
            result[key]["achieved_gflops"] = round(achieved / 1e9, 2)
            result[key]["achieved_fraction_of_matmul"] = round(achieved / throughput, 3)
    return result
