"""``python -m gimplib.bench NAME [options]``: run one benchmark and print its JSON."""

from __future__ import annotations

import importlib
import json
import sys

SUBCOMMANDS = {
    "io": "window vs whole-bag reads from a 148,569-patch h5",
    "step": "one GiMP pretraining step at paper shapes",
    "slide": "whole-bag aggregator inference",
    "extract": "ResNet50-trunc feature extraction throughput",
}


def _usage() -> str:
    lines = [f"usage: python -m gimplib.bench {{{','.join(SUBCOMMANDS)}}} [options]", "", "benchmarks:"]
    lines += [f"  {name:<8} {what}" for name, what in SUBCOMMANDS.items()]
    lines += ["", "python -m gimplib.bench NAME --help lists a benchmark's options (each prints JSON)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; ``--help`` lists them (exit 0); an unknown name says so (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] not in SUBCOMMANDS:
        print(f"python -m gimplib.bench: unknown benchmark {argv[0]!r}; known: {', '.join(SUBCOMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"gimplib.bench.{argv[0]}")
    result = module.run(argv[1:])
    print(json.dumps(result, indent=2))
    if hasattr(module, "summary"):  # the figures that matter, readable, after the JSON
        print(module.summary(result), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
