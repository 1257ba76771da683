"""From a trace to a Result: evaluate every size at concrete (B, S, T, R), round, replay, assemble.

The replay is :func:`membench.events.replay` vectorised: each allocation's size is rounded as the
allocator rounds it (:func:`membench.allocator.allocator_bytes`, 512 B), each free subtracts the
rounded size of the allocation it releases, and a cumulative sum gives the bytes allocated after
every event; a phase's peak is the maximum over its events. :func:`evaluated_events` gives the
same evaluation as a plain log (:mod:`membench.events`) for other replays (reserved memory).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from membench.allocator import ALLOCATOR_ROUNDING
from membench.backends import create_backend
from membench.config import RunConfig
from membench.events import ALLOC, FREE, PHASE
from membench.identity import IDENTITY_VERSION, backend_label, recorded_config, run_id
from membench.models import load_hf_config
from membench.preflight import check_rank, check_sequence_length
from membench.results import Result, Status, provenance
from membench.saved_tensors import SavedTensorCounter, largest_first
from membench.step import Metrics
from membench.trace.coverage import workload_dims
from membench.trace.record import KIND_ALLOC, KIND_FREE, Trace
from membench.trace.symbolic import TraceNotGeneral

BACKEND = "simulate"


class _Named:
    """Stands in for an op in :class:`SavedTensorCounter`'s aggregation: ``op_name`` reads ``overloadpacket``."""

    __slots__ = ("overloadpacket",)

    def __init__(self, name: str) -> None:
        self.overloadpacket = name


def _rounded_sizes(trace: Trace, dims: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(every expression's exact value, every event's signed allocator delta)."""
    values = trace.polynomials.evaluate(dims)
    allocs = trace.kinds == KIND_ALLOC
    raw = np.zeros(len(trace.kinds), dtype=np.int64)
    raw[allocs] = values[trace.sizes[allocs]]
    if (raw < 0).any():
        raise TraceNotGeneral(f"a size evaluates negative at {dims}")
    rounded = -(-raw // ALLOCATOR_ROUNDING) * ALLOCATOR_ROUNDING
    frees = trace.kinds == KIND_FREE
    delta = rounded.copy()
    delta[frees] = -rounded[trace.frees[frees]]
    return values, delta


def evaluate_metrics(trace: Trace, dims: tuple[int, int, int, int]) -> Metrics:
    """The allocated-memory metrics a direct simulation at ``dims`` (B, S, T, R) records (reserved figures not filled)."""
    values, delta = _rounded_sizes(trace, dims)
    allocated = np.cumsum(delta)

    def allocated_before(index: int) -> int:
        return int(allocated[index - 1]) if index > 0 else 0

    starts = sorted(trace.phases)
    peaks = np.maximum.reduceat(allocated, starts) if starts else []
    phase_peaks: dict[str, int] = {}
    for start, peak in zip(starts, peaks):
        phase, label = trace.phases[start]
        if label.startswith("measured"):
            phase_peaks[phase] = max(phase_peaks.get(phase, 0), int(peak))
    metrics = Metrics(**{name: value for name, value in trace.metrics.items()})
    for name, index in trace.metric_sizes.items():
        if isinstance(index, dict):  # a {name: bytes} map (record.SIZE_MAPS), in the order a direct run lists it
            setattr(metrics, name, largest_first({key: int(values[at]) for key, at in index.items()}))
        else:
            setattr(metrics, name, int(values[index]))
    for name, (start, end) in trace.spans.items():
        setattr(metrics, name, allocated_before(end) - allocated_before(start))
    metrics.phase_peak_bytes = phase_peaks
    metrics.peak_allocated_bytes = max(phase_peaks.values()) if phase_peaks else None
    metrics.phase_allocated_bytes = {name: allocated_before(index) for name, index in trace.allocated_at.items()}
    counter = SavedTensorCounter([])
    counter._seen = {number: (int(values[size]), module, _Named(op))
                     for number, (size, module, op) in enumerate(trace.saved)}
    metrics.saved_tensor_bytes = counter.total_bytes
    metrics.saved_bytes_by_module, metrics.saved_tensors_by_module = counter.by_module()
    metrics.saved_bytes_by_op, metrics.saved_tensors_by_op = counter.by_op()
    metrics.saved_bytes_by_module_op = counter.by_module_and_op()
    return metrics


def evaluated_events(trace: Trace, run: RunConfig) -> list[tuple]:
    """The allocation log of ``run``'s step (:mod:`membench.events` layout, exact sizes before rounding).

    Keys are the allocating event's index; ops are names (``aten.mm``), None or ``workspace``.
    """
    values = trace.polynomials.evaluate(workload_dims(run))
    events: list[tuple] = []
    for index, kind in enumerate(trace.kinds.tolist()):
        if kind == KIND_ALLOC:
            events.append((ALLOC, index, int(values[trace.sizes[index]]), trace.ops[index]))
        elif kind == KIND_FREE:
            events.append((FREE, int(trace.frees[index])))
        else:
            events.append((PHASE, *trace.phases[index]))
    return events


def evaluate(trace: Trace, run: RunConfig) -> Result:
    """The Result a direct simulation of ``run`` gives, from ``trace`` (same metrics, id, config, status).

    ``env`` differs only in provenance (``created_at``, ``wall_time_s``) and in ``env["trace"]``: the
    trace's key and the seconds its recording took (``record_s``).

    Raises:
        TraceNotGeneral: ``run`` is outside the trace's validity range or not of its key.
        ConfigError: ``run`` is invalid (a sequence longer than the model's positions, a rank not
            below an adapted layer's smaller dimension).
    """
    from membench.trace.key import trace_key

    started = time.perf_counter()
    key = trace_key(run)
    if key != trace.key:
        raise TraceNotGeneral(f"run has trace key {key}, the trace is {trace.key}")
    outside = trace.contains(run)
    if outside:
        raise TraceNotGeneral(outside)
    if trace.metrics.get("peak_reserved_bytes") is not None:
        raise TraceNotGeneral("the trace's backend reports reserved memory, which traces do not evaluate")
    check_sequence_length(run, load_hf_config(run.model))  # what plan() rejects before a direct run
    if run.method.uses_adapters and trace.narrowest is not None:
        check_rank(run.method.rank, [trace.narrowest])  # likewise: the rank is not in the trace's key
    backend = create_backend(run.backend)
    config = recorded_config(run, backend.name)
    the_run_id = run_id(config, backend_label(run, backend.name), schema=run)
    metrics = evaluate_metrics(trace, workload_dims(run))
    predicted = backend.predicted_oom(metrics.phase_peak_bytes)
    reserved_env: dict = {}
    account = _reserved_account()
    if account is not None and getattr(backend, "tracker", None) is not None:
        by_reserved, reserved_env = account(evaluated_events(trace, run), run.workload.warmup_steps,
                                            getattr(run.backend, "alloc_conf", None), backend, metrics, None)
        predicted = predicted or by_reserved
    status = Status("oom", *predicted) if predicted else Status()
    env = {"backend": trace.env["backend"], **backend.describe(), **reserved_env, **provenance(),
           "identity_version": IDENTITY_VERSION, **trace.env["plan"],
           "warmup_steps_run": trace.env["warmup_steps_run"], "optimizer_primed": trace.env["optimizer_primed"],
           "wall_time_s": round(time.perf_counter() - started, 3),
           # wall_time_s is this evaluation's; recording the trace took record_s, once, in whichever run met it first
           "trace": {"key": trace.key, "evaluated_from_trace": True, "record_s": trace.record_s}}
    return Result(the_run_id, config, status, dataclasses.asdict(metrics), env)


def _reserved_account():
    """:func:`membench.reserved.account` where this membench models reserved memory, else None."""
    try:
        from membench.reserved import account
    except ImportError:
        return None
    return account
