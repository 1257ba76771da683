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
