"""`python -m infra ...` is the `infra` console script."""

import sys

from infra.cli import main

sys.exit(main())
