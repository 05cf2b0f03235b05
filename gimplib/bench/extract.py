"""``python -m gimplib.bench extract``: ResNet50-trunc feature-extraction throughput (patches/s).

Two numbers: the encoder alone on random 224 px uint8 patches already in memory
(``model_patches_per_s``), and the whole path on a real slide -- OpenSlide reads,
resize, DataLoader, encoder (``end_to_end_patches_per_s``). Random weights give the
same timing as ImageNet weights, so no weight file is needed (``--weights`` to use one).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_SLIDE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gimplib.bench extract", description=__doc__)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--n-batches", type=int, default=3, help="timed batches for the encoder alone")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--slide", default=str(DEFAULT_SLIDE), help="slide for the end-to-end number ('' to skip)")
    p.add_argument("--max-patches", type=int, default=64, help="patches of the slide in the end-to-end run")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--weights", default=None, help="ResNet50 state dict (default: random weights, timing only)")
    p.add_argument("--no-half", action="store_true", help="float32 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p


def run(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns a JSON-ready dict."""
    from gimplib.data.wsi.features import build_encoder, embed_patches, extract_features
    from gimplib.data.wsi.pipeline import _subsample
    from gimplib.utils import get_device

    args = _parser().parse_args(argv or [])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    half = device.type == "cuda" and not args.no_half
    model, desc = build_encoder(weights=args.weights, random_weights=args.weights is None)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8, generator=gen)
        for _ in range(args.warmup + args.n_batches)
    ]
    embed_patches(model, batches[: args.warmup], device=device, half=half)
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    feats = embed_patches(model, batches[args.warmup :], device=device, half=half)
    _sync(device)
    model_time, model_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "benchmark": "extract",
        "encoder": "resnet50_trunc (layer3 + avgpool, 1024-d)",
        "weights": desc + (" -- random weights: timing only" if args.weights is None else ""),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "dtype": "float16 autocast" if half else "float32",
        "batch_size": args.batch_size,
        "input_size": 224,
        "model_patches": int(feats.shape[0]),
        "model_seconds": round(model_time, 3),
        "model_patches_per_s": round(feats.shape[0] / model_time, 2),
        # CPU time of this process (all threads): on a shared machine, patches per CPU-second
        # times the cores you will have is a fairer estimate than the wall-clock rate
        "model_cpu_seconds": round(model_cpu, 3),
        "model_patches_per_cpu_s": round(feats.shape[0] / model_cpu, 2) if model_cpu > 0 else None,
        "torch": torch.__version__,
    }
    slide = Path(args.slide) if args.slide else None
    if slide is not None and slide.is_file():
        from gimplib.data.wsi.patching import patch_grid
        from gimplib.data.wsi.slide import open_slide, read_slide_info
        from gimplib.data.wsi.tissue import slide_tissue_mask

        handle = open_slide(slide)
        try:
            info = read_slide_info(handle, slide)
            tissue = slide_tissue_mask(handle, patch_area_level0=256.0**2)
        finally:
            handle.close()
        grid = patch_grid(info, tissue)
        coords = grid.coords[_subsample(len(grid), args.max_patches)]
        kwargs = dict(level=grid.patch_level, read_size=grid.patch_size, batch_size=args.batch_size,
                      num_workers=args.num_workers, device=device, half=half)
        extract_features(slide, coords[: min(len(coords), args.batch_size)], model, **kwargs)  # warm-up
        _sync(device)
        start = time.perf_counter()
        out = extract_features(slide, coords, model, **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
        result.update(
            slide=str(slide),
            end_to_end_patches=int(out.shape[0]),
            end_to_end_seconds=round(seconds, 3),
            end_to_end_patches_per_s=round(out.shape[0] / seconds, 2),
            num_workers=args.num_workers,
        )
        assert np.isfinite(out).all()
    return result
