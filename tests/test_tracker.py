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
