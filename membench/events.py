"""The allocation events of one run, in order: what the allocator model saw, and a replay of them.

A tracked backend (``cpu``, ``simulate``) can record every allocation and free it
counts (:meth:`membench.backends.tracker.AllocationTracker.record`). The log is what
later stages replay: a model of CUDA's caching allocator (reserved memory, snapshots,
timelines) and symbolic traces that evaluate one log for many workloads. Replaying a
log with :func:`replay` gives the same peaks and allocated bytes as the run itself.

Events are plain tuples, cheap to append (a 7B step makes about 10^5):

* ``(ALLOC, key, nbytes, op)``: a new storage of ``nbytes`` (exact, before the allocator's
  512-byte rounding) made by ``op`` (the ATen ``OpOverload``, stored as is so recording costs
  no string work; :func:`membench.saved_tensors.op_name` names it; ``None`` for tensors
  that existed before tracking: weights, buffers, the batch; :data:`WORKSPACE` for runtime
  memory no tensor owns). ``key`` identifies the storage while it lives; a dead storage's key is
  reused, so a key means the storage allocated last under it. A run that writes a snapshot logs
  a fifth element, the module path it was made for (:mod:`membench.module_scope`; None outside
  any module).
* ``(FREE, key)``: that storage died, or moved off the modelled device (AdamW's host counters).
* ``(PHASE, name, label)``: a phase starts (``forward``, ``backward``, ``optimizer_step``) in the
  step ``label`` (``warm-up step 1/2``, ``measured step 1/1``, ``optimizer priming``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from membench.allocator import allocator_bytes

ALLOC, FREE, PHASE = "alloc", "free", "phase"
WORKSPACE = "workspace"  # op label of allocations no tensor owns (cuBLAS workspaces)
#: Op label of a storage re-allocated in place by ``UntypedStorage.resize_`` (FSDP2's gathered parameters);
#: its shrink to 0 is logged as a FREE of the same key.
RESIZE = "resize"


@dataclass
class PhasePeak:
    """One phase of one step in a replay: its peak and what was allocated when it ended (bytes)."""

    phase: str
    label: str
    peak: int
    allocated_after: int


@dataclass
class Replay:
    """What replaying a log gives, in integer bytes.

    Attributes:
        peak: Highest allocated over the whole log.
        allocated: Allocated after the last event.
        phases: Every phase in log order with its own peak (the peak is reset where it starts).
    """

    peak: int = 0
    allocated: int = 0
    phases: list[PhasePeak] = field(default_factory=list)

    def phase_peaks(self, label_prefix: str = "measured") -> dict[str, int]:
        """The highest peak per phase name over the steps whose label starts with ``label_prefix``."""
        peaks: dict[str, int] = {}
        for phase in self.phases:
            if phase.label.startswith(label_prefix):
                peaks[phase.phase] = max(peaks.get(phase.phase, 0), phase.peak)
        return peaks


def replay(events: list[tuple]) -> Replay:
    """Replay ``events`` (a log recorded by the tracker) through its accounting: each storage rounded up to 512 B."""
    result = Replay()
    live: dict = {}
    allocated = peak = phase_peak = 0
    current: Optional[PhasePeak] = None
    for event in events:
        kind = event[0]
        if kind == ALLOC:
            size = allocator_bytes(event[2])
            live[event[1]] = size
            allocated += size
            if allocated > peak:
                peak = allocated
            if allocated > phase_peak:
                phase_peak = allocated
        elif kind == FREE:
            allocated -= live.pop(event[1])
        else:  # PHASE
            if current is not None:
                current.peak, current.allocated_after = phase_peak, allocated
            current = PhasePeak(event[1], event[2], 0, 0)
            result.phases.append(current)
            phase_peak = allocated
    if current is not None:
        current.peak, current.allocated_after = phase_peak, allocated
    result.peak, result.allocated = peak, allocated
    return result
