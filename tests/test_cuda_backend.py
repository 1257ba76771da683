"""The cuda backend's decisions, checked without a GPU by standing in for torch.cuda's answers."""

from __future__ import annotations

import gc
import pickle
import weakref
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny
from membench.backends.base import BusyDeviceError
from membench.backends.cuda import FOREIGN_MEMORY_LIMIT, SNAPSHOT_MAX_ENTRIES, CudaBackend
from membench.errors import ConfigError
from membench.runner import measure

GiB = 1 << 30


@pytest.fixture
def gpu(monkeypatch):
    """A pretend idle 80 GiB GPU: what CudaBackend reads from torch.cuda; ``queries`` counts mem_get_info calls."""
    state = {"allocated": 0, "reserved": 0, "free": 80 * GiB, "total": 80 * GiB, "queries": 0}

    def mem_get_info(device=None):
        state["queries"] += 1
        return state["free"], state["total"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Pretend GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(name="Pretend GPU", total_memory=state["total"]))
    return state


def test_no_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="backend.name=cuda but no CUDA GPU is visible"):
        measure(tiny("tiny-llama", "lora", backend="cuda"))


@pytest.mark.parametrize(("allocated", "reserved", "foreign", "refusal"), [
    (0, 0, 0, None),  # idle
    (0, 0, GiB // 2, None),  # this process's CUDA context (~0.5 GiB) is outside the allocator, and tolerated
    (0, 0, FOREIGN_MEMORY_LIMIT, None),  # up to the limit
    (0, 0, FOREIGN_MEMORY_LIMIT + 1, "2.0 GiB of Pretend GPU is held by other processes"),
    (0, 0, 10 * GiB, "10.0 GiB of Pretend GPU is held by other processes"),
    (0, 10 * GiB, GiB, None),  # memory this process's allocator caches is not another process's
    (4096, 0, 0, "4096 bytes are already allocated in this process before the run"),
])
def test_check_idle_decides_from_what_is_held_and_by_whom(gpu, allocated, reserved, foreign, refusal):
    gpu.update(allocated=allocated, reserved=reserved, free=gpu["total"] - reserved - foreign)
    if refusal is None:
        assert CudaBackend().check_idle() is None
        assert gpu["queries"] == 1  # it did look at the card
    else:
        with pytest.raises(BusyDeviceError, match=refusal):
            CudaBackend().check_idle()


class Leftover:
    """An object of an earlier run that only a garbage collection frees (it is in a reference cycle)."""


def test_check_idle_collects_an_earlier_runs_garbage_first(gpu, monkeypatch):
    live = weakref.WeakSet()
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4096 * len(live))
    gc.disable()  # only check_idle's own collection may free the cycle
    try:
        leftover = Leftover()
        leftover.cycle = leftover
        live.add(leftover)
        del leftover
        assert len(live) == 1
        assert CudaBackend().check_idle() is None
        assert len(live) == 0
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("error", "is_oom"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (ValueError("out of memory"), False),  # the right words, but not from CUDA
        (MemoryError(), False),  # the host ran out, not the card
    ],
)
def test_what_counts_as_out_of_memory(gpu, error, is_oom):
    assert CudaBackend().is_oom(error) is is_oom


@pytest.fixture
def history(monkeypatch):
    """Stand-ins for torch's allocator-history API, logging their calls; ``fail`` makes the dump raise."""
    calls = []
    state = {"fail": None}

    def record_memory_history(enabled="all", context="all", stacks="all", max_entries=0, device=None,
                              clear_history=False):
        calls.append(("record", enabled, max_entries, clear_history))

    def dump_snapshot(filename="dump_snapshot.pickle"):
        calls.append(("dump", filename))
        if state["fail"]:
            raise state["fail"]
        with open(filename, "wb") as handle:
            pickle.dump({"segments": [], "device_traces": [[]]}, handle)

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record_memory_history)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump_snapshot)
    return SimpleNamespace(calls=calls, state=state)


def test_snapshot_is_written_with_its_content_and_reported(gpu, history, tmp_path):
    backend = CudaBackend()
    path = tmp_path / "runs" / "r1.snapshot.pickle"
    with backend.memory_snapshot(path):
        assert history.calls == [("record", "all", SNAPSHOT_MAX_ENTRIES, True)]  # this run's history only
    temporary = str(path.with_name(".tmp-r1.snapshot.pickle"))
    assert history.calls[1:] == [("dump", temporary), ("record", None, 0, False)]  # written, then stopped
    assert sorted(pickle.loads(path.read_bytes())) == ["device_traces", "segments"]
    assert [p.name for p in path.parent.iterdir()] == ["r1.snapshot.pickle"]  # the temporary file is gone
    assert backend.describe() == {"device_name": "Pretend GPU", "device_total_memory_bytes": 80 * GiB,
                                  "cuda_version": torch.version.cuda, "runtime_overhead_bytes": 0,
                                  "alloc_conf": "", "memory_snapshot": str(path)}


def test_snapshot_after_an_oom_is_still_written(gpu, history, tmp_path):
    backend = CudaBackend()
    path = tmp_path / "r2.snapshot.pickle"
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with backend.memory_snapshot(path):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert path.exists() and backend.describe()["memory_snapshot"] == str(path)
    assert history.calls[-1] == ("record", None, 0, False)


def test_a_snapshot_that_cannot_be_written_is_reported_not_raised(gpu, history, tmp_path):
    history.state["fail"] = OSError("No space left on device")
    backend = CudaBackend()
    with backend.memory_snapshot(tmp_path / "r3.snapshot.pickle"):
        pass
    described = backend.describe()
    assert described["memory_snapshot"] is None
    assert described["memory_snapshot_error"] == "OSError: No space left on device"
    assert history.calls[-1] == ("record", None, 0, False)  # recording stopped all the same
    assert list(tmp_path.iterdir()) == []


def test_describe_without_a_snapshot_has_no_snapshot_keys(gpu):
    assert CudaBackend().describe() == {"device_name": "Pretend GPU", "device_total_memory_bytes": 80 * GiB,
                                        "cuda_version": torch.version.cuda, "runtime_overhead_bytes": 0,
                                        "alloc_conf": ""}


def test_alloc_conf_is_applied_before_cuda_starts_and_recorded(gpu, monkeypatch):
    for variable in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert CudaBackend(alloc_conf="expandable_segments:True").describe()["alloc_conf"] == "expandable_segments:True"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    CudaBackend(alloc_conf="expandable_segments:True")  # already in effect: nothing to change
    with pytest.raises(ConfigError, match="already initialised.*start a new process with PYTORCH_CUDA_ALLOC_CONF"):
        CudaBackend(alloc_conf="max_split_size_mb:128")


def test_allocator_figures_come_from_memory_stats(gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"segment.all.current": 7, "num_alloc_retries": 1})
    assert CudaBackend().allocator_figures() == {"reserved_segments": 7, "num_alloc_retries": 1}
