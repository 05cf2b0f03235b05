"""``gimp-train``: the training tasks from the command line (the same functions the notebooks call).

Examples::

    gimp-train genes    --synthetic smoke --out runs/genes --num-epochs 20
    gimp-train pretrain --data-dir cohort --out runs/pre --gene-ckpt runs/genes/best.pt --set window_len=6000
    gimp-train finetune --data-dir cohort --out runs/ft --pretrained-ckpt runs/pre/checkpoint.pt
    gimp-train baseline --data-dir cohort --out runs/abmil --name abmil --k 5 --fold 0

``--set key=value`` passes any keyword of the task (values are read as YAML, so ``3``,
``1e-4``, ``true``, ``[256, 256]`` work); ``model_kwargs.embed_dim=64`` sets a nested key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from gimplib.data.cohort import load_cohort
from gimplib.data.splits import decide_split
from gimplib.data.synthetic import generate_cohort
from gimplib.train import checkpoint, pretraining, tasks
from gimplib.train.inference import gene_encoder_spec
from gimplib.utils import DataError, strict_json

__all__ = ["main"]

_REQUIRES = {"genes": ("genes",), "pretrain": ("slides",), "finetune": ("slides",), "baseline": ("slides",)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gimp-train", description="Train GiMP, its stages and its baselines.")
    p.add_argument("task", choices=sorted(_REQUIRES), help="which training task to run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-dir", type=Path, help="cohort folder in CLAM's layout (no default: give it or --synthetic)")
    src.add_argument("--synthetic", metavar="PRESET",
                     help="generate/reuse a synthetic cohort (smoke, demo, paper) in OUT/cohort (default: none, use --data-dir)")
    p.add_argument("--out", type=Path, required=True, help="run folder (required, no default)")
    p.add_argument("--name", help="baseline name (task baseline; e.g. abmil, transmil, porpoise; no default)")
    p.add_argument("--gene-ckpt", type=Path, help="gene encoder best.pt (task pretrain; default: none)")
    p.add_argument("--pretrained-ckpt", type=Path, help="pretraining checkpoint.pt (task finetune; default: none)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split (default 0)")
    p.add_argument("--clam-split", type=Path,
                   help="a CLAM splits_{k}.csv to use (default: the cohort's splits/splits_0.csv when present, else seeded)")
    p.add_argument("--k", type=int, help="number of folds (with --fold; default 5)")
    p.add_argument("--fold", type=int, help="fold index of a patient-grouped k-fold split (default: no folds)")
    p.add_argument("--num-epochs", type=int, help="training epochs (default: the task's, e.g. 50 genes, 70 finetune)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the task's)")
    p.add_argument("--seed", type=int, help="training seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default auto)")
    p.add_argument("--drop-incomplete", action="store_true",
                   help="drop cases missing a required modality instead of stopping (default: stop and list them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other task keyword, value read as YAML (repeatable; default: the task's defaults)")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of reusing/resuming (default off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: shown)")
    return p


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and _EXPONENT.match(parsed.strip()):
            parsed = float(parsed)  # YAML 1.1 reads 1e-4 (no dot) as text
        node[leaf] = parsed
    return out


_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one task; print its metrics.json to stdout. Returns 0, or 1 on a data/config error."""
    args = _parser().parse_args(argv)
    kwargs = _parse_sets(args.set)
    for name in ("num_epochs", "lr", "batch_size", "seed"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    kwargs.update(out_dir=args.out, device=args.device, overwrite=args.overwrite, progress=not args.no_progress)
    try:
        if args.synthetic:
            data_dir = generate_cohort(args.out / "cohort", preset=args.synthetic, progress=not args.no_progress)
        else:
            data_dir = args.data_dir
        require = _REQUIRES[args.task]
        if args.task == "pretrain" and args.gene_ckpt:
            require = ("slides", "genes")
        if args.task == "baseline" and kwargs.get("use_genes"):
            require = ("slides", "genes")
        if args.task == "finetune" and args.pretrained_ckpt:
            if gene_encoder_spec(checkpoint.load_checkpoint(args.pretrained_ckpt)) is not None:
                require = ("slides", "genes")  # the classifier reads concat(CLS_img, CLS_ge)
        cohort = load_cohort(data_dir, require=require, drop_incomplete=args.drop_incomplete)
        split, _ = decide_split(cohort, cohort_dir=data_dir, clam_split=args.clam_split, fold=args.fold,
                                k=args.k or 5, seed=args.split_seed)
        if args.task == "genes":
            result = tasks.train_gene_encoder(cohort, split, **kwargs)
        elif args.task == "pretrain":
            result = pretraining.pretrain_gimp(cohort, split, gene_encoder_ckpt=args.gene_ckpt, **kwargs)
        elif args.task == "finetune":
            result = pretraining.finetune(cohort, split, pretrained_ckpt=args.pretrained_ckpt, **kwargs)
        else:
            if not args.name:
                raise SystemExit("task baseline needs --name (e.g. abmil, transmil, porpoise)")
            result = tasks.train_baseline(args.name, cohort, split, **kwargs)
    except (DataError, checkpoint.ConfigMismatchError, checkpoint.NotACheckpointError, checkpoint.NonFiniteLossError,
            FileNotFoundError, ValueError, TypeError) as err:
        if os.environ.get("GIMP_DEBUG"):
            raise
        print(f"gimp-train: error: {err}", file=sys.stderr)
        if not isinstance(err, (DataError, checkpoint.ConfigMismatchError, checkpoint.NotACheckpointError,
                                FileNotFoundError)):
            print("gimp-train: (set GIMP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    print(json.dumps(strict_json(result.metrics), indent=2, sort_keys=True, allow_nan=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
