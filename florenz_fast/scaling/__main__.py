"""`python -m florenz_fast.scaling --key=value ...`: the sweep (see florenz_fast.scaling; --help lists the keys)."""

import sys

from .sweep import main

sys.exit(main())
