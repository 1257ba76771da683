"""What one job of a sweep needs: is it already done, and where is it in the sweep.

Skipping is decided by the result file a run would write: ``<results_dir>/<run id>.json``.
The run id hashes the whole resolved config (backend and device included), so a
simulated result never stands in for a measured one. ``ok`` and ``oom`` rows count
as done; an ``error`` row is retried, since errors are usually fixed in the code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from membench.config import RunConfig
from membench.results import Result, ResultFileError, read_result

DONE_STATES = ("ok", "oom")
TOTAL_ENV = "MEMBENCH_SWEEP_TOTAL"  # the sweeper sets it per job (hydra.job.env_set); position() reads it


def result_path(run: RunConfig) -> Path:
    from membench.identity import result_id

    return Path(run.results_dir) / f"{result_id(run)}.json"


def existing_result(run: RunConfig) -> Optional[Result]:
    """The finished result for exactly this config, or None (missing, errored or unreadable)."""
    path = result_path(run)
    if not path.exists():
        return None
    try:
        result = read_result(path)
    except ResultFileError as error:
        print(f"membench: {error}; measuring again", file=sys.stderr)
        return None
    return result if result.status.state in DONE_STATES else None


def position(job_number: Optional[int]) -> str:
    """``[i/N] `` inside a sweep (N from the sweeper, i counted from 1), else ``""``."""
    if job_number is None:
        return ""
    total = os.environ.get(TOTAL_ENV)
    return f"[{job_number + 1}/{total}] " if total else f"[{job_number + 1}] "


def trace_groups(runs: list[RunConfig]) -> list[Optional[str]]:
    """Each run's trace group (:func:`membench.trace.coverage.trace_group`: the runs one trace answers),
    or None for a run no trace covers (:func:`membench.trace.covered`: it is simulated directly,
    measured on a device, or has ``backend.trace=off``)."""
    from membench.trace import covered
    from membench.trace.coverage import trace_group

    return [trace_group(run) if covered(run) is None else None for run in runs]


#: Record a trace for a sweep only when at least this many of its jobs would evaluate it. Recording
#: one symbolic step (B, S, T and the LoRA rank symbolic) costs 3.0-3.5 direct simulations of the
#: same run (LLaMA-7B LoRA r64 bf16 b4 s512: 11.4 s against 3.77 s; T5-large LoRA b8 s256: 18.7 s
#: against 5.93 s; RoBERTa-base LoRA b16 s128: 3.5 s against 1.02 s; one quiet core, model built
#: each time), and evaluating a trace costs a few hundredths of one (LLaMA-7B: 0.10-0.16 s): with
#: 3 jobs or fewer, simulating each directly is cheaper. A trace already in the cache is always used.
MIN_JOBS_PER_TRACE = 4


def direct_where_cheaper(runs: list[RunConfig], cache_dir: Optional[str] = None) -> set[int]:
    """Indices of the jobs to simulate directly (``backend.trace=off``; same bytes, same run id).

    Those a trace covers, whose trace group has fewer than :data:`MIN_JOBS_PER_TRACE` jobs in the
    sweep, and for which no cached trace answers.
    """
    from membench.trace.cache import cached_traces

    groups: dict[str, list[int]] = {}
    for index, group in enumerate(trace_groups(runs)):
        if group is not None:
            groups.setdefault(group, []).append(index)
    direct: set[int] = set()
    for indices in groups.values():
        if len(indices) >= MIN_JOBS_PER_TRACE:
            continue
        cached = cached_traces(runs[indices[0]], cache_dir)
        direct |= {index for index in indices if not any(trace.contains(runs[index]) is None for trace in cached)}
    return direct


def trace_waves(runs: list[RunConfig]) -> list[list[int]]:
    """Job indices in launch order for parallel workers: ``[recorders, evaluators]``.

    Jobs that one symbolic trace answers (:func:`membench.trace.covered`) share its trace group.
    Launched all at once, two workers would record the same trace side by side; so the first
    wave holds one job per trace group and every job a trace does not cover, and the second wave
    the jobs that then evaluate from the cached traces. Within a wave the sweep's order is kept.
    A result does not depend on the order (tests/test_sweep.py).
    """
    first: list[int] = []
    later: list[int] = []
    groups: set[str] = set()
    for index, group in enumerate(trace_groups(runs)):
        if group is not None and group in groups:
            later.append(index)
        else:
            first.append(index)
            if group is not None:
                groups.add(group)
    return [wave for wave in (first, later) if wave]
