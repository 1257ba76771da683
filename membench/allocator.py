"""What CUDA's caching allocator charges for a tensor, and how storages are told apart.

Shared by the allocator model (backends/tracker.py) and the measured loop, which
counts weights, gradients and saved tensors the same way on every backend.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from membench.compat import storage_id

ALLOCATOR_ROUNDING = 512  # bytes; CUDACachingAllocator's kMinBlockSize


def allocator_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator reserves for a request of ``nbytes`` (0 stays 0)."""
    if nbytes == 0:
        return 0
    return -(-nbytes // ALLOCATOR_ROUNDING) * ALLOCATOR_ROUNDING


def returned_tensors(out: Any) -> Iterator[torch.Tensor]:
    """The tensors an ATen op returned: one, a tuple of them, or lists of them (foreach ops).

    Also the values of dicts, as a module's output may be (transformers' ``ModelOutput``); no op returns one.
    """
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from returned_tensors(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from returned_tensors(item)


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage, stable while it is alive (works for fake tensors)."""
    return storage_id(tensor.untyped_storage())
