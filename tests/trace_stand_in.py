"""A stand-in for the trace engine's API (membench.trace), for tests of the commands that use it.

It answers like the engine (covered / trace_key / load_or_record / evaluate / simulate_via_trace)
but "evaluates" by direct simulation, counting each call, so tests can tell trace evaluations
from direct simulations (which go through membench.maxfit.execute / membench.runner.measure).
``offset`` makes every evaluated peak wrong by that many bytes (a broken trace).
"""

from __future__ import annotations

import dataclasses

from membench.config import RunConfig
from membench.identity import result_id
from membench.plan import plan
from membench.results import Result


class StandInTrace(str):
    """A trace's name, answering :meth:`membench.trace.record.Trace.contains` for every size."""

    def contains(self, run: RunConfig):
        return None


class StandInEngine:
    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.recorded: list[str] = []
        self.evaluated = 0
        self.direct = 0

    def covered(self, run: RunConfig):
        sizes = (run.workload.batch_size, run.workload.seq_len)
        return None if min(sizes) >= 2 else "size 1 is simulated directly"

    def trace_key(self, run: RunConfig) -> str:
        workload = dataclasses.replace(run.workload, batch_size=2, seq_len=2)
        return "trace-" + result_id(dataclasses.replace(run, workload=workload)).rsplit("--", 1)[-1]

    def load_or_record(self, run: RunConfig, cache_dir=None) -> StandInTrace:
        self.recorded.append(self.trace_key(run))
        return StandInTrace(self.trace_key(run))

    def evaluate(self, trace: str, run: RunConfig) -> Result:
        from membench.runner import execute

        self.evaluated += 1
        result = execute(plan(run))
        metrics = dict(result.metrics)
        if metrics.get("peak_allocated_bytes") is not None:
            metrics["peak_allocated_bytes"] += self.offset
        return dataclasses.replace(result, metrics=metrics, env={**result.env, "trace": trace})

    def simulate_via_trace(self, run: RunConfig) -> Result:
        if self.covered(run) is None:
            return self.evaluate(self.load_or_record(run), run)
        from membench.runner import measure

        self.direct += 1
        return measure(run)
