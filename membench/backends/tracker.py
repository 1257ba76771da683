"""An allocator model: counts the bytes CUDA's caching allocator would hand out.

``AllocationTracker`` is a ``TorchDispatchMode``. It sees every ATen op after
autograd (forward, backward on the autograd thread, optimizer), and for every
output tensor whose storage it has not seen it adds the storage's size rounded
up to 512 bytes, as ``CUDACachingAllocator`` rounds each block. When the
storage object dies, a finalizer subtracts it again (:func:`membench.compat.when_storage_freed`). Views share a
storage, so they cost nothing, exactly as on the GPU.

Two things FSDP2 needs (:mod:`membench.parallel`): a storage resized in place
(``UntypedStorage.resize_``, FSDP2's way of freeing and re-allocating gathered parameters)
is re-counted at its new size (:meth:`AllocationTracker.resized`, wired up by
:class:`TrackedBackend` through :func:`membench.compat.follow_storage_resizes`), and DTensor
ops are left to DTensor, which decomposes them into ops on its local shards that the tracker
then counts; the fake global-shape tensors DTensor makes first to derive an op's output metadata
are not counted (:func:`membench.compat.dtensor_metadata_unseen`).

It also remembers which ATen op made each live storage (:meth:`origin`), so
saved tensors can be attributed to ops at no extra dispatch cost.

It works on real tensors (the ``cpu`` backend) and on fake ones (``simulate``),
which is what lets tests prove the two agree byte for byte. :class:`TrackedBackend`
is their shared base: a backend whose memory figures come from this tracker.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from membench.allocator import allocator_bytes, returned_tensors, storage_key
from membench.backends.base import Backend
from membench.backends.cuda_semantics import CudaSemantics
from membench.compat import (
    OpOverload,
    TorchDispatchMode,
    dtensor_metadata_unseen,
    follow_storage_resizes,
    op_returns_alias,
    storage_id,
    when_storage_freed,
)
from membench.events import ALLOC, FREE, PHASE, RESIZE, WORKSPACE
from membench.quantization import is_quantized


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch without distributed: no DTensor can reach the tracker
    _DTensor = None


class AllocationTracker(TorchDispatchMode):
    """Tracks live bytes and their peak, in integer bytes.

    Args:
        device_type: Only storages on this device type count (``cuda`` or ``cpu``).

    Attributes:
        allocated: Live bytes now.
        peak: Highest ``allocated`` since the last :meth:`reset_peak`.
        events: The allocation log (:mod:`membench.events`) while :meth:`record` is on, else None.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self._live: dict[int, int] = {}
        self._origin: dict[int, OpOverload] = {}  # live storage -> the op that made it
        self._forgotten: set[int] = set()  # untracked early; their finalizers must do nothing
        self._off_device = False  # while True, new storages are made outside the modelled allocator
        self.allocated = 0
        self.peak = 0
        #: Live bytes of storages that were resized in place (FSDP2's gathered parameters), and their peak.
        self._resized: set[int] = set()
        self.resized_allocated = 0
        self.resized_peak = 0
        self.events: Optional[list[tuple]] = None
        self._constants = 0  # keys of workspace allocations: negative, never a storage's
        #: False: a storage first seen as the output of a view op was allocated where this mode does not
        #: see (another thread) and is not counted; its bytes add to ``unseen_view_bytes`` instead.
        #: Set for real multi-process runs (membench.parallel.launch), where gloo's reduce-scatter works
        #: on a full-size copy of its input made on gloo's own thread, a buffer NCCL does not allocate.
        self._paused = 0  # > 0 while DTensor derives metadata on fake global-shape tensors (not memory)
        self.count_unseen_views = True
        self.unseen_view_bytes = 0
        #: While recording, names the module of each allocation (``ModuleScope.current``); None: not logged.
        self.module_of: Optional[Callable[[], Optional[str]]] = None

    def record(self) -> list[tuple]:
        """Start logging every allocation, free and phase mark (:mod:`membench.events`); returns the log.

        Costs one tuple append per allocation and free (about 10^5 for a 7B step).
        """
        if self.events is None:
            self.events = []
        return self.events

    def mark_phase(self, phase: str, label: str) -> None:
        """A phase starts: reset the peak, and log the mark when recording."""
        self.reset_peak()
        if self.events is not None:
            self.events.append((PHASE, phase, label))

    def track(self, tensor: torch.Tensor, func: Optional[OpOverload] = None) -> None:
        """Count ``tensor``'s storage if it is new and on the tracked device type.

        Args:
            func: The op whose output ``tensor`` is; None for tensors made before tracking.
        """
        new = self.new_storage(tensor)
        if new is None:
            return
        storage, key = new
        nbytes = storage.nbytes()
        size = allocator_bytes(nbytes)
        if not self.count_unseen_views and func is not None and op_returns_alias(func):
            self.unseen_view_bytes += size
            self._forgotten.add(key)
            when_storage_freed(storage, self._release, key)
            return
        self._live[key] = size
        if func is not None:
            self._origin[key] = func
        if self.events is not None:
            if self.module_of is None:
                self.events.append((ALLOC, key, nbytes, func))
            else:
                self.events.append((ALLOC, key, nbytes, func, self.module_of()))
        self.allocated += size
        if self.allocated > self.peak:
            self.peak = self.allocated
        when_storage_freed(storage, self._release, key)

    def new_storage(self, tensor: torch.Tensor) -> Optional[tuple[torch.UntypedStorage, int]]:
        """(storage, key) of ``tensor`` when :meth:`track` must count it now; None when not.

        Not: another device type (e.g. AdamW's per-parameter step counters, which live on the host), a
        storage already counted or forgotten, or one made inside :meth:`off_device` (remembered as forgotten).
        """
        if tensor.device.type != self.device_type:
            return None
        storage = tensor.untyped_storage()
        key = storage_id(storage)
        if key in self._live or key in self._forgotten:
            return None
        if self._off_device:
            self._forgotten.add(key)
            when_storage_freed(storage, self._release, key)
            return None
        return storage, key

    def resized(self, storage: torch.UntypedStorage) -> None:
        """Re-count a tracked ``storage`` after ``UntypedStorage.resize_``: a free (to 0) or an allocation.

        Logged as a free of the old size and an allocation (op :data:`membench.events.RESIZE`) of the
        new one, as the caching allocator sees FSDP2's free and re-allocation. From its first resize on,
        the storage's bytes also count in :attr:`resized_allocated` (FSDP2's gathered parameters).
        """
        key = storage_id(storage)
        old = self._live.get(key)
        if old is None:
            return  # not tracked: another device, or made before tracking
        nbytes = storage.nbytes()
        new = allocator_bytes(nbytes)
        if new == old:
            return
        if key not in self._resized:
            self._resized.add(key)
            self.resized_allocated += old
        self._live[key] = new
        self.allocated += new - old
        self.resized_allocated += new - old
        self.peak = max(self.peak, self.allocated)
        self.resized_peak = max(self.resized_peak, self.resized_allocated)
        if self.events is not None:
            if old:
                self.events.append((FREE, key))
            if new:
                self.events.append((ALLOC, key, nbytes, RESIZE))

    def forget(self, tensor: torch.Tensor) -> None:
        """Stop counting ``tensor``'s storage now: it lives off the device being modelled."""
        key = storage_key(tensor)
        size = self._live.pop(key, None)
        if size is not None:
            self.allocated -= size
            self._forgotten.add(key)
            self._origin.pop(key, None)
            if self.events is not None:
                self.events.append((FREE, key))

    @contextlib.contextmanager
    def off_device(self) -> Iterator[None]:
        """Storages first seen while active live outside the caching allocator: never counted, never logged.

        For memory CUDA allocates elsewhere, e.g. bitsandbytes' paged optimizer state (``cudaMallocManaged``).
        """
        self._off_device = True
        try:
            yield
        finally:
            self._off_device = False

    def origin(self, storage: torch.UntypedStorage) -> Optional[OpOverload]:
        """The op that made the live ``storage``; None if it predates tracking or lives off the device."""
        return self._origin.get(storage_id(storage))

    def add_constant(self, nbytes: int) -> None:
        """Hold ``nbytes`` that no tensor owns (e.g. cuBLAS workspaces) for the rest of the run."""
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)
        if self.events is not None:
            self._constants -= 1
            self.events.append((ALLOC, self._constants, nbytes, WORKSPACE))

    def reset_peak(self) -> None:
        self.peak = self.allocated

    def reset_resized_peak(self) -> None:
        self.resized_peak = self.resized_allocated

    def was_resized(self, storage: torch.UntypedStorage) -> bool:
        return storage_id(storage) in self._resized

    def _release(self, key: int) -> None:
        if key in self._forgotten:
            self._forgotten.discard(key)
            return
        size = self._live.pop(key)
        self.allocated -= size
        if key in self._resized:
            self._resized.discard(key)
            self.resized_allocated -= size
        self._origin.pop(key, None)
        if self.events is not None:
            self.events.append((FREE, key))

    def pause(self) -> None:
        """Stop counting op outputs until :meth:`resume` (nested pauses count)."""
        self._paused += 1

    def resume(self) -> None:
        self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _DTensor is not None and any(issubclass(kind, _DTensor) for kind in types):
            return NotImplemented  # DTensor decomposes the op into ops on local tensors, counted then
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        for tensor in returned_tensors(out):
            self.track(tensor, func)
        return out


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
            stack.enter_context(follow_storage_resizes(self.tracker.resized))
            stack.enter_context(dtensor_metadata_unseen(self.tracker.pause, self.tracker.resume))
            if self.cuda_semantics:
                stack.enter_context(CudaSemantics(quantized=any(is_quantized(t) for t in tensors)))
            yield

    @contextlib.contextmanager
    def op_origins(self) -> Iterator[Callable[[torch.UntypedStorage], Optional[OpOverload]]]:
        # The allocator model already sees every op's outputs; no second dispatch mode needed.
        yield self.tracker.origin

    def host_resident(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            self.tracker.forget(tensor)

    def off_device(self) -> contextlib.AbstractContextManager[None]:
        return self.tracker.off_device()

    def allocated(self) -> int:
        return self.tracker.allocated

    def reset_peak(self) -> None:
        self.tracker.reset_peak()

    def begin_phase(self, phase: str, label: str) -> None:
        self.tracker.mark_phase(phase, label)

    def peak_allocated(self) -> int:
        return self.tracker.peak

    # FSDP2's gathered parameters are the storages it resizes in place (membench.parallel).
    def gathered(self) -> Optional[int]:
        return self.tracker.resized_allocated

    def gathered_peak(self, reset: bool = False) -> Optional[int]:
        if reset:
            self.tracker.reset_resized_peak()
        return self.tracker.resized_peak

    def is_gathered(self, storage: torch.UntypedStorage) -> bool:
        return self.tracker.was_resized(storage)
