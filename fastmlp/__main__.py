"""``python -m fastmlp train ...`` without installing the console script."""

import sys

from fastmlp.train.cli import main

sys.exit(main())
