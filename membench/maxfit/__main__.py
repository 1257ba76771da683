"""``python -m membench.maxfit``: the same as ``membench-maxfit``."""

from membench.maxfit.cli import main

main()
