"""Probes: one measured point of a search (:class:`Probe`), run and cached per method by :class:`Prober`."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

from membench.config import RunConfig
from membench.errors import ConfigError
from membench.preflight import check_sequence_length
from membench.results import Result
from membench.identity import result_id
from membench.plan import Plan
from membench import tracing

_MISSING = object()  # no loaded trace answers the probe yet


def _execute(the_plan: Plan) -> Result:
    """:func:`membench.runner.execute`, looked up on :mod:`membench.maxfit` at call time, so that
    replacing ``membench.maxfit.execute`` (as the tests do) reaches every probe."""
    from membench import maxfit

    return maxfit.execute(the_plan)


#: What a probe's peak is (``maxfit.by``): the modelled or measured reserved memory (what decides a real
#: OOM; the default), or max_memory_allocated (the answers before reserved memory was modelled).
BY = ("reserved", "allocated")


def peak_of(metrics: dict, by: str) -> Optional[int]:
    """The peak ``by`` chooses: ``peak_reserved_bytes`` where the result has one, else ``peak_allocated_bytes``."""
    if by == "reserved" and metrics.get("peak_reserved_bytes") is not None:
        return metrics["peak_reserved_bytes"]
    return metrics.get("peak_allocated_bytes")


@dataclass(frozen=True)
class Probe:
    """One measured point: the searched dimension at ``value``, everything else fixed."""

    value: int
    state: str  # ok | oom | error (as in the Result)
    peak_bytes: Optional[int]
    backend: str
    device: Optional[str]
    message: Optional[str] = None
    trace: Optional[str] = None  # the trace it was evaluated from (env["trace"]); None: simulated directly
    complete: bool = True  # False: peak_bytes is only what was reached when the (modelled) allocator ran out

    def fits(self, budget: int) -> Optional[bool]:
        """Whether the step fits ``budget``; None for an error.

        A simulated ``oom`` is against the simulated card's capacity, not the budget, and its
        predicted allocated peak is complete, so only the peak decides. Its reserved peak is not:
        the modelled allocator stops where ``cudaMalloc`` fails, so the step needs more than the
        card's usable memory, and it counts as not fitting (for a budget above the card, that is
        the card's verdict: simulate a bigger ``backend.device`` to search past it). A real OOM does
        not fit (its peak is only what was reached before the allocation failed).
        """
        if self.state == "error" or self.peak_bytes is None:
            return None
        if self.state == "oom" and (self.backend != "simulate" or not self.complete):
            return False
        return self.peak_bytes <= budget


class Prober:
    """Runs the probes of one method (one Plan), caching them by run id.

    Args:
        the_plan: The validated base run (from :func:`membench.plan.plan`).
        backend: Backend name to probe on (``simulate``, ``cpu`` or ``cuda``); None keeps
            the plan's ``backend.name``.
        via_trace: Evaluate probes from the run's symbolic trace (:mod:`membench.trace`: recorded
            or loaded once per trace key, then milliseconds a probe); a point no trace covers
            (size 1, ...) is simulated directly. Only for ``simulate``.
        by: Which peak a probe reports (:data:`BY`, ``maxfit.by``): ``allocated`` (the default here:
            the answers of before) or ``reserved`` (``membench-maxfit``'s default; a result without a
            reserved figure falls back to its allocated peak).
    """

    def __init__(self, the_plan: Plan, backend: Optional[str] = None, via_trace: bool = False,
                 by: str = "allocated") -> None:
        run = the_plan.run
        if backend is not None:
            run = dataclasses.replace(run, backend=dataclasses.replace(run.backend, name=backend))
        self.plan = dataclasses.replace(the_plan, run=run)
        self.via_trace = via_trace
        self.by = by  # which peak a probe reports (BY)
        #: Where a search starts: 2 on traces (size 1 is never in a trace: 1 is probed only if 2 does not fit).
        self.first = 2 if via_trace else 1
        self.cache: dict[str, Probe] = {}
        #: dimension -> value -> Probe, for the searches that share this prober.
        self.points: dict[str, dict[int, Probe]] = {}
        self.traces: dict[str, list] = {}  # trace key -> the traces loaded for it (None: simulate directly)
        self.executed = 0
        self.direct = 0  # of the executed probes, those simulated (or measured) directly
        self.seconds = 0.0

    @property
    def run(self) -> RunConfig:
        return self.plan.run

    def run_for(self, dimension: str, value: int) -> RunConfig:
        workload = dataclasses.replace(self.run.workload, **{dimension: value})
        return dataclasses.replace(self.run, workload=workload)

    def __call__(self, dimension: str, value: int) -> Probe:
        run = self.run_for(dimension, value)
        key = result_id(run)
        if key not in self.cache:
            started = time.perf_counter()
            self.cache[key] = self._measure(run, value)
            self.executed += 1
            self.seconds += time.perf_counter() - started
        self.points.setdefault(dimension, {})[value] = self.cache[key]
        return self.cache[key]

    def _measure(self, run: RunConfig, value: int) -> Probe:
        try:
            check_sequence_length(run, self.plan.hf_config)
            result: Result = self._result(run)
        except ConfigError as error:  # e.g. a length the model cannot take: a failed probe, not a crash
            return Probe(value, "error", None, run.backend.name, None, str(error))
        reserved = self.by == "reserved" and result.metrics.get("peak_reserved_bytes") is not None
        return Probe(value, result.status.state, peak_of(result.metrics, self.by),
                     result.env.get("backend", run.backend.name), result.env.get("device_name"),
                     result.status.message, result.env.get("trace"),
                     complete=not (reserved and result.status.state == "oom"))

    def _result(self, run: RunConfig) -> Result:
        traces = tracing.engine() if self.via_trace else None
        if traces is None or traces.covered(run) is not None:
            self.direct += 1
            return _execute(dataclasses.replace(self.plan, run=run))
        key = traces.trace_key(run)
        known = self.traces.setdefault(key, [])
        trace = next((trace for trace in known if trace is None or trace.contains(run) is None), _MISSING)
        if trace is _MISSING:  # none yet, or one for another size range or residue class (a split trace)
            try:
                trace = traces.load_or_record(run)
            except getattr(traces, "TraceNotGeneral", ()):  # the structure changes with size: simulate
                trace = None
            known.append(trace)
        if trace is None:
            self.direct += 1
            return _execute(dataclasses.replace(self.plan, run=run))
        return traces.evaluate(trace, run)
