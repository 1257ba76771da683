"""A replay model of PyTorch's CUDA caching allocator (native backend, one device).

Followed function by function from ``c10/cuda/CUDACachingAllocator.cpp``
(``DeviceCachingAllocator``; the same logic lives in ``c10/core/CachingDeviceAllocator.h`` in
newer trees). Function names in comments are PyTorch's. What is not modelled, and why:

- ``record_stream`` / cross-stream events (``insert_events``, ``process_events``): a freed block
  is reusable at once. membench's traces have no record_stream uses.
- CUDA graph private pools and ``MemPool``: no graph capture in a replay.
- ``trigger_free_memory_callbacks``: only IPC callbacks register there.
- ``set_per_process_memory_fraction``, and so ``garbage_collection_threshold``, which PyTorch only
  acts on when a fraction is set (``garbage_collect_cached_blocks`` runs under ``set_fraction``).
- Real addresses. Each new cudaMalloc segment gets a fresh, 2 MiB-aligned range above every
  earlier one, so among equal-size free blocks in different segments the OLDEST segment wins the
  tie. The relative addresses CUDA really returns are unknowable; after a segment is freed, CUDA
  may hand a later segment a lower address, which this model never does. Within one segment
  (and within one expandable segment) addresses are exact.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from membench.allocator import ALLOCATOR_ROUNDING
from membench.caching_allocator.settings import LARGE_BUFFER, MIB, AllocatorSettings

# Constants of CUDACachingAllocator.cpp (top of the file, namespace Native):
MIN_BLOCK_SIZE = ALLOCATOR_ROUNDING  # kMinBlockSize = 512: every size rounds up to it
SMALL_SIZE = 1 * MIB  # kSmallSize: largest "small" request
SMALL_BUFFER = 2 * MIB  # kSmallBuffer: small requests are packed in 2 MiB segments
MIN_LARGE_ALLOC = 10 * MIB  # kMinLargeAlloc: requests in (1, 10) MiB get a kLargeBuffer segment
ROUND_LARGE = 2 * MIB  # kRoundLarge: larger segments round up to 2 MiB
# Expandable segments map physical memory in pages of kSmallBuffer (small pool) or
# kLargeBuffer (large pool): find_expandable_block, "segment_size = is_small ? kSmallBuffer : kLargeBuffer".
SMALL_PAGE = SMALL_BUFFER
LARGE_PAGE = LARGE_BUFFER
# The model's own address layout (not PyTorch's): segments start 2 MiB-aligned, as cudaMalloc
# returns them, and an expandable segment reserves 9/8 of the device
# (ExpandableSegment: "address space for 1 1/8 the total memory"), or 1 TiB with no capacity.
SEGMENT_ALIGN = 2 * MIB
FIRST_ADDRESS = 1 << 32  # nonzero, so no block sits at address 0 (a null pointer)
UNBOUNDED_ADDRESS_SPACE = 1 << 40


class ModelledOutOfMemory(Exception):
    """The model's cudaMalloc failed even after releasing cached memory (PyTorch would raise
    ``torch.OutOfMemoryError``). Carries the request and the allocator state at that moment."""

    def __init__(self, *, nbytes: int, size: int, alloc_size: int, stream: int, allocated: int,
                 reserved: int, capacity: int | None) -> None:
        self.nbytes = nbytes  # what the caller asked for
        self.size = size  # after round_size
        self.alloc_size = alloc_size  # the segment cudaMalloc was asked for
        self.stream = stream
        self.allocated = allocated
        self.reserved = reserved
        self.capacity = capacity
        self.device_free = None if capacity is None else capacity - reserved
        super().__init__(
            f"modelled CUDA out of memory: tried to allocate {alloc_size} B (request {nbytes} B, "
            f"stream {stream}); capacity {capacity} B, reserved {reserved} B, allocated {allocated} B, "
            f"reserved but unallocated {reserved - allocated} B"
        )


class _Segment:
    """One cudaMalloc allocation, or one expandable segment (its whole virtual range)."""

    __slots__ = ("base", "size", "stream", "small", "expandable", "page")

    def __init__(self, base: int, size: int, stream: int, small: bool, expandable: bool, page: int) -> None:
        self.base = base
        self.size = size  # bytes: cudaMalloc size, or the reserved virtual range
        self.stream = stream
        self.small = small
        self.expandable = expandable
        self.page = page  # mapping granularity of an expandable segment


class _Block:
    """PyTorch's ``Block``: a piece of one segment, linked to its neighbours in that segment."""

    __slots__ = ("addr", "size", "requested", "allocated", "mapped", "prev", "next", "seg")

    def __init__(self, addr: int, size: int, seg: _Segment, mapped: bool = True) -> None:
        self.addr = addr
        self.size = size
        self.requested = 0
        self.allocated = False
        self.mapped = mapped
        self.prev: _Block | None = None
        self.next: _Block | None = None
        self.seg = seg

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None


class CachingAllocatorModel:
    """Replays malloc/free events through the caching allocator's rules; all sizes are int bytes.

    ``malloc(nbytes, stream)`` returns a handle (the block's modelled address) for ``free``.
    ``capacity_bytes``: what cudaMalloc may hold in total (None = unlimited, never OOM).
    """

    def __init__(self, settings: AllocatorSettings | None = None, capacity_bytes: int | None = None,
                 record_trace: bool = True) -> None:
        self.settings = settings if settings is not None else AllocatorSettings()
        self.capacity = capacity_bytes
        self._max_split = self.settings.max_split_size
        # round_size only consults the divisions table when some entry is > 1
        self._power2_rounding = any(d > 1 for d in self.settings.roundup_power2_divisions)
        self._expandable = self.settings.expandable_segments
        # BlockPool.blocks, one sorted list of (size, addr, block) per (is_small, stream):
        # PyTorch's set is ordered by (stream, size, ptr) (BlockComparatorSize), so a
        # per-stream list in (size, addr) order is the same search.
        self._free: dict[tuple[bool, int], list[tuple[int, int, _Block]]] = {}
        # BlockPool.unmapped (expandable segments), per (is_small, stream), by address.
        self._unmapped: dict[tuple[bool, int], list[tuple[int, _Block]]] = {}
        self._active: dict[int, _Block] = {}  # allocated blocks by address (allocated_blocks)
        self._segments: dict[int, _Segment] = {}  # by base address
        self._next_address = FIRST_ADDRESS
        self.allocated = 0  # stats.allocated_bytes: block sizes, as memory_allocated() counts
        self.requested = 0  # stats.requested_bytes: the callers' own byte counts
        self.reserved = 0  # stats.reserved_bytes: cudaMalloc'd or mapped bytes
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.fragmentation = 0  # reserved - allocated after the malloc that set peak_reserved
        self._reserved_peak_moved = False
        self.num_alloc_retries = 0
        self.num_ooms = 0
        self.num_device_alloc = 0
        self.num_device_free = 0
        self._record = record_trace
        self._trace: list[tuple[str, int, int, int, int]] = []  # (action, addr, size, stream, time)
        self._clock = 0

    # ----------------------------------------------------------------- public API
    def malloc(self, nbytes: int, stream: int = 0) -> int | None:
        """DeviceCachingAllocator::malloc. Returns a handle for ``free`` (None for 0 bytes:
        CUDAAllocator::allocate never calls malloc for size 0)."""
        if nbytes <= 0:
            if nbytes == 0:
                return None
            raise ValueError(f"malloc of {nbytes} bytes")
        if self._power2_rounding:
            size = self._round_size(nbytes)
        else:  # round_size without roundup_power2_divisions: a multiple of kMinBlockSize, >= it
            size = -(-nbytes // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
        small = size <= SMALL_SIZE  # get_pool
        alloc_size = _allocation_size(size)  # get_allocation_size
        key = (small, stream)
        block = self._get_free_block(key, size)
        if block is None:
            # alloc_block, then release_available_cached_blocks + alloc_block, then
            # release_cached_blocks + alloc_block(isRetry=true): the order in malloc
            block = self._alloc_block(key, size, alloc_size, False)
            if block is None and self._release_available_cached_blocks(key, size):
                block = self._alloc_block(key, size, alloc_size, False)
            if block is None:
                self._release_cached_blocks()
                block = self._alloc_block(key, size, alloc_size, True)
            if block is None:
                self.num_ooms += 1
                free_bytes = 0 if self.capacity is None else self.capacity - self.reserved
                # record_trace(OOM, device_free, params.size(), ...)
                self._event("oom", free_bytes, size, stream)
                raise ModelledOutOfMemory(nbytes=nbytes, size=size, alloc_size=alloc_size, stream=stream,
                                          allocated=self.allocated, reserved=self.reserved,
                                          capacity=self.capacity)
        block = self._alloc_found_block(key, block, size, nbytes, self._should_split(block, size, small))
        return block.addr

    def free(self, handle: int | None) -> None:
        """DeviceCachingAllocator::free + free_block (no stream uses, so the free completes at once)."""
        if handle is None:
            return
        block = self._active.pop(handle, None)
        if block is None:
            raise ValueError(f"free of {handle!r}: not an allocated block (double free?)")
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        if self._record:
            seg = block.seg
            self._trace.append(("free_requested", handle, block.requested, seg.stream, self._clock))
            self._trace.append(("free_completed", handle, block.requested, seg.stream, self._clock + 1))
        self._clock += 2
        # free_block: merge with free neighbours of the same segment, then back to the pool
        if block.prev is not None and not block.prev.allocated:
            self._try_merge(block, block.prev)
        if block.next is not None and not block.next.allocated:
            self._try_merge(block, block.next)
        block.requested = 0
        self._insert_free(block)

    def empty_cache(self) -> None:
        """emptyCache -> release_cached_blocks: free every unsplit cached segment, unmap every
        free page of expandable segments."""
        self._release_cached_blocks()

    def reset_peak(self) -> None:
        """resetPeakStats: peaks restart from the current values."""
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
        self.fragmentation = self.reserved - self.allocated

    @property
    def segment_sizes(self) -> list[int]:
        """Sizes of the segments memory_snapshot() would list, in address order (an expandable
        segment counts once per contiguous mapped range, as snapshot() reports it)."""
        return [seg["total_size"] for seg in self._snapshot_segments()]

    @property
    def segment_count(self) -> int:
        return len(self.segment_sizes)

    @property
    def device_traces(self) -> list[list[dict]]:
        """Trace events in memory_snapshot's format (one device). Alloc/free ``size`` is the
        requested size; segment events carry the segment (or mapped range) size; an ``oom``
        carries ``device_free`` instead of ``addr``, as torch's snapshot writer does."""
        events = []
        for action, addr, size, stream, time_us in self._trace:
            event = {"action": action, "size": size, "stream": stream, "time_us": time_us, "frames": []}
            event["device_free" if action == "oom" else "addr"] = addr
            events.append(event)
        return [events]

    def snapshot(self) -> dict:
        """The final state as ``torch.cuda.memory._snapshot()`` returns it (pickle it with
        protocol 4 for pytorch.org/memory_viz)."""
        return {
            "segments": self._snapshot_segments(),
            "device_traces": self.device_traces,
            "allocator_settings": self.settings.as_snapshot_dict(),
        }

    # --------------------------------------------------------------- size rules
    def _round_size(self, size: int) -> int:
        """round_size: at least kMinBlockSize; a multiple of it, unless roundup_power2_divisions
        applies to this size's interval."""
        if size < MIN_BLOCK_SIZE:
            return MIN_BLOCK_SIZE
        divisions = self.settings.divisions_for(size)
        if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
            return _roundup_power2_next_division(size, divisions)
        return -(-size // MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE

    def _should_split(self, block: _Block, size: int, small: bool) -> bool:
        """should_split: small pool or expandable segments split a remainder >= kMinBlockSize;
        the large pool only a remainder > kSmallSize, and never a request >= max_split_size."""
        remaining = block.size - size
        if small or self._expandable:
            return remaining >= MIN_BLOCK_SIZE
        return (self._max_split is None or size < self._max_split) and remaining > SMALL_SIZE

    # ------------------------------------------------------------- free lists
    def _insert_free(self, block: _Block) -> None:
        insort(self._free.setdefault((block.seg.small, block.seg.stream), []), (block.size, block.addr, block))

    def _remove_free(self, block: _Block) -> None:
        blocks = self._free[(block.seg.small, block.seg.stream)]
        del blocks[bisect_left(blocks, (block.size, block.addr))]

    def _insert_unmapped(self, block: _Block) -> None:
        insort(self._unmapped.setdefault((block.seg.small, block.seg.stream), []), (block.addr, block))

    def _remove_unmapped(self, block: _Block) -> None:
        blocks = self._unmapped[(block.seg.small, block.seg.stream)]
        del blocks[bisect_left(blocks, (block.addr,))]

    def _try_merge(self, dst: _Block, src: _Block | None) -> None:
        """try_merge_blocks: absorb a free neighbour in the same mapped state. prev/next never
        cross a segment boundary, so separate segments never merge."""
        if src is None or src.allocated or src.mapped != dst.mapped:
            return
        if dst.prev is src:  # [src dst]
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:  # [dst src]
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        if src.mapped:
            self._remove_free(src)
        else:
            self._remove_unmapped(src)
        dst.size += src.size

    # ----------------------------------------------------------------- lookup
    def _get_free_block(self, key: tuple[bool, int], size: int) -> _Block | None:
        """get_free_block: the smallest free block of this pool and stream with size >= the
        request, lowest address among equals; then the max_split_size limits."""
        blocks = self._free.get(key)
        if not blocks:
            return None
        i = bisect_left(blocks, (size,))
        if i == len(blocks):
            return None
        block = blocks[i][2]
        if block.seg.expandable:
            # For best fit, a block followed by unmapped space counts as the size it can grow
            # to, so walk on while the next candidate's expandable size is smaller.
            while i + 1 < len(blocks) and _expandable_size(blocks[i + 1][2]) < _expandable_size(blocks[i][2]):
                i += 1
            block = blocks[i][2]
        if self._max_split is not None:
            # "Do not return an oversized block for a large request"
            if size < self._max_split and block.size >= self._max_split:
                return None
            # "Allow oversized block size to be rounded up but within a limit"
            if size >= self._max_split and block.size >= size + self.settings.max_non_split_rounding_size:
                return None
        del blocks[i]
        return block

    # -------------------------------------------------------------- new memory
    def _alloc_block(self, key: tuple[bool, int], size: int, alloc_size: int, is_retry: bool) -> _Block | None:
        """alloc_block: cudaMalloc a new segment of alloc_size, or grow an expandable segment."""
        if is_retry:
            self.num_alloc_retries += 1
        small, stream = key
        if self._expandable:
            return self._try_allocate_expandable_block(key, size)
        if self.capacity is not None and self.reserved + alloc_size > self.capacity:
            return None  # cudaMalloc returned cudaErrorMemoryAllocation
        seg = _Segment(self._fresh_address(alloc_size), alloc_size, stream, small, False, alloc_size)
        self._segments[seg.base] = seg
        self.num_device_alloc += 1
        self._grow_reserved(alloc_size)
        self._event("segment_alloc", seg.base, alloc_size, stream)
        return _Block(seg.base, alloc_size, seg)

    def _fresh_address(self, size: int) -> int:
        base = self._next_address
        self._next_address += -(-size // SEGMENT_ALIGN) * SEGMENT_ALIGN
        return base

    def _grow_reserved(self, nbytes: int) -> None:
        self.reserved += nbytes
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved
            self._reserved_peak_moved = True

    def _alloc_found_block(self, key: tuple[bool, int], block: _Block, size: int, nbytes: int,
                           split: bool) -> _Block:
        """alloc_found_block: the allocation takes the low-address part; the remainder goes
        back to the pool. Unsplit, the block keeps (and is charged) its whole size."""
        if split:
            remaining = block
            block = _Block(remaining.addr, size, remaining.seg)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.addr += size
            remaining.size -= size
            self._insert_free(remaining)
        block.allocated = True
        block.requested = nbytes
        self._active[block.addr] = block
        self.allocated += block.size
        self.requested += nbytes
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self._reserved_peak_moved:
            # fragmentation = reserved - allocated once the malloc that raised the reserved
            # peak has placed its block: the cached-but-unused memory that forced the growth
            self.fragmentation = self.reserved - self.allocated
            self._reserved_peak_moved = False
        if self._record:
            self._trace.append(("alloc", block.addr, nbytes, key[1], self._clock))
        self._clock += 1
        return block

    # ----------------------------------------------------------- giving back
    def _release_block(self, block: _Block) -> None:
        """release_block: cudaFree a whole (unsplit, free) segment."""
        self._remove_free(block)
        seg = self._segments.pop(block.seg.base)
        self.reserved -= seg.size
        self.num_device_free += 1
        self._event("segment_free", seg.base, seg.size, seg.stream)

    def _release_available_cached_blocks(self, key: tuple[bool, int], size: int) -> bool:
        """release_available_cached_blocks: with max_split_size set, cudaFree the smallest
        cached oversize block of this pool and stream that covers max(size, max_split_size),
        else the largest oversize blocks until together they do. Expandable blocks are
        skipped, so with expandable segments it frees nothing."""
        if self._max_split is None or self._expandable:
            return False
        blocks = self._free.get(key)
        if not blocks:
            return False
        target = max(size, self._max_split)
        i = bisect_left(blocks, (target,))
        if i < len(blocks):
            self._release_block(blocks[i][2])
            return True
        released = 0
        j = len(blocks) - 1
        # free oversize blocks, largest first, until enough (or none left)
        while j >= 0 and released < target and blocks[j][0] >= self._max_split:
            block = blocks[j][2]
            released += block.size
            self._release_block(block)
            j -= 1
        return released >= target

    def _release_cached_blocks(self) -> None:
        """release_cached_blocks -> release_blocks(large_blocks), then release_blocks(small_blocks):
        cudaFree every free block that is a whole segment; unmap the free pages of expandable
        segments. Within a pool, PyTorch walks (stream, size, address) order."""
        for small in (False, True):
            for key in sorted(k for k in self._free if k[0] == small):
                to_unmap = []
                for _, _, block in list(self._free[key]):
                    if block.seg.expandable:
                        to_unmap.append(block)
                    elif not block.is_split():
                        self._release_block(block)
                for block in to_unmap:
                    self._unmap_block(block)
                    if not block.mapped and not block.is_split():  # release_expandable_segment: nothing mapped
                        self._remove_unmapped(block)
                        del self._segments[block.seg.base]

    # ------------------------------------------------------ expandable segments
    def _try_allocate_expandable_block(self, key: tuple[bool, int], size: int) -> _Block | None:
        """try_allocate_expandable_block: map pages at the lowest address with room, merging
        with the free block before them; a failed map leaves earlier maps in place."""
        candidate = self._find_expandable_block(key, size)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            nxt = candidate.next
            assert nxt is not None and not nxt.mapped
            if not self._map_block(nxt, min(size - candidate.size, nxt.size)):
                return None
            candidate = nxt  # map_block merged the old candidate into it
        self._remove_free(candidate)
        return candidate

    def _find_expandable_block(self, key: tuple[bool, int], size: int) -> _Block:
        """find_expandable_block: the lowest-address unmapped range of this pool and stream
        (with the free block right before it) that has room; else a new expandable segment."""
        for _, block in self._unmapped.get(key, ()):
            candidate = block
            if candidate.prev is not None and not candidate.prev.allocated:
                candidate = candidate.prev
            room, walk = 0, candidate
            while room < size and walk is not None and not walk.allocated:
                room += walk.size
                walk = walk.next
            if room >= size:
                return candidate
        small, stream = key
        page = SMALL_PAGE if small else LARGE_PAGE
        space = UNBOUNDED_ADDRESS_SPACE if self.capacity is None else self.capacity + self.capacity // 8
        virtual = -(-space // page) * page
        seg = _Segment(self._fresh_address(virtual), virtual, stream, small, True, page)
        self._segments[seg.base] = seg
        block = _Block(seg.base, virtual, seg, mapped=False)
        self._insert_unmapped(block)
        return block

    def _map_block(self, to_map: _Block, size: int) -> bool:
        """map_block: back [addr, addr + size) with whole pages (ExpandableSegment::map); the
        mapped part becomes a free block merged with its free neighbours."""
        seg = to_map.seg
        page = seg.page
        offset = to_map.addr - seg.base
        assert offset % page == 0
        mapped = -(-(offset + size) // page) * page - offset
        if self.capacity is not None and self.reserved + mapped > self.capacity:
            return False  # cuMemCreate failed; the pages of this call are released again
        self._remove_unmapped(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            rest = _Block(to_map.addr + mapped, to_map.size - mapped, seg, mapped=False)
            rest.prev, rest.next = to_map, to_map.next
            if to_map.next is not None:
                to_map.next.prev = rest
            to_map.next = rest
            self._insert_unmapped(rest)
            to_map.size = mapped
        self._try_merge(to_map, to_map.prev)
        self._try_merge(to_map, to_map.next)
        self._insert_free(to_map)
        self.num_device_alloc += 1
        self._grow_reserved(mapped)
        self._event("segment_map", offset + seg.base, mapped, seg.stream)
        return True

    def _unmap_block(self, block: _Block) -> None:
        """unmap_block: give back the whole pages inside a free block (ExpandableSegment::unmap);
        partial pages at either end stay mapped as free blocks."""
        seg = block.seg
        page = seg.page
        start = block.addr - seg.base
        end = start + block.size
        first = -(-start // page) * page
        last = end // page * page
        if first >= last:
            return
        self._remove_free(block)
        if first > start:
            before = _Block(block.addr, first - start, seg)
            before.prev, before.next = block.prev, block
            if block.prev is not None:
                block.prev.next = before
            block.prev = before
            self._insert_free(before)
        if end > last:
            after = _Block(seg.base + last, end - last, seg)
            after.prev, after.next = block, block.next
            if block.next is not None:
                block.next.prev = after
            block.next = after
            self._insert_free(after)
        block.addr = seg.base + first
        block.size = last - first
        block.mapped = False
        self._try_merge(block, block.prev)
        self._try_merge(block, block.next)
        self._insert_unmapped(block)
        self.reserved -= last - first
        self.num_device_free += 1
        self._event("segment_unmap", seg.base + first, last - first, seg.stream)

    # ---------------------------------------------------------------- snapshot
    def _event(self, action: str, addr: int, size: int, stream: int) -> None:
        if self._record:
            self._trace.append((action, addr, size, stream, self._clock))
        self._clock += 1

    def _all_blocks(self) -> list[_Block]:
        blocks = list(self._active.values())
        for free in self._free.values():
            blocks.extend(entry[2] for entry in free)
        for unmapped in self._unmapped.values():
            blocks.extend(entry[1] for entry in unmapped)
        return blocks

    def _snapshot_segments(self) -> list[dict]:
        """DeviceCachingAllocator::snapshot: one entry per segment head, or, for expandable
        segments, per contiguous mapped range; sorted by address."""
        result = []
        for head in self._all_blocks():
            if not head.mapped or (head.prev is not None and head.prev.mapped):
                continue
            seg = head.seg
            blocks, total, allocated, requested = [], 0, 0, 0
            block: _Block | None = head
            while block is not None and block.mapped:
                blocks.append({
                    "address": block.addr,
                    "size": block.size,
                    "requested_size": block.requested,
                    "state": "active_allocated" if block.allocated else "inactive",
                    "frames": [],
                })
                total += block.size
                if block.allocated:
                    allocated += block.size
                    requested += block.requested
                block = block.next
            result.append({
                "device": 0,
                "address": head.addr,
                "total_size": total,
                "allocated_size": allocated,
                "active_size": allocated,  # no stream uses: active == allocated
                "requested_size": requested,
                "stream": seg.stream,
                "segment_type": "small" if seg.small else "large",
                "segment_pool_id": (0, 0),
                "is_expandable": seg.expandable,
                "frames": [],
                "blocks": blocks,
            })
        result.sort(key=lambda s: s["address"])
        return result


def _allocation_size(size: int) -> int:
    """get_allocation_size: the segment cudaMalloc gets for a rounded request."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """roundup_power2_next_division: round up to the next of ``divisions`` equal steps
    between the powers of two around ``size``."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def _expandable_size(block: _Block) -> int:
    """get_free_block's expandable_size: the block plus the unmapped space right after it."""
    nxt = block.next
    return block.size + (nxt.size if nxt is not None and not nxt.mapped else 0)
