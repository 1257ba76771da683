"""``python -m membench.gpucheck``: the same as ``membench-gpucheck``."""

import sys

from membench.gpucheck import main

sys.exit(main())
