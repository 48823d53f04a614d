"""`python -m ablate.cli`: the same as the `ablate` console script."""

import sys

from ablate.cli import main

sys.exit(main())
