"""``python -m parallel_decoding.bench``: the branch-stage benchmark (``bench/branch_stage.py``)."""

import sys

from .branch_stage import main

sys.exit(main())
