"""The caching-allocator model against hand-worked traces, one per rule of CUDACachingAllocator.cpp.

Every expected number is worked out from the rule in the comment beside it, not from running
the model. MiB = 1,048,576 B; "seg" = a cudaMalloc segment.
"""

from __future__ import annotations

import pickle

import pytest

from membench.caching_allocator import AllocatorSettings, CachingAllocatorModel, ModelledOutOfMemory
from membench.errors import ConfigError

MiB = 1 << 20


def model(conf: str = "", capacity: int | None = None) -> CachingAllocatorModel:
    return CachingAllocatorModel(AllocatorSettings.parse(conf), capacity_bytes=capacity)


def actions(m: CachingAllocatorModel, *wanted: str) -> list[tuple[str, int]]:
    return [(e["action"], e["size"]) for e in m.device_traces[0] if e["action"] in wanted]


# ---------------------------------------------------------------- round_size
def test_requests_round_up_to_512_bytes():
    m = model()
    m.malloc(1)  # max(512, ceil(1/512)*512) = 512
    m.malloc(513)  # ceil(513/512)*512 = 1024
    m.malloc(1024)  # already a multiple: 1024
    assert m.allocated == 512 + 1024 + 1024  # 2560
    assert m.requested == 1 + 513 + 1024  # 1538: the callers' own bytes
    assert m.reserved == 2 * MiB  # all three fit one small 2 MiB segment


def test_roundup_power2_divisions():
    m = model("roundup_power2_divisions:4")
    m.malloc(1200)  # 1200 <= 512*4 = 2048: plain rounding, ceil(1200/512)*512 = 1536
    m.malloc(5 * MiB + 1)  # floor 4 MiB, step 4 MiB/4 = 1 MiB: rounds to 6 MiB
    assert m.allocated == 1536 + 6 * MiB
    # 6 MiB is large and < 10 MiB: a 20 MiB seg; plus the small 2 MiB seg for 1536 B
    assert m.reserved == 2 * MiB + 20 * MiB


# ------------------------------------------------------------ pools and segments
def test_small_large_boundary_is_1_mib():
    m = model()
    m.malloc(1 * MiB)  # s = 1 MiB <= kSmallSize: small pool, a 2 MiB seg
    m.malloc(1 * MiB + 1)  # s = 1 MiB + 512 > 1 MiB: large pool, a 20 MiB seg
    snap = m.snapshot()["segments"]
    assert [(s["segment_type"], s["total_size"]) for s in snap] == [("small", 2 * MiB), ("large", 20 * MiB)]
    assert m.reserved == 22 * MiB


@pytest.mark.parametrize(
    ("request_bytes", "segment"),
    [
        (512, 2 * MiB),  # small: kSmallBuffer
        (1 * MiB + 1, 20 * MiB),  # s = 1 MiB + 512 in (1, 10) MiB: kLargeBuffer
        (10 * MiB - 512, 20 * MiB),  # s < kMinLargeAlloc = 10 MiB: still kLargeBuffer
        (10 * MiB, 10 * MiB),  # s = 10 MiB is not < 10 MiB: ceil(10/2)*2 = 10 MiB
        (11 * MiB, 12 * MiB),  # ceil(11/2)*2 = 12 MiB
        (12 * MiB + 1, 14 * MiB),  # s = 12 MiB + 512: ceil(.../2 MiB)*2 MiB = 14 MiB
    ],
)
def test_segment_sizes(request_bytes, segment):
    m = model()
    m.malloc(request_bytes)
    assert m.segment_sizes == [segment]
    assert m.reserved == segment


def test_pools_are_per_stream():
    m = model()
    m.free(m.malloc(1 * MiB, stream=0))  # stream 0 caches a free 2 MiB seg
    m.malloc(1 * MiB, stream=1)  # stream 1 cannot use it: a second 2 MiB seg
    assert m.reserved == 4 * MiB
    m.malloc(1 * MiB, stream=0)  # stream 0 reuses its cached seg: no growth
    assert m.reserved == 4 * MiB
    assert sorted(s["stream"] for s in m.snapshot()["segments"]) == [0, 1]


# ------------------------------------------------------------------ best fit
def test_best_fit_smallest_block_then_lowest_address():
    m = model()
    a = m.malloc(12 * MiB)  # seg 12 MiB (oldest, lowest address)
    b = m.malloc(14 * MiB)  # seg 14 MiB
    c = m.malloc(12 * MiB)  # seg 12 MiB
    for h in (c, b, a):
        m.free(h)
    assert m.malloc(11 * MiB) == a  # smallest >= 11 MiB is 12 MiB; tie a/c: lowest address a
    assert m.malloc(13 * MiB) == b  # 12 MiB (c) is too small; 14 MiB is the best fit
    assert m.reserved == 12 * MiB + 14 * MiB + 12 * MiB  # 38 MiB: no new segment
    # remainders 1 MiB each are not > 1 MiB: unsplit, the whole blocks count as allocated
    assert m.allocated == 12 * MiB + 14 * MiB


# -------------------------------------------------------------- split rules
def test_small_pool_splits_remainder_of_exactly_512():
    m = model()
    m.malloc(1 * MiB)  # 2 MiB seg: remainder 1 MiB >= 512, split
    m.malloc(1 * MiB - 512)  # from the 1 MiB rest: remainder exactly 512 >= 512, split
    assert m.allocated == 1 * MiB + (1 * MiB - 512)  # 2 MiB - 512: the 512 B stayed free
    m.malloc(512)  # takes that 512 B block exactly
    assert m.allocated == 2 * MiB
    assert m.reserved == 2 * MiB  # all in the first small seg


def test_large_pool_splits_only_remainder_over_1_mib():
    unsplit = model()
    unsplit.malloc(11 * MiB)  # 12 MiB seg, remainder 1 MiB: not > 1 MiB, not split
    assert unsplit.allocated == 12 * MiB  # memory_allocated counts the whole block
    assert unsplit.requested == 11 * MiB
    split = model()
    split.malloc(11 * MiB - 512)  # 12 MiB seg, remainder 1 MiB + 512 > 1 MiB: split
    assert split.allocated == 11 * MiB - 512
    assert [b["state"] for b in split.snapshot()["segments"][0]["blocks"]] == ["active_allocated", "inactive"]


# ---------------------------------------------------------------- coalescing
def test_free_neighbours_merge_within_a_segment():
    m = model()
    a = m.malloc(2 * MiB)  # 20 MiB seg: [0,2) taken, 18 MiB split off
    b = m.malloc(2 * MiB)  # [2,4), 16 MiB left
    c = m.malloc(2 * MiB)  # [4,6), 14 MiB left
    m.free(a)
    m.free(b)  # merges with a: one free 4 MiB block at the seg base
    assert m.malloc(4 * MiB) == a  # best fit: 4 MiB [0,4) beats 14 MiB [6,20)
    assert m.reserved == 20 * MiB
    m.free(a)
    m.free(c)  # [0,4) + [4,6) + [6,20) merge into the whole 20 MiB
    (seg,) = m.snapshot()["segments"]
    assert [(blk["size"], blk["state"]) for blk in seg["blocks"]] == [(20 * MiB, "inactive")]


def test_separate_segments_never_merge():
    m = model()
    a = m.malloc(12 * MiB)  # seg 12 MiB
    b = m.malloc(12 * MiB)  # seg 12 MiB, modelled right after a
    assert b == a + 12 * MiB  # adjacent addresses, so only the segment boundary stops a merge
    m.free(a)
    m.free(b)
    m.malloc(24 * MiB)  # no 24 MiB free block exists: a new 24 MiB seg
    assert m.reserved == 12 * MiB + 12 * MiB + 24 * MiB
    assert m.segment_sizes == [12 * MiB, 12 * MiB, 24 * MiB]


# -------------------------------------------------------- expandable segments
def test_expandable_small_pool_grows_by_2_mib_pages():
    m = model("expandable_segments:True")
    a = m.malloc(1 * MiB)  # maps one 2 MiB page
    m.malloc(1 * MiB)  # the other half of that page
    assert m.reserved == 2 * MiB
    c = m.malloc(1 * MiB)  # maps the next page, contiguous with the first
    assert m.reserved == 4 * MiB
    assert c == a + 2 * MiB
    assert m.segment_sizes == [4 * MiB]  # one contiguous mapped range
    assert actions(m, "segment_map", "segment_alloc") == [("segment_map", 2 * MiB), ("segment_map", 2 * MiB)]


def test_expandable_large_pool_grows_by_20_mib_pages():
    m = model("expandable_segments:True")
    a = m.malloc(3 * MiB)  # one 20 MiB page; 17 MiB split off (remainder >= 512)
    assert m.reserved == 20 * MiB
    b = m.malloc(25 * MiB)  # free 17 MiB + one more 20 MiB page = 37 MiB: takes 25 MiB, 12 MiB left
    assert b == a + 3 * MiB  # starts in the free tail of the first page: no address ambiguity
    assert m.reserved == 40 * MiB  # without expandable: 20 MiB seg + 26 MiB seg = 46 MiB
    assert m.allocated == 3 * MiB + 25 * MiB
    assert m.segment_sizes == [40 * MiB]


def test_expandable_splits_any_remainder_of_512():
    m = model("expandable_segments:True")
    m.malloc(3 * MiB)  # 20 MiB page, 17 MiB free after it
    m.malloc(17 * MiB - 512)  # remainder 512 >= 512: split even in the large pool
    assert m.allocated == 3 * MiB + 17 * MiB - 512  # not charged the whole 17 MiB block
    plain = model()
    plain.malloc(3 * MiB)
    plain.malloc(17 * MiB - 512)  # without expandable: remainder 512 is not > 1 MiB, unsplit
    assert plain.allocated == 3 * MiB + 17 * MiB  # the same step charged 512 B more


def test_expandable_best_fit_counts_tail_block_as_growable():
    m = model("expandable_segments:True")
    m.malloc(3 * MiB)  # [0,3) of the first 20 MiB page
    b = m.malloc(8 * MiB)  # [3,11)
    m.malloc(5 * MiB)  # [11,16); free tail [16,20) = 4 MiB, followed by unmapped space
    m.free(b)  # free [3,11) = 8 MiB
    # smallest fit for 3.5 MiB is the 4 MiB tail, but get_free_block sizes it as
    # 4 MiB + the unmapped rest, so the 8 MiB interior block is taken instead
    assert m.malloc(3 * MiB + MiB // 2) == b
    assert m.reserved == 20 * MiB


def test_expandable_pages_unmapped_by_empty_cache():
    m = model("expandable_segments:True")
    a = m.malloc(3 * MiB)
    b = m.malloc(25 * MiB)  # 40 MiB mapped (two 20 MiB pages)
    m.free(b)
    m.empty_cache()  # page 2 [20,40) is wholly free: unmapped; page 1 holds a
    assert m.reserved == 20 * MiB
    m.free(a)
    m.empty_cache()  # nothing mapped is in use any more
    assert m.reserved == 0
    assert actions(m, "segment_unmap") == [("segment_unmap", 20 * MiB), ("segment_unmap", 20 * MiB)]


# ----------------------------------------------------------- OOM and retries
def test_oom_releases_cached_segments_large_pool_first_and_retries():
    m = model(capacity=40 * MiB)
    m.free(m.malloc(12 * MiB))  # cached large seg, 12 MiB
    m.free(m.malloc(1 * MiB))  # cached small seg, 2 MiB
    m.malloc(30 * MiB)  # 14 + 30 = 44 > 40 MiB: fails; free both cached segs; 30 <= 40: retry works
    assert m.num_alloc_retries == 1
    assert m.reserved == 30 * MiB
    assert actions(m, "segment_free") == [("segment_free", 12 * MiB), ("segment_free", 2 * MiB)]
    with pytest.raises(ModelledOutOfMemory) as info:
        m.malloc(20 * MiB)  # 30 + 20 = 50 > 40 MiB; nothing cached to free: retry fails too
    assert (info.value.alloc_size, info.value.reserved, info.value.device_free) == (20 * MiB, 30 * MiB, 10 * MiB)
    assert m.num_alloc_retries == 2
    assert m.num_ooms == 1
    oom = m.device_traces[0][-1]
    assert (oom["action"], oom["size"], oom["device_free"]) == ("oom", 20 * MiB, 10 * MiB)


# ------------------------------------------------------------ max_split_size
def test_max_split_size_blocks_are_not_split():
    m = model("max_split_size_mb:20")
    m.free(m.malloc(30 * MiB))  # cached 30 MiB seg
    m.malloc(25 * MiB)  # 25 >= 20 MiB: may take 30 MiB (< 25 + 20), but never split it
    assert m.allocated == 30 * MiB  # default settings would split off 5 MiB: 25 MiB
    assert m.reserved == 30 * MiB


def test_max_split_size_small_request_skips_oversize_block():
    m = model("max_split_size_mb:20")
    m.free(m.malloc(30 * MiB))  # cached oversize block (30 >= 20 MiB)
    m.malloc(12 * MiB)  # 12 < 20 MiB must not take a block >= 20 MiB: new 12 MiB seg
    assert m.reserved == 30 * MiB + 12 * MiB


@pytest.mark.parametrize(("request_mib", "reserved_mib"), [(30, 50 + 30), (31, 50)])
def test_max_non_split_rounding_limits_oversize_reuse(request_mib, reserved_mib):
    m = model("max_split_size_mb:20")
    m.free(m.malloc(50 * MiB))  # cached 50 MiB
    # oversize requests may take a block only if block < request + 20 MiB (kLargeBuffer):
    # 50 >= 30 + 20 is rejected (new 30 MiB seg); 50 < 31 + 20 is taken
    m.malloc(request_mib * MiB)
    assert m.reserved == reserved_mib * MiB


def test_max_split_size_oom_frees_only_enough_oversize_blocks_without_retry():
    m = model("max_split_size_mb:20", capacity=40 * MiB)
    m.free(m.malloc(1 * MiB))  # cached small 2 MiB seg
    m.free(m.malloc(30 * MiB))  # cached oversize 30 MiB seg
    m.malloc(12 * MiB)  # cannot use 30 MiB; 32 + 12 = 44 > 40 fails;
    # release_available_cached_blocks frees the 30 MiB one (>= max(12, 20) MiB), 2 + 12 <= 40
    assert m.reserved == 2 * MiB + 12 * MiB  # the small seg stayed cached
    assert m.num_alloc_retries == 0  # that path is not a counted retry
    assert actions(m, "segment_free") == [("segment_free", 30 * MiB)]


# --------------------------------------------------------------- empty_cache
def test_empty_cache_frees_only_wholly_free_segments():
    m = model()
    m.malloc(2 * MiB)  # 20 MiB seg, split: 18 MiB free inside it
    m.free(m.malloc(24 * MiB))  # 24 > 18 MiB free: its own 24 MiB seg, then wholly free
    m.empty_cache()
    assert m.reserved == 20 * MiB  # the split seg holds a live block and stays
    assert actions(m, "segment_free") == [("segment_free", 24 * MiB)]


# ------------------------------------------------------ stats and bookkeeping
def test_peaks_fragmentation_and_reset():
    m = model()
    a = m.malloc(3 * MiB)  # reserved peak 20 MiB reached with 3 MiB allocated
    assert (m.peak_reserved, m.peak_allocated, m.fragmentation) == (20 * MiB, 3 * MiB, 17 * MiB)
    m.free(a)
    m.malloc(2 * MiB)
    m.reset_peak()
    assert (m.peak_reserved, m.peak_allocated) == (20 * MiB, 2 * MiB)


def test_zero_bytes_and_bad_frees():
    m = model()
    assert m.malloc(0) is None  # allocate(0) never reaches malloc
    m.free(None)
    h = m.malloc(100)
    m.free(h)
    with pytest.raises(ValueError):
        m.free(h)  # double free
    with pytest.raises(ValueError):
        m.malloc(-1)


# ---------------------------------------------------------------- settings
def test_parse_good_conf():
    s = AllocatorSettings.parse("expandable_segments:True, max_split_size_mb:128")  # spaces are ignored
    assert (s.expandable_segments, s.max_split_size) == (True, 128 * MiB)
    assert AllocatorSettings.parse("") == AllocatorSettings()
    # per interval (MiB keys): below 256 MiB -> 1, 256 MiB -> 1, 512 MiB -> 2, then ">" refills
    # from the last index (512 MiB, inclusive, as the source's std::fill does) -> 8
    table = AllocatorSettings.parse("roundup_power2_divisions:[256:1,512:2,>:8]").roundup_power2_divisions
    assert table == (1,) * 8 + (1,) + (8,) * 7
    assert AllocatorSettings.parse("garbage_collection_threshold:0.6").garbage_collection_threshold == 0.6


@pytest.mark.parametrize(
    ("conf", "says"),
    [
        ("max_split_size:128", "unrecognized key"),
        ("expandable_segments:true", "True/False"),
        ("expandable_segments", "expected ':'"),
        ("max_split_size_mb:abc", "integer"),
        ("max_split_size_mb:19", "must be >= 20"),
        ("garbage_collection_threshold:1.5", "(0.0, 1.0)"),
        ("backend:cudaMallocAsync", "not modelled"),
        ("expandable_segments:True,", "trailing"),
        ("roundup_power2_divisions:3", "power of 2"),
    ],
)
def test_bad_conf_is_a_config_error_naming_supported_keys(conf, says):
    with pytest.raises(ConfigError) as info:
        AllocatorSettings.parse(conf)
    assert says in str(info.value)
    assert "expandable_segments" in str(info.value) and "max_split_size_mb" in str(info.value)


# ---------------------------------------------------------------- snapshot
def _busy_model(conf: str) -> CachingAllocatorModel:
    m = model(conf)
    keep = [m.malloc(n) for n in (100, 3 * MiB, 25 * MiB, 700_000)]
    m.free(keep[1])
    m.free(m.malloc(50 * MiB))
    m.empty_cache()
    return m


@pytest.mark.parametrize("conf", ["", "expandable_segments:True"])
def test_snapshot_agrees_with_stats_and_memory_viz(conf):
    from torch.cuda import _memory_viz

    m = _busy_model(conf)
    snap = pickle.loads(pickle.dumps(m.snapshot(), protocol=4))  # the viewer reads protocol 4
    assert sum(s["total_size"] for s in snap["segments"]) == m.reserved
    assert sum(s["allocated_size"] for s in snap["segments"]) == m.allocated
    for seg in snap["segments"]:
        assert sum(b["size"] for b in seg["blocks"]) == seg["total_size"]
        assert seg["blocks"][0]["address"] == seg["address"]
        assert seg["is_expandable"] is bool(conf)
    trace = snap["device_traces"][0]
    assert [e["time_us"] for e in trace] == sorted(e["time_us"] for e in trace)
    assert trace[0]["action"] == ("segment_map" if conf else "segment_alloc")
    assert next(e for e in trace if e["action"] == "alloc")["size"] == 100  # requested bytes
    # segsum re-adds every block and raises on any accounting mismatch
    assert f"segments: {len(snap['segments'])}" in _memory_viz.segsum(snap)
    assert "del " in _memory_viz.trace(snap)
    assert "snapshot.pickle" in _memory_viz.segment_plot(snap)
    assert "snapshot.pickle" in _memory_viz.trace_plot(snap)
