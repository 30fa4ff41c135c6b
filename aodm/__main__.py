"""`python -m aodm`: the same command line as the `aodm` console script."""

import sys

from aodm.cli import main

sys.exit(main())
