"""Shared base of the backends whose memory comes from :class:`AllocationTracker`."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from membench.backends.base import Backend
from membench.backends.cuda_semantics import CudaSemantics
from membench.backends.tracker import AllocationTracker


class TrackedBackend(Backend):
    """Counts bytes with the allocator model instead of asking a real GPU.

    Args:
        cuda_semantics: Save what CUDA kernels save (bool dropout masks, fused
            attention) even though tensors are on the CPU.
    """

    def __init__(self, device: torch.device, cuda_semantics: bool = True) -> None:
        self.device = device
        self.tracker = AllocationTracker(device.type)
        self.cuda_semantics = cuda_semantics

    @contextlib.contextmanager
    def session(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        # Weights and the batch were made before tracking started; count them now, once per storage.
        for tensor in tensors:
            self.tracker.track(tensor)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.tracker)
            if self.cuda_semantics:
                stack.enter_context(CudaSemantics())
            yield

    @contextlib.contextmanager
    def op_origins(self) -> Iterator[Callable[[torch.UntypedStorage], Optional[torch._ops.OpOverload]]]:
        # The allocator model already sees every op's outputs; no second dispatch mode needed.
        yield self.tracker.origin

    def host_resident(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            self.tracker.forget(tensor)

    def allocated(self) -> int:
        return self.tracker.allocated

    def reset_peak(self) -> None:
        self.tracker.reset_peak()

    def peak_allocated(self) -> int:
        return self.tracker.peak
