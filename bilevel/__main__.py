"""``python -m bilevel``: the command-line interface (see :mod:`bilevel.cli`)."""

import sys

from .cli import main

sys.exit(main())
