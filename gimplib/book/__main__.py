"""``python -m gimplib.book``: execute the notebooks, then build the book."""

import sys

from gimplib.book.runner import main

sys.exit(main())
