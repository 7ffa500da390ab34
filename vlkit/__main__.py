"""`python -m vlkit` runs the vlkit command."""

import sys

from vlkit.cli import main

sys.exit(main())
