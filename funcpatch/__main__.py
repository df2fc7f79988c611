"""``python -m funcpatch``: the ``funcpatch`` command (see :mod:`funcpatch.cli`)."""

import sys

from funcpatch.cli import main

if __name__ == "__main__":
    sys.exit(main())
