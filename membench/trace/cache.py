"""Traces on disk, keyed by :func:`membench.trace.key.trace_key`: one recording per (model, method, precision, ...).

A cache file holds every trace recorded under one key (usually one; more when a guard gave the
first a validity range that a later workload lies outside). Files are pickles written atomically
(:func:`membench.files.write_atomic`) under a lock, re-read first, so workers of a sweep that record
traces of one key side by side keep each other's; a file that cannot be read is reported on stderr
and recorded again, never fatal.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from membench.config import RunConfig
from membench.files import write_atomic
from membench.trace.key import TRACE_FORMAT_VERSION, trace_key

if TYPE_CHECKING:
    from membench.trace.record import Trace

#: (Trace group (:func:`membench.trace.coverage.trace_group`), backend.trace_symbols) whose recording found no general trace
#: in this process, and why.
_not_general: dict[tuple[str, str], str] = {}
#: Environment variable naming the cache folder.
CACHE_ENV = "MEMBENCH_TRACE_CACHE"


def default_cache_dir() -> Path:
    """``$MEMBENCH_TRACE_CACHE``, else ``$XDG_CACHE_HOME/membench/traces`` (``~/.cache/membench/traces``)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "membench" / "traces"


def cache_path(run: RunConfig, cache_dir: Optional[str | Path] = None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{trace_key(run)}.trace.pickle"


def _read(path: Path, key: str) -> list[Trace]:
    """The traces in ``path``; [] when there is none, or (reported on stderr) when it is unreadable."""
    if not path.exists():
        return []
    from membench.trace.record import Trace  # the recording machinery (PEFT, transformers): only when there is a trace

    try:
        with open(path, "rb") as handle:
            traces = pickle.load(handle)
        if not isinstance(traces, list) or not all(isinstance(trace, Trace) for trace in traces):
            raise ValueError("not a list of traces")
        if any(trace.key != key or trace.format_version != TRACE_FORMAT_VERSION for trace in traces):
            raise ValueError("a trace of another key or format")
        return traces
    except Exception as error:  # noqa: BLE001 - any unreadable cache file is re-recorded
        print(f"membench: trace cache file {path} is unreadable ({type(error).__name__}: {error}); "
              "recording it again", file=sys.stderr)
        return []


def cached_traces(run: RunConfig, cache_dir: Optional[str | Path] = None) -> list[Trace]:
    """The traces cached under ``run``'s key (any size range or residue class); [] when none."""
    return _read(cache_path(run, cache_dir), trace_key(run))


def load_or_record(run: RunConfig, cache_dir: Optional[str | Path] = None) -> Trace:
    """The cached trace that answers ``run``, recording (and caching) one when there is none.

    Raises:
        TraceNotGeneral: recording found that no trace answers ``run`` (see :func:`record_trace`).
    """
    from membench.trace import record  # the recording machinery: imported when a trace may be recorded
    from membench.trace.coverage import trace_group
    from membench.trace.symbolic import TraceNotGeneral

    key = trace_key(run)
    path = cache_path(run, cache_dir)
    for trace in _read(path, key):
        if trace.contains(run) is None:
            return trace
    group = (trace_group(run), run.backend.trace_symbols)  # fewer symbols may record where all four could not
    if group in _not_general:
        raise TraceNotGeneral(_not_general[group])
    try:
        trace = record.record_trace(run)
    except TraceNotGeneral as error:
        _not_general[group] = str(error)  # not again in this process (a sweep would pay for it per point)
        raise
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):  # another process may have added a trace of this key (another size range) meanwhile
            write_atomic(path, pickle.dumps([*_read(path, key), trace], protocol=pickle.HIGHEST_PROTOCOL))
    except OSError as error:
        print(f"membench: could not cache the trace in {path} ({error}); using it uncached", file=sys.stderr)
    return trace


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache folder of ``path`` (POSIX ``flock``; no lock where there is none)."""
    try:
        import fcntl
    except ImportError:  # Windows: a sweep's workers may then drop each other's traces (re-recorded later)
        yield
        return
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # releases the lock
