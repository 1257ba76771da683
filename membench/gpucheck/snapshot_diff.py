"""Compare allocator snapshots (``torch.cuda.memory._snapshot()`` format) without a GPU.

Pure functions on snapshot dicts (``segments`` + ``device_traces``), used by the kit's
``snapshot-replay`` probe (:mod:`membench.gpucheck.probes`):

* :func:`snapshot_figures`: what a snapshot itself says: reserved bytes and segments at the end
  (its ``segments``' ``total_size``) and the peak reserved over its trace (segment events).
* :func:`replay_snapshot`: replay its ``alloc``/``free_completed`` events (sizes as recorded)
  through :class:`~membench.caching_allocator.CachingAllocatorModel`: the model's figures for the
  real sequence of requests, so a gap in reserved memory is the model's rules, not the log's.
* :func:`diff_allocations`: two snapshots' alloc and free sizes as multisets (rounded up to 512 B),
  and what each has that the other does not: the allocations a simulated log misses.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from membench.caching_allocator import AllocatorSettings, CachingAllocatorModel, ModelledOutOfMemory

ROUNDING = 512  # the caching allocator's kMinBlockSize: sizes that round alike are the same block
GROW = ("segment_alloc", "segment_map")
SHRINK = ("segment_free", "segment_unmap")


def trace_events(snapshot: dict) -> list[dict]:
    """The trace of the snapshot's first device that has one (a one-GPU run records one)."""
    for trace in snapshot.get("device_traces") or []:
        if trace:
            return list(trace)
    return []


def rounded(size: int) -> int:
    return -(-int(size) // ROUNDING) * ROUNDING


def size_multisets(snapshot: dict) -> dict[str, Counter]:
    """``alloc`` and ``free_completed`` sizes of the trace, each rounded up to 512 B, as Counters."""
    sets = {"alloc": Counter(), "free": Counter()}
    for event in trace_events(snapshot):
        if event.get("action") == "alloc":
            sets["alloc"][rounded(event["size"])] += 1
        elif event.get("action") == "free_completed":
            sets["free"][rounded(event["size"])] += 1
    return sets


def top(counter: Counter, limit: int) -> list[dict[str, int]]:
    """The largest entries by total bytes (size x count), as ``{"size", "count", "bytes"}``."""
    rows = sorted(counter.items(), key=lambda item: (-item[0] * item[1], -item[0]))
    return [{"size": size, "count": count, "bytes": size * count} for size, count in rows[:limit]]


def diff_allocations(real: dict, simulated: dict, limit: int = 10) -> dict[str, Any]:
    """What one snapshot's trace allocates (or frees) that the other's does not, by rounded size.

    Returns:
        ``allocs_only_in_real`` / ``allocs_only_in_simulated`` / ``frees_only_in_real`` /
        ``frees_only_in_simulated``: the top ``limit`` unmatched sizes (by bytes) with counts;
        ``*_unmatched_count`` and ``*_unmatched_bytes``: their totals over all sizes; and each side's
        number of allocs and frees. An allocation the simulation misses (a workspace, a kernel's
        scratch buffer) is in ``allocs_only_in_real``; a free one side never makes (a tensor kept
        alive) shows as a free only in the other.
    """
    sets = {"real": size_multisets(real), "simulated": size_multisets(simulated)}
    out: dict[str, Any] = {"rounding_bytes": ROUNDING}
    for side in sets:
        out[f"{side}_allocs"] = sum(sets[side]["alloc"].values())
        out[f"{side}_frees"] = sum(sets[side]["free"].values())
    for kind, plural in (("alloc", "allocs"), ("free", "frees")):
        for side, other in (("real", "simulated"), ("simulated", "real")):
            unmatched = sets[side][kind] - sets[other][kind]
            key = f"{plural}_only_in_{side}"
            out[key] = top(unmatched, limit)
            out[f"{key}_unmatched_count"] = sum(unmatched.values())
            out[f"{key}_unmatched_bytes"] = sum(size * count for size, count in unmatched.items())
    return out


def snapshot_figures(snapshot: dict) -> dict[str, Any]:
    """Reserved bytes and segments at the snapshot's end, and its trace's peak reserved.

    The trace's segment events (``segment_alloc``/``segment_map`` grow, ``segment_free``/
    ``segment_unmap`` shrink) give reserved memory over time; the segments held before the trace
    started are what the final segments do not account for, so the peak is exact even then.
    """
    segments = snapshot.get("segments") or []
    final = sum(int(segment["total_size"]) for segment in segments)
    delta, peak_delta = 0, 0
    for event in trace_events(snapshot):
        action = event.get("action")
        if action in GROW:
            delta += int(event["size"])
            peak_delta = max(peak_delta, delta)
        elif action in SHRINK:
            delta -= int(event["size"])
    start = final - delta
    return {"reserved_bytes": final, "segment_count": len(segments),
            "segment_sizes": sorted((int(segment["total_size"]) for segment in segments), reverse=True),
            "peak_reserved_bytes": start + peak_delta, "reserved_before_trace_bytes": start,
            "segment_events": sum(event.get("action") in GROW + SHRINK for event in trace_events(snapshot))}


def replay_snapshot(snapshot: dict, settings: Optional[AllocatorSettings] = None,
                    capacity_bytes: Optional[int] = None) -> dict[str, Any]:
    """Replay the trace's ``alloc``/``free_completed`` events through the allocator model.

    Each alloc's ``size`` (what was requested) goes to ``malloc`` on its ``stream``; a
    ``free_completed`` frees the block the alloc at that address made. Frees of blocks allocated
    before the trace started are counted and skipped (the model never saw them).
    """
    model = CachingAllocatorModel(settings, capacity_bytes, record_trace=False)
    handles: dict[int, Any] = {}
    replayed = unknown_frees = 0
    oom = None
    try:
        for event in trace_events(snapshot):
            action = event.get("action")
            if action == "alloc":
                handles[event["addr"]] = model.malloc(int(event["size"]), int(event.get("stream") or 0))
                replayed += 1
            elif action == "free_completed":
                if event["addr"] in handles:
                    model.free(handles.pop(event["addr"]))
                else:
                    unknown_frees += 1
    except ModelledOutOfMemory as error:
        oom = str(error)
    sizes = model.segment_sizes
    return {"peak_reserved_bytes": model.peak_reserved, "reserved_bytes": model.reserved,
            "peak_allocated_bytes": model.peak_allocated, "segment_count": len(sizes),
            "segment_sizes": sorted(sizes, reverse=True), "num_alloc_retries": model.num_alloc_retries,
            "replayed_allocs": replayed, "frees_of_unknown_blocks": unknown_frees, "oom": oom}


def difference(measured: Optional[int], predicted: Optional[int]) -> dict[str, Any]:
    """``{"measured", "predicted", "difference", "difference_pct"}`` for two integers (None when either is)."""
    entry: dict[str, Any] = {"measured": measured, "predicted": predicted, "difference": None, "difference_pct": None}
    if measured is not None and predicted is not None:
        entry["difference"] = predicted - measured
        entry["difference_pct"] = round(100 * (predicted / measured - 1), 4) if measured else None
    return entry


def compare_snapshots(real: dict, simulated: Optional[dict] = None, alloc_conf: Optional[str] = None,
                      limit: int = 10) -> dict[str, Any]:
    """The probe's report: the real snapshot's figures, the model's replay of its trace against
    them, and (with a simulated snapshot of the same config) the allocation sizes each misses."""
    figures = snapshot_figures(real)
    replay = replay_snapshot(real, AllocatorSettings.parse(alloc_conf or None))
    report: dict[str, Any] = {
        "alloc_conf": alloc_conf or "",
        "real": {key: figures[key] for key in ("peak_reserved_bytes", "reserved_bytes", "segment_count",
                                               "reserved_before_trace_bytes", "segment_events")},
        "replay": {key: value for key, value in replay.items() if key != "segment_sizes"},
        "replay_vs_real": {
            "peak_reserved_bytes": difference(figures["peak_reserved_bytes"], replay["peak_reserved_bytes"]),
            "reserved_bytes_at_end": difference(figures["reserved_bytes"], replay["reserved_bytes"]),
            "segment_count_at_end": difference(figures["segment_count"], replay["segment_count"]),
        },
        "real_segment_sizes_top": figures["segment_sizes"][:limit],
        "replay_segment_sizes_top": replay["segment_sizes"][:limit],
    }
    if simulated is not None:
        report["simulated"] = {key: value for key, value in snapshot_figures(simulated).items()
                               if key != "segment_sizes"}
        report["allocation_diff"] = diff_allocations(real, simulated, limit)
    return report

