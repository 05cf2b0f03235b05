"""``python -m gimplib.train ...`` is ``gimp-train ...``."""

from gimplib.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
