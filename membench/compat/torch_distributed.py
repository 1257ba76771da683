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
"""

from __future__ import annotations

import contextlib
import functools
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


def check_distributed() -> None:
    """Every target of this module (the ``CHECKS`` entry)."""
    check_storage_resize()
    check_fake_process_group()
    fsdp2_api()
