"""The allocator model counts what CUDA's caching allocator would hand out."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from membench.allocator import allocator_bytes
from membench.backends.tracker import AllocationTracker


def test_rounding_matches_the_caching_allocator():
    assert allocator_bytes(0) == 0
    assert allocator_bytes(1) == 512
    assert allocator_bytes(512) == 512
    assert allocator_bytes(513) == 1024


def test_allocation_view_and_free():
    tracker = AllocationTracker("cpu")
    with tracker:
        x = torch.empty(1000, dtype=torch.float32)  # 4000 B -> 4096
        assert tracker.allocated == 4096
        view = x[10:20].view(2, 5)  # a view shares the storage: free
        assert tracker.allocated == 4096
        y = x * 2
        assert tracker.allocated == 8192
        del x, view
        assert tracker.allocated == 4096
        del y
    assert tracker.allocated == 0
    assert tracker.peak == 8192


def test_inplace_ops_allocate_nothing():
    tracker = AllocationTracker("cpu")
    with tracker:
        x = torch.zeros(256)
        before = tracker.allocated
        x.add_(1).mul_(3)
        assert tracker.allocated == before


def test_fake_tensors_are_counted_without_memory():
    tracker = AllocationTracker("cpu")
    with FakeTensorMode(), tracker:
        big = torch.empty(1 << 30, dtype=torch.bfloat16)  # 2 GiB that never exists
        assert tracker.allocated == 2 << 30
        del big
    assert tracker.allocated == 0


def test_forget_and_device_filter():
    tracker = AllocationTracker("cuda")
    with tracker:
        host = torch.ones(10)  # not on the modelled device type
    assert tracker.allocated == 0
    tracker = AllocationTracker("cpu")
    with tracker:
        counter = torch.zeros(())
        assert tracker.allocated == 512
        tracker.forget(counter)
        assert tracker.allocated == 0
        del counter  # its finalizer must not subtract twice
    assert tracker.allocated == 0
    assert host.sum() == 10


def test_a_storage_resized_in_place_is_freed_and_reallocated():
    """FSDP2 frees gathered parameters with UntypedStorage.resize_(0) and re-allocates them with resize_(n)."""
    from membench.backends.cpu import CpuBackend
    from membench.events import ALLOC, FREE, RESIZE

    backend = CpuBackend(cuda_semantics=False)
    events = backend.tracker.record()
    with backend.session([]):
        gathered = torch.empty(1000)  # 4000 B -> 4096
        storage = gathered.untyped_storage()
        assert (backend.allocated(), backend.gathered()) == (4096, 0)
        storage.resize_(0)
        assert (backend.allocated(), backend.gathered()) == (0, 0)
        assert backend.is_gathered(storage)
        backend.gathered_peak(reset=True)
        storage.resize_(4000)
        assert (backend.allocated(), backend.gathered(), backend.gathered_peak()) == (4096, 4096, 4096)
        other = torch.empty(10)  # a plain allocation is not a gathered one
        assert backend.gathered() == 4096 and not backend.is_gathered(other.untyped_storage())
        del gathered, storage
        assert (backend.allocated(), backend.gathered()) == (512, 0)
    key = [event for event in events if event[0] == ALLOC][0][1]
    assert [event[:2] for event in events if event[1] == key][:3] == [(ALLOC, key), (FREE, key), (ALLOC, key)]
    assert [event for event in events if event[0] == ALLOC and event[1] == key][1][3] == RESIZE


def test_dtensor_metadata_tensors_are_not_memory():
    """DTensor derives an op's output metadata on fake tensors of the global shape (first call of each op
    signature); the allocator model counts only the rank's local shards: x, y and x + y, 64 of 256 rows each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from membench import compat
    from membench.backends.cpu import CpuBackend

    with compat.fake_process_group(4):
        mesh = init_device_mesh("cpu", (4,))
        x = distribute_tensor(torch.zeros(256, 48), mesh, [Shard(0)])
        y = distribute_tensor(torch.zeros(256, 48), mesh, [Shard(0)])
        backend = CpuBackend(cuda_semantics=False)
        with backend.session([x.to_local(), y.to_local()]):
            backend.reset_peak()
            total = torch.addcmul(x, y, x, value=0.5)  # an op signature DTensor has not propagated yet
            assert backend.peak_allocated() == 3 * allocator_bytes(64 * 48 * 4)
            del total
