"""``python -m gimplib.bench NAME [options]``: run one benchmark and print its JSON."""

from __future__ import annotations

import importlib
import json
import sys

SUBCOMMANDS = {
    "io": "gimplib.bench.io",  # window vs whole-bag reads from a 148,569-patch h5
    "step": "gimplib.bench.step",  # one GiMP pretraining step at paper shapes
    "slide": "gimplib.bench.slide",  # whole-bag aggregator inference
    "extract": "gimplib.bench.extract",  # ResNet50-trunc feature extraction throughput
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: python -m gimplib.bench {{{','.join(SUBCOMMANDS)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    result = module.run(argv[1:])
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
