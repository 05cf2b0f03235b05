"""Benchmarks, run as ``python -m gimplib.bench {io,step,slide,extract}``; each prints JSON.

Each subcommand lives in its own module here with a ``run(argv) -> dict`` function.
"""
