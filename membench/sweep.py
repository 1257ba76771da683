"""What one job of a sweep needs: is it already done, and where is it in the sweep.

Skipping is decided by the result file a run would write: ``<results_dir>/<run id>.json``.
The run id hashes the whole resolved config (backend and device included), so a
simulated result never stands in for a measured one. ``ok`` and ``oom`` rows count
as done; an ``error`` row is retried, since errors are usually fixed in the code.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

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
#: one symbolic step costs 2.5-3.5 direct simulations of the same run with every size symbolic (LLaMA-7B
#: LoRA r64 bf16 b4 s512: 11.4 s against 3.77 s; T5-large LoRA b8 s256: 20.5 s against 5.2 s;
#: RoBERTa-base LoRA b16 s128: 3.5 s against 1.02 s; one quiet core, model built each time), and
#: evaluating a trace costs a few hundredths of one (LLaMA-7B: 0.10-0.16 s): with 3 jobs or fewer,
#: simulating each directly is cheaper. A trace already in the cache is always used.
MIN_JOBS_PER_TRACE = 4
#: ... and when one size that is not the rank is all the jobs vary (the batch size, or the sequence
#: length with T5's target length following it), a trace of that size alone costs 1.7-2 direct
#: simulations (T5-large full b8 s256: 6.3 s against 3.7 s; T5-large LoRA+recompute: 16.2 s against
#: 8.8 s; rank and other sizes concrete, two cores busy): 3 jobs pay for it.
MIN_JOBS_PER_ONE_SIZE_TRACE = 3


@dataclass
class TracePlan:
    """How a sweep's simulated jobs use traces (:func:`plan_traces`).

    Attributes:
        direct: Indices of the jobs to simulate directly (``backend.trace=off``; same bytes, same run id).
        symbols: {index: ``backend.trace_symbols``} for the jobs whose trace group records a trace with
            only the sizes its jobs vary symbolic (absent: all four, the default).
        answered: Indices of the jobs a trace already in the cache answers.
    """

    direct: set[int] = field(default_factory=set)
    symbols: dict[int, str] = field(default_factory=dict)
    answered: set[int] = field(default_factory=set)


def varying_sizes(runs: list[RunConfig]) -> str:
    """The letters of :data:`membench.config.TRACE_SYMBOLS` whose size is not the same in every run."""
    from membench.config import TRACE_SYMBOLS
    from membench.trace.coverage import workload_dims

    values = list(zip(*(workload_dims(run) for run in runs)))
    return "".join(name for name, sizes in zip(TRACE_SYMBOLS, values) if len(set(sizes)) > 1)


def plan_traces(runs: list[RunConfig], cache_dir: Optional[str] = None) -> TracePlan:
    """Which of a sweep's jobs a trace covers are simulated directly, and which sizes each recording keeps.

    Per trace group (:func:`trace_groups`), the jobs no cached trace answers share one recording,
    symbolic in the sizes they vary only (B alone for a batch sweep; the others stay the jobs' own). It
    is made when enough jobs share it (:data:`MIN_JOBS_PER_TRACE`, :data:`MIN_JOBS_PER_ONE_SIZE_TRACE`);
    otherwise those jobs are simulated directly. Jobs a cached trace answers evaluate it.
    """
    from membench.trace.coverage import workload_dims

    groups: dict[str, list[int]] = {}
    for index, group in enumerate(trace_groups(runs)):
        if group is not None:
            groups.setdefault(group, []).append(index)
    plan = TracePlan(answered=answered_by_cached_traces(runs, [i for indices in groups.values() for i in indices],
                                                        cache_dir))
    for indices in groups.values():
        uncached = [index for index in indices if index not in plan.answered]
        if not uncached:
            continue
        varying = varying_sizes([runs[index] for index in uncached])
        target_follows = all(dims[1] == dims[2] for dims in (workload_dims(runs[index]) for index in uncached))
        one_size = varying in ("B", "S") or (varying == "ST" and target_follows)
        symbols = varying or "B"  # jobs that differ in no size (alpha, the card) still share a trace
        if len(uncached) < (MIN_JOBS_PER_ONE_SIZE_TRACE if one_size or not varying else MIN_JOBS_PER_TRACE):
            plan.direct |= set(uncached)
        elif symbols != runs[uncached[0]].backend.trace_symbols:
            plan.symbols.update(dict.fromkeys(uncached, symbols))
    return plan


def answered_by_cached_traces(runs: list[RunConfig], indices: list[int], cache_dir: Optional[str] = None) -> set[int]:
    """Those of ``indices`` whose run a trace covers and a trace in the cache answers (evaluating it takes
    milliseconds); each cache file is read once."""
    from membench.trace import covered
    from membench.trace.cache import cache_path, cached_traces

    read: dict[Path, list] = {}
    answered = set()
    for index in indices:
        run = runs[index]
        if covered(run) is not None:
            continue
        path = cache_path(run, cache_dir)
        if path not in read:
            read[path] = cached_traces(run, cache_dir)
        if any(trace.contains(run) is None for trace in read[path]):
            answered.add(index)
    return answered


def warm_worker() -> None:
    """What every job imports first (torch, transformers, PEFT, the simulation and recording code), so a
    worker process started ahead of the sweep's first wave has paid for it before that wave arrives."""
    from membench.collector import freeze_what_is_loaded, paused_collection, skip_final_collection

    with paused_collection():
        import membench.cli  # noqa: F401 - imported for its side effect: the modules load
        import membench.trace.record  # noqa: F401
    freeze_what_is_loaded()  # the worker's jobs' collections walk only what the jobs make
    skip_final_collection()  # a worker no job reaches exits quickly too


class CachedTraceWatcher:
    """Evaluates jobs in the background as traces that answer them arrive in the cache.

    While one wave of a sweep runs in worker processes, the sweeper's own process waits; this
    thread uses the wait to evaluate the next wave's jobs as soon as the worker recording their
    trace has cached it (:func:`answered_by_cached_traces`). It looks again at a cache file only when
    the file changed. Jobs no trace answers by :meth:`stop` are left for the sweeper to launch.

    Args:
        runs: The sweep's runs.
        indices: The jobs to watch for.
        evaluate: Evaluates job ``index`` and returns its state (it must not raise).
    """

    def __init__(self, runs: list[RunConfig], indices: list[int], evaluate: Callable[[int], Optional[str]],
                 interval_s: float = 0.5) -> None:
        import threading

        self.runs = runs
        self.pending = list(indices)
        self.evaluate = evaluate
        self.interval_s = interval_s
        self.states: dict[int, Optional[str]] = {}  # index -> state, for the jobs evaluated
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="membench-cached-trace-watcher", daemon=True)

    def __enter__(self) -> "CachedTraceWatcher":
        if self.pending:
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop after the evaluation under way (if any)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        from membench.trace.cache import cache_path

        paths = {index: cache_path(self.runs[index]) for index in self.pending}
        seen: dict[Path, tuple] = {}
        while self.pending and not self._stop.is_set():
            changed = set()
            for path in set(paths[index] for index in self.pending):
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # a rewrite is a new file (atomic rename)
                if seen.get(path) != version:
                    seen[path] = version
                    changed.add(path)
            ready = answered_by_cached_traces(self.runs, [index for index in self.pending if paths[index] in changed])
            for index in sorted(ready):
                if self._stop.is_set():
                    return
                self.states[index] = self.evaluate(index)
                self.pending.remove(index)
            self._stop.wait(self.interval_s)


def trace_waves(runs: list[RunConfig], answered: frozenset = frozenset()) -> list[list[int]]:
    """Job indices in launch order for parallel workers: ``[recorders and the rest, evaluators]``.

    Jobs that one symbolic trace answers (:func:`membench.trace.covered`) share its trace group.
    Launched all at once, two workers would record the same trace side by side; so the first
    wave holds one job per trace group and every job a trace does not cover, and the second wave
    the jobs that then evaluate from the cached traces. A job in ``answered`` (a cached trace answers
    it) records nothing: it waits in the second wave, and its group's recorder is a job that is not
    answered. The recorders go first in the first wave: they are its longest jobs, and the shorter
    direct ones then fill the workers' ends evenly. Otherwise the sweep's order is kept. A result does
    not depend on the order (tests/test_sweep.py).
    """
    recorders: list[int] = []
    rest: list[int] = []
    later: list[int] = []
    groups: set[str] = set()
    for index, group in enumerate(trace_groups(runs)):
        if group is None:
            rest.append(index)
        elif group in groups or index in answered:
            later.append(index)
        else:
            recorders.append(index)
            groups.add(group)
    return [wave for wave in (recorders + rest, later) if wave]
