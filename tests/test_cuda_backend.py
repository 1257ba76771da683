"""The cuda backend's decisions, checked without a GPU by standing in for torch.cuda's answers."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny
from membench.backends.base import BusyDeviceError
from membench.backends.cuda import CudaBackend
from membench.errors import ConfigError
from membench.runner import measure

GiB = 1 << 30


@pytest.fixture
def gpu(monkeypatch):
    """A pretend idle 80 GiB GPU: what CudaBackend reads from torch.cuda."""
    state = {"allocated": 0, "reserved": 0, "free": 79 * GiB, "total": 80 * GiB}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], state["total"]))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Pretend GPU")
    return state


def test_no_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="backend.name=cuda but no CUDA GPU is visible"):
        measure(tiny("tiny-llama", "lora", backend="cuda"))


def test_idle_gpu_is_accepted(gpu):
    CudaBackend().check_idle()


def test_memory_held_by_this_process_is_refused(gpu):
    gpu["allocated"] = 4096
    with pytest.raises(BusyDeviceError, match="4096 bytes are already allocated in this process"):
        CudaBackend().check_idle()


def test_memory_held_by_other_processes_is_refused(gpu):
    gpu["free"] = 70 * GiB  # 10 GiB used, none of it reserved by us
    with pytest.raises(BusyDeviceError, match="10.0 GiB of Pretend GPU is held by other processes"):
        CudaBackend().check_idle()


def test_own_cuda_context_is_tolerated(gpu):
    gpu["free"] = 79 * GiB - (GiB // 2)  # this process's CUDA context, ~0.5 GiB, below the limit
    CudaBackend().check_idle()


@pytest.mark.parametrize(
    ("error", "is_oom"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_what_counts_as_out_of_memory(gpu, error, is_oom):
    assert CudaBackend().is_oom(error) is is_oom
