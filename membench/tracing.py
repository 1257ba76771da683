"""Where membench's commands meet the symbolic-trace engine (:mod:`membench.trace`).

One rule, used by ``membench`` (single runs and sweeps), ``membench-maxfit`` and ``membench-fit``:
a run is answered from a trace when it is simulated (``backend.name`` ``simulate``, or ``auto``
without a GPU) and ``backend.trace=auto``; everything else is measured directly
(:func:`membench.runner.measure`). The engine itself decides whether a trace covers the run and
falls back to direct simulation, with a one-line note, when it does not.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Optional

from membench.config import RunConfig
from membench.results import Result


#: The engine's API that the commands use.
API = ("trace_key", "covered", "load_or_record", "evaluate", "simulate_via_trace")


def engine() -> Optional[ModuleType]:
    """:mod:`membench.trace`, or None while this checkout has no (complete) trace engine."""
    if importlib.util.find_spec("membench.trace") is None:
        return None
    import membench.trace

    return membench.trace if all(hasattr(membench.trace, name) for name in API) else None


def wants_trace(run: RunConfig) -> bool:
    """Whether ``run`` should be answered through a trace: simulated, with ``backend.trace=auto``."""
    if run.backend.trace != "auto":
        return False
    from membench.backends import resolve_name  # imports torch

    return resolve_name(run.backend) == "simulate"


def measure(run: RunConfig) -> Result:
    """``run``'s Result: from a trace where :func:`wants_trace` (the engine falls back itself when
    no trace covers it), else by :func:`membench.runner.measure`."""
    traces = engine() if wants_trace(run) else None
    if traces is None:
        from membench.runner import measure as direct

        return direct(run)
    return traces.simulate_via_trace(run)
