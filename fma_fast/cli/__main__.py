"""``python -m fma_fast.cli``: the ``fma-fast`` command."""

import sys

from .main import main

sys.exit(main())
