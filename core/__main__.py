"""`python -m changescribe.core ...` runs the command line too (for environments without the console script)."""

import sys

from .cli import main

sys.exit(main())
