"""Measurement backends: ``cuda`` (real allocator), ``simulate`` (fake tensors), ``cpu`` (real, tracked)."""

from __future__ import annotations

import torch

from membench.backends.base import Backend
from membench.config import BackendConfig


def resolve_name(config: BackendConfig) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``simulate``.

    ``backend.memory_snapshot`` works on every backend: ``cuda`` records the real allocator's history,
    ``simulate`` and ``cpu`` write the caching-allocator model's (:mod:`membench.reserved`).
    """
    name = config.name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "simulate"
    return name


def create_backend(config: BackendConfig) -> Backend:
    """A fresh backend (one per run: trackers and fake modes are not shared between runs)."""
    name = resolve_name(config)
    if name == "cuda":
        from membench.backends.cuda import CudaBackend

        return CudaBackend(alloc_conf=config.alloc_conf)
    if name == "cpu":
        from membench.backends.cpu import CpuBackend

        return CpuBackend(cuda_semantics=config.cuda_semantics)
    from membench.devices import device_profile
    from membench.backends.simulate import SimulateBackend

    return SimulateBackend(device_profile(config), config.cuda_semantics, config.fake_device)


__all__ = ["Backend", "create_backend", "resolve_name"]
