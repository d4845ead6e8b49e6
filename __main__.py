"""`python -m changescribe ...` runs the command line (core/cli.py)."""

import sys

from .core.cli import main

sys.exit(main())
