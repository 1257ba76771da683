"""Reserved memory: a run's allocation log replayed through the model of CUDA's caching allocator.

``peak_allocated_bytes`` is not what runs out; a step dies when ``cudaMalloc`` fails, and that depends on
the segments the caching allocator holds (reserved memory, fragmentation included). This module replays
the log a tracked backend recorded (:mod:`membench.events`) through
:class:`membench.caching_allocator.CachingAllocatorModel`, in the order the ``cuda`` backend's process
would make the same allocations, and reports what reserved memory that gives.

The process history replayed (:func:`process_history`), and what it assumes:

1. **Model build**: every weight and buffer, then the batch, in the order the tracker first saw them
   (``model.parameters()`` then buffers then batch tensors: module registration order, the order in
   which a model built on the GPU creates them). Assumed: no transient allocations while building
   (random init, dtype casts, PEFT's adapter moves happen in place or on the final dtype); a model
   loaded through a bigger intermediate would leave more cached segments than this.
2. **Warm-up steps** (``workload.warmup_steps``): the ``cpu`` backend ran them, so its log is replayed
   as recorded. ``simulate`` primes the optimizer instead (:meth:`membench.step.MeasuredLoop.prime_optimizer`),
   so each warm-up step is synthesised as a copy of the measured step's events under fresh keys
   (a step's allocations do not depend on the values of its tensors). In the first one, the
   optimizer phase is the priming's own events (AdamW's state and the temporaries of its first
   update, in their order), its zero gradients left out and the real gradients freed at its end
   (``zero_grad``), as the first real ``optimizer.step()`` does. Storages a step allocates and never
   frees (a cache kept across steps) are made once, in the first warm-up step.
3. **Allocations a dispatch mode cannot see** (ALLOC events with op :data:`membench.events.WORKSPACE`,
   added by the simulate backend from its device profile): cuBLAS keeps one workspace per
   (thread, stream) handle, allocated through the caching allocator at the handle's first GEMM
   (``aten/src/ATen/cuda/CublasHandlePool.cpp``, ``getCurrentCUDABlasHandle`` -> workspace from
   ``c10::cuda::CUDACachingAllocator``). The first is placed where the first step's forward starts
   (the Python thread's first matmul), the second where its backward starts (the autograd thread's).
   The fused attention backward's scratch (flash's fp32 ``dq_accum`` and ``softmax_d``, the
   efficient kernel's ``delta`` and workspace) is in the log as ordinary allocations: the CUDA
   emulation makes them (:mod:`membench.backends.attention_scratch`). Not modelled, so not in the
   prediction: reduction/sort scratch and cuBLASLt workspaces (each freed within its kernel's op,
   so it moves the peak only where it opens a new segment).
4. **Measured steps** as recorded; the reserved peak is reset where the first measured step starts,
   as the ``cuda`` backend resets the allocator's peak statistics at each phase.

All on one stream: a single-GPU step uses one small and one large pool (autograd runs each backward
op on its forward op's stream). The replay stops at the ``done`` phase mark (teardown is not part of
the run). Categories (for snapshots and timelines) come from lifetimes: see :func:`categorize`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from membench.caching_allocator import AllocatorSettings, CachingAllocatorModel, ModelledOutOfMemory
from membench.events import ALLOC, FREE, PHASE, WORKSPACE
from membench.files import write_atomic

PRIMING_LABEL = "optimizer priming"
CATEGORIES = ("parameter", "gradient", "optimizer state", "activation", "temporary", "workspace")


def _split_steps(events: list[tuple]) -> tuple[list[tuple], list[tuple[str, list[tuple]]]]:
    """(events before the first phase mark, [(step label, that step's events incl. its marks)])."""
    first = next((i for i, e in enumerate(events) if e[0] == PHASE), len(events))
    steps: list[tuple[str, list[tuple]]] = []
    for event in events[first:]:
        if event[0] == PHASE and event[1] == "done":
            break
        if event[0] == PHASE and (not steps or steps[-1][0] != event[2]):
            steps.append((event[2], []))
        steps[-1][1].append(event)
    return events[:first], steps


def _step_copy(step: list[tuple], label: str, tag: object, keep_persistent: bool,
               optimizer_phase: Optional[list[tuple]] = None) -> list[tuple]:
    """``step`` under fresh keys ``(tag, key)`` for what it allocates and frees; its marks relabelled.

    ``optimizer_phase``: events to use instead of the step's own optimizer phase (the priming's).
    """
    freed = {e[1] for e in step if e[0] == FREE}
    allocated_here = {e[1] for e in step if e[0] == ALLOC}
    made_by_optimizer = _allocated_in_optimizer(step) if optimizer_phase is not None else set()
    out: list[tuple] = []
    in_optimizer = False
    for event in step:
        kind = event[0]
        if kind == PHASE:
            in_optimizer = event[1] == "optimizer_step"
            out.append((PHASE, event[1], label))
            if in_optimizer and optimizer_phase is not None:
                out.extend(optimizer_phase)
            continue
        if in_optimizer and optimizer_phase is not None:
            # The step's own optimizer events are replaced; only its frees of storages made earlier
            # in the step (the gradients, at zero_grad) are kept, at the phase's end.
            if kind == FREE and event[1] in allocated_here and event[1] not in made_by_optimizer:
                out.append((FREE, (tag, event[1])))
            continue
        key = event[1]
        if kind == ALLOC:
            if key in freed:
                out.append((ALLOC, (tag, key), *event[2:]))
            elif keep_persistent:
                out.append(event)
        elif key in allocated_here:
            out.append((FREE, (tag, key)))
        else:
            out.append(event)  # a storage from before the step; the replay ignores it when already freed
    return out


def _allocated_in_optimizer(step: list[tuple]) -> set:
    """Keys of the storages ``step`` allocates in its optimizer phase."""
    made, in_optimizer = set(), False
    for event in step:
        if event[0] == PHASE:
            in_optimizer = event[1] == "optimizer_step"
        elif in_optimizer and event[0] == ALLOC:
            made.add(event[1])
    return made


def process_history(events: list[tuple], warmup_steps: int) -> list[tuple]:
    """The events the ``cuda`` backend's process would make, in order (see the module docstring).

    A log without an optimizer priming (``cpu``, or no warm-up) already is that history, except that
    workspaces recorded before the first step move to their first GEMM.
    """
    prefix, steps = _split_steps(events)
    workspaces = [e for e in prefix if e[0] == ALLOC and e[3] == WORKSPACE]
    build = [e for e in prefix if not (e[0] == ALLOC and e[3] == WORKSPACE)]
    priming = next((s for s in steps if s[0] == PRIMING_LABEL), None)
    if priming is not None:
        zero_grads = {e[1] for e in priming[1] if e[0] == FREE} & {e[1] for e in build if e[0] == ALLOC}
        build = [e for e in build if not (e[0] == ALLOC and e[1] in zero_grads)]
        optimizer_events = [e for e in priming[1][1:] if not (e[0] == FREE and e[1] in zero_grads)]
        freed_in_priming = {e[1] for e in optimizer_events if e[0] == FREE}
        optimizer_events = [(e[0], ("prime", e[1]), *e[2:]) if e[1] in freed_in_priming else e
                            for e in optimizer_events]
        measured = [s for s in steps if s[0] != PRIMING_LABEL]
        template = measured[0][1]
        history = list(build)
        for index in range(warmup_steps):
            history += _step_copy(template, f"warm-up step {index + 1}/{warmup_steps}", ("warm-up", index),
                                  keep_persistent=index == 0,
                                  optimizer_phase=optimizer_events if index == 0 else None)
        for _, step in measured:
            history += step
    else:
        history = list(build)
        for _, step in steps:
            history += step
    return _place_workspaces(history, workspaces)


def _place_workspaces(history: list[tuple], workspaces: list[tuple]) -> list[tuple]:
    """Workspace 1 at the first forward mark, the rest at the first backward mark (their first GEMMs)."""
    if not workspaces:
        return history
    out: list[tuple] = []
    pending = list(workspaces)
    for event in history:
        out.append(event)
        if pending and event[0] == PHASE:
            if event[1] == "forward" and len(pending) == len(workspaces):
                out.append(pending.pop(0))
            elif event[1] == "backward":
                out.extend(pending)
                pending = []
    return out + pending


def categorize(history: list[tuple]) -> dict[int, str]:
    """{index of an ALLOC event in ``history``: its category}, from the op and the lifetime.

    parameter: made before the first step (weights, buffers and the batch); workspace: op WORKSPACE;
    then by the phase it is allocated in and the phase it dies in: forward -> activation if it outlives
    the forward phase, else temporary; backward -> gradient if it outlives the backward phase, else
    temporary; optimizer_step -> optimizer state if it is never freed, else temporary.
    """
    categories: dict[int, str] = {}
    live: dict = {}  # key -> (index, phase of allocation)
    phase = None
    pending_phase: dict = {}  # index -> phase allocated, for those still live when their phase ends
    for index, event in enumerate(history):
        kind = event[0]
        if kind == ALLOC:
            if event[3] == WORKSPACE:
                categories[index] = "workspace"
            elif phase is None:
                categories[index] = "parameter"
            else:
                categories[index] = "temporary"
                pending_phase[index] = phase
            live[event[1]] = index
        elif kind == FREE:
            index_alloc = live.pop(event[1], None)
            pending_phase.pop(index_alloc, None)
        else:
            if phase is not None:  # what is still live at the end of a phase outlives it
                for index_alloc, allocated_in in list(pending_phase.items()):
                    if allocated_in == phase:
                        categories[index_alloc] = {"forward": "activation", "backward": "gradient"}.get(phase, "temporary")
                        if phase != "optimizer_step":
                            del pending_phase[index_alloc]
            phase = event[1]
    for index_alloc, allocated_in in pending_phase.items():
        if allocated_in == "optimizer_step":
            categories[index_alloc] = "optimizer state"  # never freed
    return categories


@dataclass
class ReservedFigures:
    """What the replay gives (integer bytes). ``oom`` is set when the modelled cudaMalloc failed."""

    peak_reserved_bytes: int = 0
    peak_allocated_bytes: int = 0  # the model's own (unsplit blocks count whole, as memory_allocated does)
    fragmentation_bytes: int = 0  # reserved - allocated when allocated peaks in the measured steps
    reserved_segments: int = 0
    segment_sizes: list[int] = field(default_factory=list)
    num_alloc_retries: int = 0
    oom: Optional[ModelledOutOfMemory] = None
    oom_phase: Optional[str] = None
    timeline: list[tuple] = field(default_factory=list)  # (event index, allocated, reserved) when asked for


def replay_reserved(history: list[tuple], settings: Optional[AllocatorSettings] = None,
                    capacity_bytes: Optional[int] = None, record_trace: bool = False,
                    timeline: bool = False, model: Optional[CachingAllocatorModel] = None,
                    ) -> tuple[ReservedFigures, CachingAllocatorModel, dict]:
    """Replay a :func:`process_history` through the allocator model.

    Returns:
        (the figures, the model at the end, {history index of each replayed ALLOC: its trace position}).
    """
    model = model or CachingAllocatorModel(settings, capacity_bytes, record_trace=record_trace)
    figures = ReservedFigures()
    handles: dict = {}
    trace_at: dict[int, int] = {}
    malloc, free = model.malloc, model.free
    phase = None
    measuring = False
    peak_allocated = 0
    try:
        for index, event in enumerate(history):
            kind = event[0]
            if kind == ALLOC:
                if event[1] not in handles:  # else made once already (a storage kept across steps)
                    handles[event[1]] = malloc(event[2])
                    if record_trace:
                        trace_at[index] = len(model._trace) - 1
                    if measuring and model.allocated > peak_allocated:
                        peak_allocated = model.allocated
                        figures.fragmentation_bytes = model.reserved - peak_allocated
            elif kind == FREE:
                handle = handles.pop(event[1], _MISSING)
                if handle is not _MISSING:
                    free(handle)
            else:
                phase = event[1]
                if not measuring and event[2].startswith("measured"):
                    measuring = True
                    model.reset_peak()  # the cuda backend resets the peak statistics per phase
            if timeline:
                figures.timeline.append((index, model.allocated, model.reserved))
    except ModelledOutOfMemory as error:
        figures.oom, figures.oom_phase = error, phase
    figures.peak_reserved_bytes = model.peak_reserved
    figures.peak_allocated_bytes = model.peak_allocated
    figures.segment_sizes = model.segment_sizes
    figures.reserved_segments = len(figures.segment_sizes)
    figures.num_alloc_retries = model.num_alloc_retries
    return figures, model, trace_at


_MISSING = object()



def _op_label(op: object) -> str:
    if op is None:
        return "created before the step (weights, buffers, batch)"
    if op == WORKSPACE:
        return "cuBLAS workspace (first GEMM of a thread)"
    from membench.saved_tensors import op_name

    return op_name(op)


def annotated_snapshot(history: list[tuple], model: CachingAllocatorModel, trace_at: dict[int, int]) -> dict:
    """``model.snapshot()`` with frames and a category on every alloc (and its frees and block).

    Frames are pseudo-frames, innermost first: the ATen op that made the storage and, when the log
    carries it (runs that write a snapshot do), the module path it was made for
    (:mod:`membench.module_scope`), then the step and phase it was made in. The viewer shows each
    as ``name (filename:line)``; there is no Python stack or line number to give.
    """
    snapshot = model.snapshot()
    trace = snapshot["device_traces"][0]
    categories = categorize(history)
    info_by_addr: dict[int, tuple[list[dict], str]] = {}
    phase, label = "build", "model build"
    for index, event in enumerate(history):
        if event[0] == PHASE:
            phase, label = event[1], event[2]
            continue
        if event[0] != ALLOC or index not in trace_at:
            continue
        module = event[4] if len(event) > 4 else None
        frames = [{"filename": module or "(no module)", "line": 0, "name": _op_label(event[3])},
                  {"filename": label, "line": 0, "name": phase}]
        category = categories.get(index, "temporary")
        position = trace_at[index]
        entry = trace[position]
        entry["frames"], entry["category"] = frames, category
        info_by_addr[entry["addr"]] = (frames, category)
    for entry in trace:  # frees carry what their block's alloc carried
        if entry["action"] in ("free_requested", "free_completed") and entry["addr"] in info_by_addr:
            entry["frames"], entry["category"] = info_by_addr[entry["addr"]]
        elif entry["action"] == "alloc":
            info_by_addr[entry["addr"]] = (entry["frames"], entry.get("category", "temporary"))
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated" and block["address"] in info_by_addr:
                block["frames"] = info_by_addr[block["address"]][0]
    return snapshot


def write_snapshot(snapshot: dict, path: Path) -> None:
    """Pickle ``snapshot`` as ``torch.cuda.memory._dump_snapshot`` does (protocol 4, plain types), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, pickle.dumps(snapshot, protocol=4))


def capacity_for(backend: object) -> Optional[int]:
    """What cudaMalloc may hold on the backend's modelled device: capacity minus the CUDA context."""
    profile = getattr(backend, "profile", None)
    if profile is None:
        return None
    return profile.usable_bytes


def account(events: list[tuple], warmup_steps: int, alloc_conf: Optional[str], backend: object,
            metrics: object, snapshot_path: Optional[Path] = None) -> tuple[Optional[tuple[str, str]], dict]:
    """Fill ``metrics``' reserved figures from a recorded run; write a snapshot when asked.

    Returns:
        (a predicted OOM as (phase, message) or None, what to add to the result's ``env``).
    """
    if not events:
        return None, {}  # nothing recorded (a result answered without running the tracker)
    settings = AllocatorSettings.parse(alloc_conf)
    capacity = capacity_for(backend)
    history = process_history(events, warmup_steps)
    figures, model, trace_at = replay_reserved(history, settings, capacity, record_trace=snapshot_path is not None)
    metrics.peak_reserved_bytes = figures.peak_reserved_bytes
    metrics.fragmentation_bytes = figures.fragmentation_bytes
    metrics.reserved_segments = figures.reserved_segments
    metrics.num_alloc_retries = figures.num_alloc_retries
    profile = getattr(backend, "profile", None)
    env: dict = {"alloc_conf": alloc_conf or "", "reserved_model": "membench.reserved (caching-allocator replay)",
                 "cuda_context_bytes": profile.cuda_context_bytes if profile is not None else None}
    if snapshot_path is not None:
        try:
            write_snapshot(annotated_snapshot(history, model, trace_at), snapshot_path)
            env["memory_snapshot"] = str(snapshot_path)
        except OSError as error:
            env["memory_snapshot_error"] = f"{type(error).__name__}: {error}"
    if figures.oom is None:
        return None, env
    oom = figures.oom
    profile = getattr(backend, "profile", None)
    name = profile.name if profile is not None else "device"
    message = (f"predicted reserved memory runs out: cudaMalloc of {oom.alloc_size / GIB:.2f} GiB fails with "
               f"{oom.reserved / GIB:.2f} GiB reserved ({oom.allocated / GIB:.2f} GiB allocated) on the "
               f"{name}'s {capacity / GIB:.1f} GiB less its CUDA context")
    return (figures.oom_phase or "build", message), env


GIB = 1 << 30


def replay_process(histories: list[list[tuple]], settings: Optional[AllocatorSettings] = None,
                   capacity_bytes: Optional[int] = None) -> list[ReservedFigures]:
    """Several runs' histories in ONE process, one after another, ``gc.collect(); torch.cuda.empty_cache()``
    between them: each run's storages are freed at its end and every fully free segment released; the
    cuBLAS workspaces of the first run stay (the handles, and their workspaces, live as long as their
    threads), so later runs do not allocate them again. Peaks are reset where each measured step starts.
    """
    model = CachingAllocatorModel(settings, capacity_bytes, record_trace=False)
    results = []
    for number, history in enumerate(histories):
        renamed, live = [], {}
        for event in history:
            if event[0] == ALLOC:
                if event[3] == WORKSPACE:
                    if number == 0:
                        renamed.append(event)
                    continue
                key = (number, event[1])
                live[key] = True
                renamed.append((ALLOC, key, *event[2:]))
            elif event[0] == FREE:
                key = (number, event[1])
                live.pop(key, None)
                renamed.append((FREE, key))
            else:
                renamed.append(event)
        renamed += [(FREE, key) for key in live]  # gc.collect(): the run's model, batch and state die
        figures, model, _ = replay_reserved(renamed, model=model)
        results.append(figures)
        model.empty_cache()
    return results
