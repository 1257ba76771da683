"""Real execution on the CPU, counted with the allocator model.

It exists to prove the simulation honest: same tracker, real tensors, real
kernels. Tests run it on tiny models and require simulate to match it.
"""

from __future__ import annotations

import platform

import torch

from membench.backends.tracker import TrackedBackend


class CpuBackend(TrackedBackend):
    name = "cpu"

    def __init__(self, cuda_semantics: bool = True) -> None:
        super().__init__(torch.device("cpu"), cuda_semantics)

    def is_oom(self, error: BaseException) -> bool:
        return isinstance(error, MemoryError) or (
            isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)
        )

    def describe(self) -> dict:
        return {
            "device_name": platform.processor() or platform.machine() or "cpu",
            "device_total_memory_bytes": None,
            "runtime_overhead_bytes": 0,
            "cuda_semantics": self.cuda_semantics,
            # Whose kernels' saved bytes the figures follow (membench.analytic.measured_kernels).
            "kernels": "cuda" if self.cuda_semantics else "cpu",
        }
