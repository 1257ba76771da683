"""The process group and device mesh a parallel run needs, for exactly as long as the run."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from membench.compat import fake_process_group
from membench.config import ParallelConfig
from membench.errors import ConfigError


@contextlib.contextmanager
def process_group(parallel: ParallelConfig, device: torch.device, rank: int = 0) -> Iterator[Optional[object]]:
    """Yields the 1-D device mesh of ``parallel.world_size`` ranks (None for ``strategy=none``).

    When a process group already exists (one process per rank: :mod:`membench.parallel.launch`,
    torchrun), it is used as it is and left alone; its world size must be ``parallel.world_size``.
    Otherwise torch's fake process group plays rank ``rank`` for the run and is destroyed after
    it, also after an error, so runs in one process never share a group.
    """
    if not parallel.enabled:
        yield None
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != parallel.world_size:
            raise ConfigError(f"parallel.world_size={parallel.world_size} but this process group has "
                              f"{dist.get_world_size()} ranks")
        yield init_device_mesh(device.type, (parallel.world_size,))
        return
    if not 0 <= rank < parallel.world_size:
        raise ValueError(f"rank {rank} is outside world size {parallel.world_size}")
    with fake_process_group(parallel.world_size, rank):
        # Built outside any fake tensor mode (the mesh holds real rank tensors).
        yield init_device_mesh(device.type, (parallel.world_size,))
