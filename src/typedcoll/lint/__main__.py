"""``python -m typedcoll.lint PATH... [--json] [--config FILE]``."""

import sys

from . import main

sys.exit(main())
