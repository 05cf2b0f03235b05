"""``gimp-extract``: the command line of :func:`gimplib.data.wsi.process_slides`.

Example::

    gimp-extract /data/TCGA-NSCLC/slides /data/TCGA-NSCLC/cohort --labels labels.csv \\
        --weights ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth --batch-size 256 --num-workers 8
"""

from __future__ import annotations

import argparse
import sys

from gimplib.data.wsi.pipeline import SLIDE_EXTENSIONS, ExtractConfig, process_slides
from gimplib.data.wsi.tissue import TissueParams
from gimplib.utils import DataError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    d, t = ExtractConfig(), TissueParams()
    p = argparse.ArgumentParser(
        prog="gimp-extract",
        description="Whole-slide images -> CLAM cohort folder (tissue masks, patches h5, ResNet50-trunc 1024-d features).",
    )
    p.add_argument("source", help="a folder of slides or one slide file")
    p.add_argument("out_dir", help="output cohort folder (h5_files/, pt_files/, patches/, masks/)")
    p.add_argument("--ext", nargs="+", default=list(SLIDE_EXTENSIONS), help="slide extensions to look for")
    p.add_argument("--patch-size", type=int, default=d.patch_size, help="patch side at the target magnification")
    p.add_argument("--step-size", type=int, default=None, help="grid step at the target magnification (default: patch size)")
    p.add_argument("--magnification", type=float, default=d.target_magnification, help="target magnification (20 = 20x)")
    p.add_argument("--slide-magnification", type=float, default=None, help="level-0 magnification for slides without mpp/objective metadata")
    p.add_argument("--min-tissue", type=float, default=d.min_tissue, help="minimum tissue fraction of a patch")
    p.add_argument("--seg-downsample", type=float, default=t.seg_downsample)
    p.add_argument("--sthresh", type=int, default=t.sthresh, help="saturation threshold (0-255)")
    p.add_argument("--mthresh", type=int, default=t.mthresh, help="median blur size")
    p.add_argument("--close", type=int, default=t.close, help="closing kernel size (0 = none)")
    p.add_argument("--use-otsu", action="store_true", help="Otsu threshold instead of --sthresh")
    p.add_argument("--a-t", type=float, default=t.a_t, help="min tissue-region area, in patch footprints")
    p.add_argument("--a-h", type=float, default=t.a_h, help="min hole area, in patch footprints")
    p.add_argument("--max-n-holes", type=int, default=t.max_n_holes)
    p.add_argument("--patch-only", action="store_true", help="masks and patches h5 only, no features")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", default=None, help="ResNet50 state dict (default: torchvision's cache; never downloaded)")
    w.add_argument("--random-weights", action="store_true", help="random encoder, for tests and timing only")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-half", action="store_true", help="float32 on CUDA too")
    p.add_argument("--max-patches", type=int, default=None, help="at most this many patches per slide (quick looks)")
    p.add_argument("--labels", default=None, help="csv/tsv with label + slide_id/case_id: writes dataset.csv")
    p.add_argument("--overwrite", action="store_true", help="redo slides already done")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """``gimp-extract SOURCE OUT_DIR [options]``; returns 1 when a slide failed."""
    args = _parser().parse_args(argv)
    config = ExtractConfig(
        patch_size=args.patch_size,
        step_size=args.step_size,
        target_magnification=args.magnification,
        slide_magnification=args.slide_magnification,
        min_tissue=args.min_tissue,
        tissue=TissueParams(
            seg_downsample=args.seg_downsample,
            sthresh=args.sthresh,
            mthresh=args.mthresh,
            close=args.close,
            use_otsu=args.use_otsu,
            a_t=args.a_t,
            a_h=args.a_h,
            max_n_holes=args.max_n_holes,
        ),
        features=not args.patch_only,
        weights=args.weights,
        random_weights=args.random_weights,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        half=False if args.no_half else None,
        max_patches=args.max_patches,
    )
    try:
        status = process_slides(
            args.source, args.out_dir, config, overwrite=args.overwrite, labels=args.labels,
            extensions=args.ext, progress=not args.quiet,
        )
    except DataError as err:
        print(f"gimp-extract: {err}", file=sys.stderr)
        return 2
    counts = status.status.value_counts().to_dict()
    print(f"gimp-extract: {len(status)} slide(s) {counts}; {int(status.n_patches.sum())} patches -> {args.out_dir}")
    return 1 if counts.get("failed") else 0
