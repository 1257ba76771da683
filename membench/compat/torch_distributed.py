"""torch.distributed: storage resizes (FSDP2), the fake process group, and the FSDP2 API membench calls.

* :func:`follow_storage_resizes` wraps ``torch.UntypedStorage.resize_``. FSDP2 frees each gathered
  (unsharded) parameter with ``storage.resize_(0)`` and re-allocates it with ``resize_(n)``
  (``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``: ``free_storage``/``alloc_storage``). A
  dispatch mode never sees that call and the storage object never dies, so an allocator model
  that only watches op outputs and finalizers would keep counting freed parameters (torch's own
  ``torch.distributed._tools.mem_tracker.MemTracker`` wraps ``resize_`` for the same reason).
* :func:`fake_process_group` is torch's fake process group (``"fake"`` backend with the
  ``FakeStore`` that torch documents only under ``torch.testing._internal``): one process plays
  one rank of any world size; collectives return without communicating.
* :func:`fsdp2_api` is ``fully_shard`` and its policies, checked to take the options membench sets.
* :func:`dtensor_metadata_unseen`: DTensor's sharding propagation derives an op's output metadata by
  running the op once on fake tensors of the *global* shape
  (``torch/distributed/tensor/_sharding_prop.py``, ``_propagate_tensor_meta_non_cached``, the first
  time it sees an op signature). Those tensors are never device memory, on any backend, but a
  dispatch mode sees them being made; torch runs that work inside the class attribute
  ``ShardingPropagator._fake_mode_lock`` (a no-op context by default), which this entry wraps.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Callable, Iterator

import torch

from membench.compat._checks import incompatible, parameter_names

_RESIZE_NEED = "to follow FSDP2 freeing and re-allocating gathered parameters (UntypedStorage.resize_)"
_FAKE_PG_NEED = "to simulate one rank of a data-parallel run in one process (torch's fake process group)"
_FSDP_NEED = "to shard a model with FSDP2 (fully_shard with mesh, reshard_after_forward, mp_policy, offload_policy)"
FSDP2_OPTIONS = ["mesh", "reshard_after_forward", "mp_policy", "offload_policy"]


def check_storage_resize() -> Callable:
    resize = getattr(torch.UntypedStorage, "resize_", None)
    if not callable(resize):
        raise incompatible("torch", "has no UntypedStorage.resize_", _RESIZE_NEED)
    return resize


@contextlib.contextmanager
def follow_storage_resizes(after: Callable[[torch.UntypedStorage], None]) -> Iterator[None]:
    """Call ``after(storage)`` after every ``torch.UntypedStorage.resize_`` while active.

    Restores the original method on exit, also after an error. Not re-entrant across threads
    (it swaps a class attribute); one run at a time per process, as membench runs.
    """
    original = check_storage_resize()

    @functools.wraps(original)
    def resize_(storage, size):
        out = original(storage, size)
        after(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        torch.UntypedStorage.resize_ = original


def fake_store_class() -> type:
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as error:
        raise incompatible("torch", f"cannot import torch.testing._internal.distributed.fake_pg.FakeStore ({error})",
                           _FAKE_PG_NEED) from None
    return FakeStore


def check_fake_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise incompatible("torch", "was built without torch.distributed", _FAKE_PG_NEED)
    fake_store_class()
    if not hasattr(dist.Backend, "FAKE"):
        raise incompatible("torch", "has no torch.distributed.Backend.FAKE", _FAKE_PG_NEED)


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """The default process group as torch's fake one (rank ``rank`` of ``world_size``) while active.

    Destroyed on exit, also after an error, so runs in one process never share a group.
    """
    import torch.distributed as dist

    check_fake_process_group()
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=fake_store_class()())
    try:
        yield
    finally:
        dist.destroy_process_group()


def fsdp2_api() -> tuple[Callable, type, type]:
    """``(fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy)`` from ``torch.distributed.fsdp``, checked."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError as error:
        raise incompatible("torch", f"has no FSDP2 ({error})", _FSDP_NEED) from None
    names = parameter_names(fully_shard) or []
    missing = [name for name in FSDP2_OPTIONS if name not in names]
    if missing:
        raise incompatible("torch", f"has fully_shard({', '.join(names)}) without {', '.join(missing)}", _FSDP_NEED)
    if not {"param_dtype", "reduce_dtype"} <= set(parameter_names(MixedPrecisionPolicy) or []):
        raise incompatible("torch", "has a MixedPrecisionPolicy without param_dtype/reduce_dtype", _FSDP_NEED)
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy


_METADATA_NEED = ("to leave out the fake global-shape tensors DTensor's sharding propagation makes to derive "
                  "output metadata (ShardingPropagator._fake_mode_lock around _propagate_tensor_meta_non_cached)")


def checked_sharding_propagator() -> type:
    try:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator
    except ImportError as error:
        raise incompatible("torch", f"cannot import ShardingPropagator ({error})", _METADATA_NEED) from None
    lock = getattr(ShardingPropagator, "_fake_mode_lock", None)
    if not (hasattr(lock, "__enter__") and hasattr(lock, "__exit__")):
        raise incompatible("torch", "has no ShardingPropagator._fake_mode_lock context", _METADATA_NEED)
    try:
        source = inspect.getsource(ShardingPropagator._propagate_tensor_meta_non_cached)
    except (AttributeError, OSError, TypeError):
        source = ""
    if "_fake_mode_lock" not in source or "gen_fake_args" not in source:
        raise incompatible("torch", "no longer runs _propagate_tensor_meta_non_cached's fake ops inside "
                           "_fake_mode_lock", _METADATA_NEED)
    return ShardingPropagator


class _Unseen:
    """``ShardingPropagator._fake_mode_lock`` plus a pause of the allocator model (re-entrant, reusable)."""

    def __init__(self, original, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.original, self.pause, self.resume = original, pause, resume

    def __enter__(self):
        entered = self.original.__enter__()
        self.pause()
        return entered

    def __exit__(self, *exc):
        self.resume()
        return self.original.__exit__(*exc)


@contextlib.contextmanager
def dtensor_metadata_unseen(pause: Callable[[], None], resume: Callable[[], None]) -> Iterator[None]:
    """Call ``pause()`` when DTensor's sharding propagation starts its fake global-shape work, ``resume()``
    when it ends, while active; restores torch's own lock on exit, also after an error."""
    propagator = checked_sharding_propagator()
    original = propagator._fake_mode_lock
    propagator._fake_mode_lock = _Unseen(original, pause, resume)
    try:
        yield
    finally:
        propagator._fake_mode_lock = original


def check_distributed() -> None:
    """Every target of this module (the ``CHECKS`` entry)."""
    check_storage_resize()
    check_fake_process_group()
    fsdp2_api()
    checked_sharding_propagator()
