"""``python -m gimplib.bench slide``: whole-slide inference of the patch aggregator.

Runs :class:`gimplib.models.PatchAggregator` (paper shapes: 1024 -> 512, 2 Nystrom layers,
8 heads, 256 landmarks) in eval mode under ``torch.inference_mode`` on random bags of
15,000 and 148,569 patches (the largest bag of the paper's cohort), with the CLS attention
map, and reports wall seconds, process CPU seconds (all threads; telling on a shared
machine) and peak memory. Goals (issue 14): 148,569 patches in <= 10 s and <= 2 GiB on 2
threads. Each case is then run once more, untimed, through the path as it was before
issue 14 (:mod:`gimplib.bench._slide_before`), and the largest absolute differences of the
CLS output, the tokens and the attention map are reported (they must stay <= 1e-5).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each case, so it
includes the Python/torch baseline and the bag itself), with a sampling thread as the
fallback where ``clear_refs`` is not writable.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from gimplib.bench._slide_before import forward_before
from gimplib.models import PatchAggregator
from gimplib.utils import get_device, seed_everything

__all__ = ["PeakMemory", "run", "summary"]

GIB = 2**30


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager measuring peak memory of a block: CUDA allocator or process RSS.

    Attributes after the block: ``peak_gib`` (peak during the block; for CPU the whole
    process's resident set), ``start_gib`` (at entry), ``method`` (how it was measured).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_gib = float("nan")
        self.start_gib = float("nan")
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_gib = torch.cuda.memory_allocated(self.device) / GIB
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self._sampler = None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM (process peak RSS, reset via /proc/self/clear_refs)"
        except OSError:
            self.method = "process RSS sampled every 2 ms"
            self._stop = threading.Event()
            self._max_kib = 0

            def sample() -> None:
                while not self._stop.is_set():
                    self._max_kib = max(self._max_kib, _status_kib("VmRSS") or 0)
                    time.sleep(0.002)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        self.start_gib = (_status_kib("VmRSS") or 0) / 2**20
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / GIB
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak_gib = max(self._max_kib, _status_kib("VmRSS") or 0) / 2**20
        else:
            self.peak_gib = (_status_kib("VmHWM") or 0) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` and run the benchmark; returns the JSON-able result."""
    parser = argparse.ArgumentParser(prog="python -m gimplib.bench slide", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--sizes", default="15000,148569", help="comma-separated bag sizes (patches)")
    parser.add_argument("--in-dim", type=int, default=1024)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-landmarks", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, default=2048, help="tokens per chunk of the inference path")
    parser.add_argument("--no-attn", action="store_true", help="skip the CLS attention map")
    parser.add_argument("--target-gib", type=float, default=2.0)
    parser.add_argument("--target-seconds", type=float, default=10.0)
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the path before issue 14")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    seed_everything(args.seed)
    device = get_device(args.device)
    model = PatchAggregator(
        in_dim=args.in_dim,
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
        num_landmarks=args.num_landmarks,
        chunk_size=args.chunk_size,
    ).to(device).eval()

    with torch.inference_mode():  # one-time costs (thread pool, allocator, kernels) out of the first case
        model(torch.rand(1, min(2 * args.chunk_size, 10_000), args.in_dim, device=device), return_attn=not args.no_attn)
    cases = []
    for n in (int(s) for s in args.sizes.split(",")):
        feats = torch.rand(1, n, args.in_dim, device=device)  # CLAM features are non-negative
        with PeakMemory(device) as mem, torch.inference_mode():
            _sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(feats, return_attn=not args.no_attn)
            _sync(device)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        ok = bool(torch.isfinite(out.cls).all())
        check = {}
        if not args.no_check and feats.shape[0] == 1:
            with torch.inference_mode():
                cls, tokens, attn = forward_before(model, feats, return_attn=not args.no_attn)
            check = {"max_abs_diff_cls": float((out.cls[0] - cls).abs().max()),
                     "max_abs_diff_tokens": float((out.tokens[0] - tokens).abs().max())}
            if attn is not None:
                check["max_abs_diff_attn"] = float((out.attn[0] - attn).abs().max())
            check["same_outputs_1e-5"] = all(v <= 1e-5 for v in check.values())
            del cls, tokens, attn
        cases.append(
            {
                "patches": n,
                "seconds": round(seconds, 3),
                "cpu_seconds": round(cpu_seconds, 3),
                "peak_gib": round(mem.peak_gib, 3),
                "start_gib": round(mem.start_gib, 3),
                "bag_gib": round(feats.numel() * feats.element_size() / GIB, 3),
                "within_target": mem.peak_gib <= args.target_gib and seconds <= args.target_seconds,
                "finite": ok,
                **check,
            }
        )
        del feats, out
    return {
        "benchmark": "slide",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "memory_method": mem.method,
        "target_gib": args.target_gib,
        "config": {k: v for k, v in vars(args).items() if k not in ("device", "sizes")},
        "cases": cases,
    }


def summary(result: dict) -> str:
    """One line per bag size (what the CLI prints to stderr)."""
    lines = []
    for case in result["cases"]:
        same = case.get("same_outputs_1e-5")
        diff = "" if same is None else (
            f", outputs vs before issue 14: max |diff| tokens {case['max_abs_diff_tokens']:.1e}"
            f" ({'same to 1e-5' if same else 'DIFFERENT'})"
        )
        lines.append(f"{case['patches']:>8} patches: {case['seconds']:.2f} s (CPU {case['cpu_seconds']:.1f} s), "
                     f"peak {case['peak_gib']:.2f} GiB{diff}")
    return "\n".join(lines)
