"""Count the bytes autograd keeps for backward: what LoRA-FA is about."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from membench.allocator import storage_key


class SavedTensorCounter:
    """Sums the unique storages packed by autograd while active, in bytes.

    Parameters are excluded: they exist whether or not backward needs them.
    Bytes are the storages' exact sizes (no allocator rounding), so they can be
    counted by hand. Tensors saved inside a checkpointed region are not seen,
    because non-reentrant checkpointing installs its own inner hooks and drops
    them; that is exactly the saving recompute buys.

    Args:
        parameters: Tensors whose storages never count.
    """

    def __init__(self, parameters: list[torch.Tensor]) -> None:
        self._excluded = {storage_key(p) for p in parameters}
        self._seen: dict[int, int] = {}

    @property
    def total_bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self._excluded and key not in self._seen:
            self._seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    @contextlib.contextmanager
    def counting(self) -> Iterator["SavedTensorCounter"]:
        """Count one forward pass from zero (storage keys are only unique among live storages)."""
        self._seen = {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self
