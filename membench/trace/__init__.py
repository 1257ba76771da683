"""One trace, every workload: a symbolic allocation log answers any batch size, sequence length and LoRA rank exactly.

A simulated step's allocation log (:mod:`membench.events`) has the same events for every batch
size B >= 2, sequence length S >= 2 (and T5's decoder length T) and LoRA rank R >= 2, with sizes
that are polynomials in them. :func:`record_trace` records it once with B, S, T, R symbolic;
:func:`evaluate` evaluates every size for a concrete workload, rounds as the allocator does,
replays, and gives the Result a direct simulation gives, byte for byte in its metrics.

Modules: :mod:`~membench.trace.symbolic` (the symbolic step), :mod:`~membench.trace.record`
(the Trace), :mod:`~membench.trace.polynomial` (sizes), :mod:`~membench.trace.evaluation`,
:mod:`~membench.trace.key` (cache key), :mod:`~membench.trace.cache`, :mod:`~membench.trace.coverage`.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any, Optional

from membench.config import RunConfig
from membench.results import Result

#: Public name -> the module that defines it. Loaded when first asked for: deciding which runs a trace
#: covers and reading the cache (a sweep's planning) needs neither PEFT nor the recording machinery.
_EXPORTS = {"default_cache_dir": "cache", "load_or_record": "cache", "covered": "coverage", "evaluate": "evaluation",
            "evaluated_events": "evaluation", "TRACE_FORMAT_VERSION": "key", "trace_key": "key", "Trace": "record",
            "record_trace": "record", "TraceNotGeneral": "symbolic"}

if TYPE_CHECKING:
    from membench.trace.cache import default_cache_dir, load_or_record
    from membench.trace.coverage import covered
    from membench.trace.evaluation import evaluate, evaluated_events
    from membench.trace.key import TRACE_FORMAT_VERSION, trace_key
    from membench.trace.record import Trace, record_trace
    from membench.trace.symbolic import TraceNotGeneral


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def simulate_via_trace(run: RunConfig, cache_dir: Optional[str] = None) -> Result:
    """``run``'s Result from a (cached) trace where one covers it, else by direct simulation with a note on stderr."""
    from membench.runner import measure
    from membench.trace.cache import load_or_record
    from membench.trace.coverage import covered
    from membench.trace.evaluation import evaluate
    from membench.trace.symbolic import TraceNotGeneral

    reason = covered(run)
    if reason is None:
        try:
            return evaluate(load_or_record(run, cache_dir), run)
        except TraceNotGeneral as error:
            reason = str(error)
    print(f"membench: simulating directly: {reason}", file=sys.stderr)
    return measure(run)


__all__ = ["TRACE_FORMAT_VERSION", "Trace", "TraceNotGeneral", "covered", "default_cache_dir", "evaluate",
           "evaluated_events", "load_or_record", "record_trace", "simulate_via_trace", "trace_key"]
