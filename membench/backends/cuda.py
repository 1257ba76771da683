"""The ground truth: a real GPU and the caching allocator's own statistics.

With ``backend.memory_snapshot=true`` it also records the caching allocator's
history (every allocation and free, with its Python stack) for the whole run
and writes it next to the result, also when the run ends in an OOM::

    membench backend.name=cuda backend.memory_snapshot=true model=llama-7b ...
    # -> results/runs/<run_id>.json and results/runs/<run_id>.snapshot.pickle

Drop the pickle onto https://pytorch.org/memory_viz to see the timeline of live
tensors and which line of code allocated each one.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from membench.backends.base import Backend, BusyDeviceError
from membench.compat import record_cuda_memory_history
from membench.errors import ConfigError

# Another process holding more than this much of the card would make our
# peaks meaningless (and OOMs spurious). This process's own CUDA context is
# about 0.5 GiB and is not counted by the allocator.
FOREIGN_MEMORY_LIMIT = 2 << 30
# Allocation/free events kept in the snapshot's ring buffer (each costs a few KB of host memory and of
# file size, with its stack); beyond this the oldest are dropped. A few training steps make far fewer.
SNAPSHOT_MAX_ENTRIES = 100_000
OOM_MESSAGES = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_ALLOC_FAILED")


#: Where PyTorch reads the caching allocator's settings, newest name first (torch >= 2.9 reads
#: PYTORCH_ALLOC_CONF and falls back to PYTORCH_CUDA_ALLOC_CONF), once, when CUDA's allocator starts.
ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def current_alloc_conf() -> str:
    """The allocator settings this process runs (or will run) with, as the environment gives them."""
    for variable in ALLOC_CONF_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable]
    return ""


def apply_alloc_conf(alloc_conf: str) -> None:
    """Make ``backend.alloc_conf`` the allocator's settings: set the environment before CUDA starts.

    Raises:
        ConfigError: CUDA is already initialised in this process with other settings (the allocator
            reads them once); set PYTORCH_CUDA_ALLOC_CONF before starting the process instead.
    """
    if not alloc_conf or alloc_conf == current_alloc_conf():
        return
    if torch.cuda.is_initialized():
        raise ConfigError(
            f"backend.alloc_conf={alloc_conf!r} cannot take effect: CUDA is already initialised in this "
            f"process with allocator settings {current_alloc_conf()!r}; start a new process with "
            f"PYTORCH_CUDA_ALLOC_CONF={alloc_conf!r} instead")
    for variable in ALLOC_CONF_VARIABLES:
        os.environ[variable] = alloc_conf


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, alloc_conf: str = "") -> None:
        if not torch.cuda.is_available():
            raise ConfigError("backend.name=cuda but no CUDA GPU is visible; use backend.name=simulate or auto")
        apply_alloc_conf(alloc_conf)  # before current_device(), which initialises CUDA
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._snapshot: Optional[dict] = None  # what describe() reports when a snapshot was asked for

    def check_idle(self) -> None:
        """Refuse to measure on a GPU that something else already uses.

        Raises:
            BusyDeviceError: this process still holds tensors from earlier
                work, or other processes hold more than FOREIGN_MEMORY_LIMIT.
        """
        gc.collect()  # tensors of an earlier run in this process that only await collection
        held = torch.cuda.memory_allocated(self.device)
        if held:
            raise BusyDeviceError(f"{held} bytes are already allocated in this process before the run")
        free, total = torch.cuda.mem_get_info(self.device)
        foreign = total - free - torch.cuda.memory_reserved(self.device)
        if foreign > FOREIGN_MEMORY_LIMIT:
            raise BusyDeviceError(
                f"{foreign / 2**30:.1f} GiB of {torch.cuda.get_device_name(self.device)} is held by other processes"
            )

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def peak_reserved(self) -> Optional[int]:
        return torch.cuda.max_memory_reserved(self.device)

    def allocator_figures(self) -> dict:
        """Segments held now and cudaMalloc retries, from ``torch.cuda.memory_stats`` (like for like with
        :mod:`membench.reserved`'s ``reserved_segments`` and ``num_alloc_retries``)."""
        try:
            stats = torch.cuda.memory_stats(self.device)
        except (RuntimeError, AssertionError, AttributeError):  # no statistics: leave the figures unset
            return {}
        return {"reserved_segments": stats.get("segment.all.current"), "num_alloc_retries": stats.get("num_alloc_retries")}

    def is_oom(self, error: BaseException) -> bool:
        if isinstance(error, torch.cuda.OutOfMemoryError):
            return True
        # Allocations outside the caching allocator (cuBLAS, cuDNN, the driver) fail as RuntimeErrors.
        return isinstance(error, RuntimeError) and any(text in str(error) for text in OOM_MESSAGES)

    @contextlib.contextmanager
    def memory_snapshot(self, path: Path) -> Iterator[None]:
        """Record the allocator's history while active; then write it to ``path`` and stop recording.

        Recording goes through :func:`membench.compat.record_cuda_memory_history`
        (torch's private history API, checked before use).

        The file is written however the block ends (an OOM included: the frames
        of the exception still hold the tensors, so the snapshot shows what filled
        the card). A failure to write it is reported in ``describe()``
        (``memory_snapshot_error``), never lost with the run's figures. Open
        the file at https://pytorch.org/memory_viz.
        """
        self._snapshot = {"memory_snapshot": None}
        with record_cuda_memory_history(SNAPSHOT_MAX_ENTRIES) as dump:
            try:
                yield
            finally:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    partial = path.with_name(f".tmp-{path.name}")  # a crash mid-write leaves no half file
                    dump(str(partial))
                    os.replace(partial, path)
                    self._snapshot["memory_snapshot"] = str(path)
                except Exception as error:  # noqa: BLE001 - the run's figures matter more than the snapshot
                    self._snapshot["memory_snapshot_error"] = f"{type(error).__name__}: {error}"

    def cleanup(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def describe(self) -> dict:
        properties = torch.cuda.get_device_properties(self.device)
        return {
            "device_name": properties.name,
            "device_total_memory_bytes": properties.total_memory,
            "cuda_version": torch.version.cuda,
            "runtime_overhead_bytes": 0,  # measured, not modelled: it is inside the allocator's figures
            "alloc_conf": current_alloc_conf(),  # the allocator settings it ran with, to compare like for like
            **(self._snapshot or {}),
        }
