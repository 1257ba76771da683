"""A recorded symbolic trace: the allocation log of one step with sizes as polynomials in (B, S, T, R).

:func:`record_trace` runs the step once on a :class:`membench.trace.symbolic.SymbolicBackend`
and stores what :func:`membench.trace.evaluation.evaluate` needs to rebuild the Result of any
workload: the event sequence (which allocation each free releases, the phase marks), each
allocation's size as an expression, each saved storage's size, module and op, and the figures
that do not depend on the workload (parameters, weights, gradients, env pieces). Everything in
a :class:`Trace` is plain data (numpy arrays, strings, ints, sympy expressions): it pickles.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional
from unittest import mock

import numpy as np
import sympy
import torch

import membench.step
from membench.config import RunConfig
from membench.devices import device_profile
from membench.events import ALLOC, FREE, PHASE, WORKSPACE
from membench.plan import plan
from membench.preflight import AdaptedLayer, narrowest_layer
from membench.runner import _measure, warmup
from membench.saved_tensors import op_name
from membench.step import Progress
from membench.trace.key import TRACE_FORMAT_VERSION, trace_key
from membench.trace.polynomial import Polynomials
from membench.trace.coverage import DIMS, workload_dims
from membench.trace.symbolic import (At, Span, SymbolicBackend, SymbolicSavedCounter, TraceNotGeneral, expression,
                                     hint, size_symbol)

#: Event kinds as stored in :attr:`Trace.kinds`.
KIND_ALLOC, KIND_FREE, KIND_PHASE = 0, 1, 2
#: Metrics that are {name: bytes} maps a trace evaluates, each listed by :func:`membench.saved_tensors.largest_first`.
SIZE_MAPS = ("ctx_kept_bytes_by_function",)
#: Metrics the reserved-memory replay fills after the step (evaluate replays them from the evaluated log).
RESERVED_FIGURES = ("peak_reserved_bytes", "reserved_segments", "fragmentation_bytes", "num_alloc_retries")


@dataclass
class Trace:
    """One step's allocation log, symbolic in the workload's sizes and the LoRA rank.

    Attributes:
        key: :func:`membench.trace.key.trace_key` of the run it was recorded from.
        hints: (B, S, T, R) of that run.
        validity: {"B"|"S"|"T"|"R": (lowest, highest)} the trace answers exactly (R is one rank where
            the adapters could not be made R wide, any rank without adapters).
        classes: {"B"|"S"|"T"|"R": (modulus, residues)}: a size a periodic guard split by residue class
            (e.g. S % 32 == 0 where CUDA pads to 32) must lie in one of those classes.
        conditions: Polynomial inequalities in B, S, T, R (sympy, :func:`membench.trace.symbolic.size_symbol`)
            a workload must meet: the step's path depended on them (``B*S <= 1536``).
        polynomials: Every distinct size expression (:class:`membench.trace.polynomial.Polynomials`).
        kinds: Per event, KIND_ALLOC / KIND_FREE / KIND_PHASE.
        sizes: Per event, the index of its size in ``polynomials`` (allocations), else -1.
        frees: Per event, the index of the allocation event a free releases, else -1.
        ops: Per event, the op name of an allocation (``None`` for tensors made before tracking,
            :data:`membench.events.WORKSPACE`), else None.
        phases: {event index: (phase, label)} of the phase marks.
        allocated_at: {phase_allocated_bytes key: number of events before it was read}, in order.
        spans: {metric: (start, end)}: metrics that are allocated(end) - allocated(start).
        saved: The saved storages of the measured forward: (size index, module path, op name).
        metrics: The metrics that do not depend on the sizes (parameter counts without adapters, ...).
        metric_sizes: {metric: index in ``polynomials``} of those that do (with R: parameters,
            weights, gradients), or {metric: {name: index}} for the maps of :data:`SIZE_MAPS`.
        narrowest: The adapted layer that bounds the rank (:func:`membench.preflight.check_rank`,
            which a workload's rank must pass as in a direct run), or None without adapters.
        env: The workload-independent env pieces of the result (backend, plan, warm-up).
        record_s: Seconds the recording took.
    """

    key: str
    hints: tuple[int, int, int, int]
    validity: dict[str, tuple[int, int]]
    classes: dict[str, tuple[int, tuple[int, ...]]]
    conditions: tuple
    polynomials: Polynomials
    kinds: np.ndarray
    sizes: np.ndarray
    frees: np.ndarray
    ops: list[Optional[str]]
    phases: dict[int, tuple[str, str]]
    allocated_at: dict[str, int]
    spans: dict[str, tuple[int, int]]
    saved: list[tuple[int, str, str]]
    metrics: dict[str, Any]
    env: dict[str, Any]
    metric_sizes: dict[str, int | dict[str, int]] = field(default_factory=dict)
    narrowest: Optional[AdaptedLayer] = None
    record_s: float = 0.0
    format_version: int = TRACE_FORMAT_VERSION

    def contains(self, run: RunConfig) -> Optional[str]:
        """None when ``run``'s sizes lie in :attr:`validity`, its :attr:`classes` and :attr:`conditions`, else why not (one line)."""
        dims = workload_dims(run)
        for name, value in zip(DIMS, dims):
            low, high = self.validity[name]
            if not low <= value <= high:
                return f"{name}={value} is outside the trace's validity range [{low}, {high}]"
            modulus, residues = self.classes.get(name, (1, (0,)))
            if value % modulus not in residues:
                return (f"{name}={value} is outside the trace's residue classes ({name} % {modulus} in "
                        f"{_ranges_text(residues)})")
        sizes = {size_symbol(name): sympy.Integer(value) for name, value in zip(DIMS, dims)}
        for condition in self.conditions:
            if not bool(condition.xreplace(sizes)):
                values = ", ".join(f"{symbol}={sizes[symbol]}" for symbol in sorted(condition.free_symbols, key=str))
                return f"{values} is outside the trace's condition {condition}"
        return None


def _ranges_text(residues: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` as ``{0-2, 5}``."""
    runs: list[list[int]] = []
    for value in residues:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return "{" + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) + "}"


@contextmanager
def _symbolic_saved_counters(made: list):
    """Make the measured loop count saved tensors with :class:`SymbolicSavedCounter` (collected in ``made``)."""

    class Collected(SymbolicSavedCounter):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    with mock.patch.object(membench.step, "SavedTensorCounter", Collected):
        yield


def _label(func) -> Optional[str]:
    if func is None or func == WORKSPACE:
        return func
    return op_name(func)


def record_trace(run: RunConfig) -> Trace:
    """Simulate one step of ``run`` with B, S, T and R symbolic, and keep its allocation log as a :class:`Trace`.

    ``run.backend.trace_symbols`` may leave some of them concrete: the trace then holds for the run's
    own value of those (:attr:`Trace.validity`), and records faster.

    Raises:
        TraceNotGeneral: the step depends on the sizes beyond single-symbol bounds, the symbolic
            step failed, or the trace does not reproduce its own recorded run (a safety check).
        ConfigError: ``run`` is invalid (as :func:`membench.plan.plan` raises).
    """
    started = time.perf_counter()
    the_plan = plan(run)
    hints = workload_dims(run)
    config = run.backend
    backend = SymbolicBackend(device_profile(config), config.cuda_semantics, config.fake_device, hints,
                              seq2seq=run.model.task == "seq2seq_lm", adapters=run.method.uses_adapters,
                              symbolic=config.trace_symbols)
    events = backend.tracker.record()
    counters: list[SymbolicSavedCounter] = []
    progress = Progress()
    try:
        with _symbolic_saved_counters(counters):
            metrics = _measure(the_plan, backend, progress)
    except TraceNotGeneral:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the symbolic step means: simulate directly
        first = "".join(traceback.format_exception_only(error)).strip().splitlines()[0]
        raise TraceNotGeneral(f"the symbolic step failed in {progress.phase}: {first}") from error
    finally:
        backend.cleanup()
    validity, classes, conditions = backend.validity()
    rename = {symbol: size_symbol(name) for name, symbol in backend.symbols.items()}

    polynomials = Polynomials(DIMS)
    kinds = np.empty(len(events), dtype=np.int8)
    sizes = np.full(len(events), -1, dtype=np.int64)
    frees = np.full(len(events), -1, dtype=np.int64)
    ops: list[Optional[str]] = [None] * len(events)
    phases: dict[int, tuple[str, str]] = {}
    live: dict[int, int] = {}
    for index, event in enumerate(events):
        kind = event[0]
        if kind == ALLOC:
            kinds[index] = KIND_ALLOC
            sizes[index] = polynomials.add(expression(event[2]).xreplace(rename))
            ops[index] = _label(event[3])
            live[event[1]] = index
        elif kind == FREE:
            kinds[index] = KIND_FREE
            frees[index] = live.pop(event[1])
        elif kind == PHASE:
            kinds[index] = KIND_PHASE
            phases[index] = (event[1], event[2])
        else:
            raise TraceNotGeneral(f"unknown event kind {kind!r} in the allocation log")
    events.clear()

    counter = counters[-1]
    saved = [(polynomials.add(size.xreplace(rename)), module, op_name(op))
             for size, module, op in counter.symbolic.values()]
    allocated_at = {}
    for name, value in metrics.phase_allocated_bytes.items():
        if not isinstance(value, At):
            raise TraceNotGeneral(f"phase_allocated_bytes[{name!r}] was not read from the tracker")
        allocated_at[name] = value.index
    spans = {}
    constant = {}
    metric_sizes = {}
    for name in (item.name for item in dataclasses.fields(metrics)):
        if name in ("phase_allocated_bytes", "phase_peak_bytes", "peak_allocated_bytes", "saved_tensor_bytes") \
                or name.startswith("saved_"):
            continue
        attribute = getattr(metrics, name)
        if isinstance(attribute, Span):
            spans[name] = (attribute.start, attribute.end)
        elif isinstance(attribute, torch.SymInt):  # a sum of parameter sizes, with R
            metric_sizes[name] = polynomials.add(expression(attribute).xreplace(rename))
            setattr(metrics, name, hint(attribute))  # for the self-check (a deep copy of a SymInt copies its shape env)
        elif name in SIZE_MAPS and _symbolic(attribute):  # {function: bytes} kept on ctx (bitsandbytes' 8-bit matmul)
            metric_sizes[name] = {key: polynomials.add(expression(value).xreplace(rename))
                                  for key, value in attribute.items()}
            setattr(metrics, name, {key: hint(value) for key, value in attribute.items()})
        elif _symbolic(attribute):
            raise TraceNotGeneral(f"metric {name} depends on the workload's sizes outside the allocation log, "
                                  "which a trace does not evaluate")
        else:
            constant[name] = attribute if not isinstance(attribute, int) or isinstance(attribute, bool) \
                else int(attribute)
    warmup_steps, primed = warmup(run, backend)
    env = {"backend": backend.name, **backend.describe(), "plan": the_plan.env(),
           "warmup_steps_run": warmup_steps, "optimizer_primed": primed}
    # As runner.execute does after the step.
    metrics.runtime_overhead_bytes = constant["runtime_overhead_bytes"] = env.get("runtime_overhead_bytes", 0)
    trace = Trace(key=trace_key(run), hints=hints, validity=validity, classes=classes, conditions=conditions,
                  polynomials=polynomials.freeze(),
                  kinds=kinds, sizes=sizes, frees=frees, ops=ops, phases=phases, allocated_at=allocated_at,
                  spans=spans, saved=saved, metrics=constant, env=env, metric_sizes=metric_sizes,
                  narrowest=narrowest_layer(the_plan.adapted) if the_plan.adapted else None)
    trace.record_s = round(time.perf_counter() - started, 3)
    _check_against_hints(trace, run, metrics)
    return trace


def _symbolic(value) -> bool:
    """Whether ``value`` (a metric: a number, or a dict or list of them) holds a ``SymInt``."""
    if isinstance(value, dict):
        return any(_symbolic(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_symbolic(item) for item in value)
    return isinstance(value, torch.SymInt)


def _check_against_hints(trace: Trace, run: RunConfig, recorded) -> None:
    """The trace evaluated at its own hints must give the metrics the symbolic step counted on them."""
    from membench.trace.evaluation import evaluate_metrics

    mine = dataclasses.asdict(evaluate_metrics(trace, trace.hints))
    theirs = {name: value for name, value in dataclasses.asdict(recorded).items()
              if name not in RESERVED_FIGURES}
    theirs = {name: (int(value) if isinstance(value, int) and not isinstance(value, bool) else value)
              for name, value in theirs.items()}
    different = sorted(name for name in theirs if mine.get(name) != theirs[name])
    if different:
        print(f"membench: trace self-check differs in {', '.join(different)}", file=sys.stderr)
        raise TraceNotGeneral(f"the trace does not reproduce its own run ({', '.join(different)} differ)")
