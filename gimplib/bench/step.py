"""``python -m gimplib.bench step``: one GiMP pretraining step at the paper's shapes.

A mini-batch of 2 windows of 6,000 patches x 1024 features, aggregator width d = 512
(8 heads, 256 landmarks), MPM at 50 % and the triplet loss on ``concat(CLS_img, CLS_ge)``
with a frozen GroupMSA (d = 512) over 60,480 genes. Reports:

* forward+backward wall seconds (median of ``--repeats`` steps after ``--warmup`` steps;
  the gimplib and reference steps alternate, so load from other processes falls on both),
  process CPU seconds (all threads) and peak memory of a step (see :class:`gimplib.bench.slide.PeakMemory`);
* FLOPs of one forward+backward counted with ``torch.utils.flop_counter.FlopCounterMode``
  on the path that actually runs (matmuls, convolutions and attention kernels; element-wise
  work is not counted; rows the library skips, such as the decoder on visible positions,
  are not counted as done). A fused attention kernel ``softmax(Q K^T) V`` counts the useful
  work of its two products, 2 in forward and 4 in backward, as the same products written
  out do; the score matrix its backward recomputes is not counted (torch's own table
  counts it on CUDA and does not know the CPU kernel at all, see :data:`USEFUL_FLOPS`); the
  residual convolution, which the library runs as block-Toeplitz products (about 1.9 times
  a convolution's multiply-adds), counts as the convolution it is (forward and its two
  gradients; the excess, measured on the library's function at the step's shape, is
  reported as ``flops_residual_conv_excess`` and left out of ``flops``);
* this machine's fp32 matmul throughput measured in the same run (square matmuls of
  ``--matmul-size``, before and after the steps, the higher of the two; bf16 matmuls with
  ``--amp bf16``, which runs both steps' forwards under bf16 autocast), and the achieved
  fraction ``FLOPs / seconds / throughput``;
* the same step with the aggregator composed directly from ``nystrom-attention``,
  TransMIL-style (Linear + ReLU, CLS, two ``x + NystromAttention(LayerNorm(x))`` layers
  called without a mask, LayerNorm), and the time ratio gimplib / reference.

With 2 windows, a batch holds no valid triplet when the labels differ (the loss is then an
exact 0), but the triplet path -- frozen gene encoder, concatenation, distances -- runs
and is timed all the same.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from nystrom_attention import NystromAttention
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, bmm_flop, sdpa_backward_flop_count, sdpa_flop_count

from gimplib.bench.slide import PeakMemory
from gimplib.losses import masked_l1, triplet_loss
from gimplib.models import GiMP, GroupMSA, PatchAggregator, random_patch_mask
from gimplib.models.aggregator import _residual_conv
from gimplib.utils import get_device, seed_everything

__all__ = ["USEFUL_FLOPS", "ReferenceAggregator", "matmul_throughput", "run", "summary"]


def _attention_forward_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """``softmax(Q K^T) V`` forward: the two products."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """``softmax(Q K^T) V`` backward: the gradients of the two products (4 products), without
    the recomputed scores a fused kernel adds."""
    b, h, s_q, d = query_shape
    recompute = bmm_flop((b * h, s_q, d), (b * h, d, key_shape[2]))
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape) - recompute


_aten = torch.ops.aten
#: FLOP formulas given to ``FlopCounterMode`` for the fused attention kernels (every device),
#: so that a fused ``softmax(Q K^T) V`` counts what the unfused products count.
USEFUL_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _attention_forward_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    _aten._scaled_dot_product_flash_attention: _attention_forward_flops,
    _aten._scaled_dot_product_flash_attention_backward: _attention_backward_flops,
    _aten._scaled_dot_product_efficient_attention: _attention_forward_flops,
    _aten._scaled_dot_product_efficient_attention_backward: _attention_backward_flops,
    _aten._scaled_dot_product_cudnn_attention: _attention_forward_flops,
    _aten._scaled_dot_product_cudnn_attention_backward: _attention_backward_flops,
}


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


def matmul_throughput(
    device: torch.device, size: int = 2048, min_seconds: float = 1.0, dtype: torch.dtype = torch.float32
) -> float:
    """Measured matmul throughput of ``device`` in FLOP/s (square ``size`` matmuls of ``dtype``)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
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


def _time_steps(steps: dict[str, Callable[[], Tensor]], device: torch.device, warmup: int, repeats: int) -> dict:
    """Time the steps *interleaved* (a, b, a, b, ...), so that load from other processes on a
    shared machine falls on each alike and their ratio stays meaningful."""
    for _ in range(warmup):
        for step in steps.values():
            step().backward()
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step().backward()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    out = {}
    for name, step in steps.items():
        with PeakMemory(device) as mem:
            step().backward()
        with FlopCounterMode(display=False, custom_mapping=USEFUL_FLOPS) as counter:
            step().backward()
        out[name] = {
            "seconds": round(statistics.median(times[name]), 4),
            "seconds_all": [round(t, 4) for t in times[name]],
            "cpu_seconds": round(statistics.median(cpu_times[name]), 4),
            "peak_gib": round(mem.peak_gib, 3),
            "start_gib": round(mem.start_gib, 3),
            "flops": int(counter.get_total_flops()),
        }
    return out


def _residual_conv_excess(aggregator: PatchAggregator, b: int, n: int, device: torch.device) -> int:
    """FLOPs the residual convolutions of one step count beyond a convolution's own multiply-adds.

    Each layer with a residual convolution runs :func:`gimplib.models.aggregator._residual_conv`
    (forward and both gradients) over all ``n`` tokens (the last layer too: it gathers the
    needed rows afterwards); its products are counted here at that shape, and a depth-wise
    convolution's ``2 * b * h * n * kernel * dh`` per pass (forward, input gradient, weight
    gradient) is subtracted.
    """
    excess = 0
    for layer in aggregator.layers:
        attn = layer.attn
        if not attn.residual:
            continue
        weight = attn.res_conv.weight.detach().clone().requires_grad_(True)
        h, kernel = weight.shape[0], weight.shape[2]
        dh = attn.to_qkv.weight.shape[0] // (3 * h)
        v = torch.randn(b, h, n, dh, device=device, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            _residual_conv(weight, v).sum().backward()
        excess += counter.get_total_flops() - 3 * 2 * b * h * n * kernel * dh
    return excess


def _profile(step: Callable[[], Tensor], path: str) -> None:
    """Write ``torch.profiler`` tables (by op, by op and shape, by stack) of one step to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    step().backward()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as prof:
        step().backward()
    by_op = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50)
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=40, max_shapes_column_width=80
    )
    by_stack = prof.key_averages(group_by_stack_n=5).table(
        sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=40, max_src_column_width=90
    )
    Path(path).write_text(f"{by_op}\n\n{by_shape}\n\n{by_stack}\n")


def summary(result: dict) -> str:
    """The figures of a ``step`` result on a few lines (what the CLI prints to stderr)."""
    lines = []
    for key in ("gimplib", "reference"):
        if key in result:
            r = result[key]
            lines.append(
                f"{key:>9}: {r['seconds']:.3f} s/step (CPU {r['cpu_seconds']:.2f} s), {r['flops'] / 1e9:.1f} GFLOP, "
                f"{r['achieved_gflops']:.1f} GFLOP/s = {r['achieved_fraction_of_matmul']:.3f} of matmul"
            )
    dtype = "fp32" if "matmul_fp32_gflops" in result else "bf16"
    lines.append(f"   matmul: {result[f'matmul_{dtype}_gflops']:.1f} GFLOP/s {dtype} ({result['torch_threads']} threads)")
    if "time_ratio_gimplib_over_reference" in result:
        lines.append(
            f"    ratio: gimplib / reference = {result['time_ratio_gimplib_over_reference']:.3f} "
            f"(CPU time {result['cpu_ratio_gimplib_over_reference']:.3f})"
        )
    return "\n".join(lines)


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-seconds", type=float, default=2.0, help="how long to time the matmuls")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference composition")
    parser.add_argument(
        "--amp", choices=("none", "bf16"), default="none",
        help="bf16: both steps' forwards under bf16 autocast (CPU or CUDA); the fraction is then of the bf16 matmul",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", default=None, help="also write torch.profiler tables of one gimplib step here")
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

    def autocast():  # the forward only, as training does (backward runs outside)
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()

    def gimp_step() -> Tensor:
        model.zero_grad(set_to_none=True)
        with autocast():
            return model.pretrain_step(feats, None, genes, y)["loss"]

    steps = {"gimplib": gimp_step}
    if not args.no_reference:
        reference = ReferenceAggregator(
            in_dim=args.in_dim, embed_dim=args.embed_dim, depth=2, num_heads=args.num_heads, num_landmarks=args.num_landmarks
        ).to(device).train()
        # the same MPM + triplet step around it, composed by hand as a user of the package
        # would (mask token on every projected token, decoder on every token): the yardstick
        valid = torch.ones(b, n, dtype=torch.bool, device=device)

        def reference_step() -> Tensor:
            reference.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
            with autocast():
                tokens = reference.proj(feats)
                mpm = random_patch_mask(valid, model.mask_ratio)
                tokens = torch.where(mpm[..., None], model.mask_token, tokens)
                cls, out = reference(tokens)
                loss_rec = masked_l1(model.decoder(out), feats, mpm, reduction=model.rec_reduction)
                with torch.no_grad():
                    cls_ge = model.gene_encoder(genes)
                emb = torch.cat([nn.functional.normalize(cls, dim=-1), nn.functional.normalize(cls_ge, dim=-1)], -1)
                return loss_rec + triplet_loss(emb, y, margin=model.margin)

        steps["reference"] = reference_step

    if args.profile:
        _profile(gimp_step, args.profile)
    mm_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    matmul_before = matmul_throughput(device, args.matmul_size, args.matmul_seconds, mm_dtype)
    result = {
        "benchmark": "step",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "shapes": {"windows": b, "window_len": n, "in_dim": args.in_dim, "embed_dim": args.embed_dim, "genes": args.genes},
        **_time_steps(steps, device, args.warmup, args.repeats),
    }
    excess = _residual_conv_excess(model.aggregator, b, n + 1, device)
    result["gimplib"]["flops_counted"] = result["gimplib"]["flops"]
    result["gimplib"]["flops_residual_conv_excess"] = excess
    result["gimplib"]["flops"] -= excess
    if "reference" in result:
        for key, field in (("time_ratio_gimplib_over_reference", "seconds"), ("cpu_ratio_gimplib_over_reference", "cpu_seconds")):
            result[key] = round(result["gimplib"][field] / result["reference"][field], 3)

    # measured after the steps and once more before them: the higher figure is the denominator
    throughput = max(matmul_before, matmul_throughput(device, args.matmul_size, args.matmul_seconds, mm_dtype))
    result["amp"] = args.amp
    result["matmul_fp32_gflops" if args.amp == "none" else "matmul_bf16_gflops"] = round(throughput / 1e9, 2)
    for key in ("gimplib", "reference"):
        if key in result:
            achieved = result[key]["flops"] / result[key]["seconds"]
            result[key]["achieved_gflops"] = round(achieved / 1e9, 2)
            result[key]["achieved_fraction_of_matmul"] = round(achieved / throughput, 3)
    return result
