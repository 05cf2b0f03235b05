"""``gimp-extract``: the command line of :func:`gimplib.data.wsi.process_slides`.

Example (CLAM's TCGA preset, as the paper's preprocessing)::

    gimp-extract /data/TCGA-NSCLC/slides /data/TCGA-NSCLC/cohort --labels labels.csv \\
        --weights ~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth --batch-size 256 --num-workers 8

UNI2-h features from the weights file downloaded (under its licence) from its model card::

    gimp-extract SLIDES OUT --encoder uni_v2 --weights ~/models/uni2-h/pytorch_model.bin

A 20x field on every slide of a cohort that mixes 20x and 40x scans::

    gimp-extract SLIDES OUT --mode field --magnification 20
"""

from __future__ import annotations

import argparse
import sys

from gimplib.data.wsi.clam import CLAM_PRESETS, CONTOUR_FNS, ClamParams
from gimplib.data.wsi.encoders import ENCODERS
from gimplib.data.wsi.pipeline import EXTRACT_MODES, SLIDE_EXTENSIONS, ExtractConfig, process_slides
from gimplib.data.wsi.tissue import TissueParams
from gimplib.utils import DataError

__all__ = ["main"]

# Options that belong to one mode only; giving them in the other is an error, not a silent no-op.
CLAM_ONLY = ("preset", "patch_level", "seg_level", "contour_fn", "padding")
FIELD_ONLY = ("magnification", "slide_magnification", "min_tissue", "seg_downsample")


def _size_or_none(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a side in pixels or 'none'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a side >= 1 or 'none'")
    return value


def _parser() -> argparse.ArgumentParser:
    d, t = ExtractConfig(), TissueParams()
    p = argparse.ArgumentParser(
        prog="gimp-extract",
        description="Whole-slide images -> CLAM cohort folder (tissue masks, patches h5, ResNet50-trunc 1024-d features).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="a folder of slides or one slide file")
    p.add_argument("out_dir", help="output cohort folder (h5_files/, pt_files/, patches/, masks/)")
    p.add_argument("--ext", nargs="+", default=list(SLIDE_EXTENSIONS), help="slide extensions to look for")
    p.add_argument("--mode", choices=EXTRACT_MODES, default=d.mode,
                   help="clam: CLAM's create_patches_fp.py coordinates (default, as the paper); "
                        "field: a fixed field of view at --magnification on every slide")
    p.add_argument("--patch-size", type=int, default=d.patch_size,
                   help="patch side: read at --patch-level (clam) or at --magnification (field)")
    p.add_argument("--step-size", type=int, default=None, help="grid step in the same pixels (default: patch size)")
    g = p.add_argument_group("clam mode")
    g.add_argument("--preset", default=None, help=f"CLAM preset: {', '.join(sorted(CLAM_PRESETS))} or a preset CSV (default tcga)")
    g.add_argument("--patch-level", type=int, default=None, help="pyramid level the patches are read at (default 0)")
    g.add_argument("--seg-level", type=int, default=None, help="level to segment (default -1: nearest 64x downsample)")
    g.add_argument("--contour-fn", choices=CONTOUR_FNS, default=None, help="keep rule (default four_pt)")
    pad = g.add_mutually_exclusive_group()
    pad.add_argument("--padding", dest="padding", action="store_true", default=None, help="edge patches may hang past the slide (CLAM's use_padding)")
    pad.add_argument("--no-padding", dest="padding", action="store_false", help="whole patches only")
    f = p.add_argument_group("field mode")
    f.add_argument("--magnification", type=float, default=None, help=f"target magnification (default {d.target_magnification:g} = 20x)")
    f.add_argument("--slide-magnification", type=float, default=None, help="level-0 magnification for slides without mpp/objective metadata")
    f.add_argument("--min-tissue", type=float, default=None, help=f"minimum tissue fraction of a patch (default {d.min_tissue:g})")
    f.add_argument("--seg-downsample", type=float, default=None, help=f"segment at about this downsample (default {t.seg_downsample:g})")
    s = p.add_argument_group("segmentation (both modes; defaults from the preset / TCGA)")
    s.add_argument("--sthresh", type=int, default=None, help="saturation threshold (0-255)")
    s.add_argument("--mthresh", type=int, default=None, help="median blur size")
    s.add_argument("--close", type=int, default=None, help="closing kernel size (0 = none)")
    s.add_argument("--use-otsu", action="store_true", default=None, help="Otsu threshold instead of --sthresh")
    s.add_argument("--a-t", type=float, default=None, help="min tissue area: in 512x512 level-0 tiles (clam) or patch footprints (field)")
    s.add_argument("--a-h", type=float, default=None, help="min hole area, same unit as --a-t")
    s.add_argument("--max-n-holes", type=int, default=None, help="holes kept per tissue region (default: the preset's)")
    e = p.add_argument_group("features")
    e.add_argument("--patch-only", action="store_true", help="masks and patches h5 only, no features")
    e.add_argument("--encoder", choices=list(ENCODERS), default=d.encoder_name,
                   help="patch encoder: resnet50_trunc (CLAM's, 1024-d, default) or a foundation model built by timm "
                        "from --weights (uni_v1 1024-d, uni_v2 1536-d, virchow2 2560-d, gigapath 1536-d, hoptimus0 1536-d)")
    w = e.add_mutually_exclusive_group()
    w.add_argument("--weights", default=None, help="the encoder's weights file (resnet50_trunc default: torchvision's cache; "
                                                   "foundation models: the file from their model card); never downloaded")
    w.add_argument("--random-weights", action="store_true", help="random encoder, for tests and timing only")
    e.add_argument("--target-patch-size", type=_size_or_none, default=d.out_size,
                   help="resnet50_trunc: resize patches to this side before the encoder (224 as current CLAM; "
                        "'none' as CLAM before April 2024); the foundation models resize as their model cards say")
    e.add_argument("--batch-size", type=int, default=d.batch_size, help="patches per forward pass")
    e.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers reading patches")
    e.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, mps")
    e.add_argument("--half", action="store_true", help="float16 autocast on CUDA (default float32, as CLAM)")
    p.add_argument("--max-patches", type=int, default=None, help="at most this many patches per slide (quick looks)")
    p.add_argument("--labels", default=None, help="csv/tsv with label + slide_id/case_id: writes dataset.csv")
    p.add_argument("--overwrite", action="store_true", help="redo slides already done")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="take the I-th of N deterministic shards of the slides (0-based; e.g. $SLURM_ARRAY_TASK_ID/8); "
                        "workers lock each slide (out_dir/locks/), so shards may run at once (default: all slides)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (slides, and patches inside each slide)")
    return p


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ExtractConfig:
    wrong = FIELD_ONLY if args.mode == "clam" else CLAM_ONLY
    given = [name for name in wrong if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"{flags} apply to --mode {'field' if args.mode == 'clam' else 'clam'}, not --mode {args.mode}")
    seg = dict(sthresh=args.sthresh, mthresh=args.mthresh, close=args.close, use_otsu=args.use_otsu,
               a_t=args.a_t, a_h=args.a_h, max_n_holes=args.max_n_holes)
    common = dict(
        patch_size=args.patch_size,
        step_size=args.step_size,
        features=not args.patch_only,
        encoder_name=args.encoder,
        weights=args.weights,
        random_weights=args.random_weights,
        out_size=args.target_patch_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        half=args.half,
        max_patches=args.max_patches,
    )
    if args.mode == "clam":
        clam = ClamParams.from_preset(
            args.preset or "tcga", seg_level=args.seg_level, contour_fn=args.contour_fn, use_padding=args.padding, **seg
        )
        return ExtractConfig(mode="clam", clam=clam, patch_level=args.patch_level or 0, **common)
    d = ExtractConfig()
    tissue = TissueParams(**{k: v for k, v in seg.items() if v is not None})
    if args.seg_downsample is not None:
        tissue.seg_downsample = args.seg_downsample
    return ExtractConfig(
        mode="field",
        target_magnification=args.magnification or d.target_magnification,
        slide_magnification=args.slide_magnification,
        min_tissue=d.min_tissue if args.min_tissue is None else args.min_tissue,
        tissue=tissue,
        **common,
    )


def main(argv: list[str] | None = None) -> int:
    """``gimp-extract SOURCE OUT_DIR [options]``; returns 1 when a slide failed, 2 on bad settings."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args, parser)
        status = process_slides(
            args.source, args.out_dir, config, overwrite=args.overwrite, labels=args.labels,
            extensions=args.ext, progress=not args.quiet, shard=args.shard,
        )
    except DataError as err:
        print(f"gimp-extract: {err}", file=sys.stderr)
        return 2
    counts = status.status.value_counts().to_dict()
    print(f"gimp-extract: {len(status)} slide(s) {counts}; {int(status.n_patches.sum())} patches -> {args.out_dir}")
    if config.features:
        from pathlib import Path

        have = "dataset.csv is written" if args.labels else f"add {Path(args.out_dir) / 'dataset.csv'} (case_id, slide_id, label; or rerun with --labels)"
        print(f"next: {have}; add a gene table {Path(args.out_dir) / 'genes.csv'} (one row per case_id, one column "
              f"per gene); then: python -m gimplib.book --params demo --data-dir {args.out_dir}")
    return 1 if counts.get("failed") else 0
