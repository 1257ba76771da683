"""Data parallelism (``parallel.strategy``): per-rank memory under FSDP2 and DDP.

Simulated in one process with torch's fake process group (:mod:`~membench.parallel.group`):
the process plays rank 0 of ``parallel.world_size`` ranks, which holds the largest shard, so its
figures are the worst case. The model is wrapped by torch's own FSDP2 (``fully_shard``) or DDP
(:mod:`~membench.parallel.wrap`); nothing about sharding is modelled by membench itself.
The ``cpu`` backend runs the same wrapping for real, one process per rank over gloo
(:mod:`~membench.parallel.launch`).
"""

from membench.parallel.group import process_group
from membench.parallel.wrap import Parallelizer, local_tensor, parallelizer

__all__ = ["Parallelizer", "local_tensor", "parallelizer", "process_group"]
