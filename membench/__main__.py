"""``python -m membench``: the same as ``membench`` (and what ``torchrun --nproc-per-node N -m membench`` runs)."""

from membench.cli import main

main()
