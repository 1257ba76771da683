"""Rows: one per method x dimension x budget, with the verification on a GPU (:func:`maxfit_rows`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from membench import tracing
from membench.config import BackendConfig, RunConfig, check_choice, check_positive
from membench.errors import ConfigError
from membench.maxfit.config import CONFIRM, check_budgets, check_dimensions
from membench.maxfit.probe import Prober
from membench.maxfit.search import Finding, find_max_fit, search_backend
from membench.maxfit.text import budget_label, fit_text
from membench.results import provenance
from membench.identity import result_id
from membench.plan import plan

#: Row fields, in the order of the CSV's columns.
COLUMNS = [
    "model", "method", "rank", "precision", "fixed_batch_size", "fixed_seq_len", "target_len",
    "dimension", "budget_bytes", "max_fit", "peak_bytes_at_max_fit", "peak_bytes_at_next", "limited_by",
    "probes", "new_probes", "search_cap", "error", "backend", "device", "base_run_id",
    "verified_on", "verify_peak_bytes_at_max_fit", "verify_peak_bytes_at_next", "verify_agrees",
    "trace", "confirmed",
    "torch", "transformers", "peft", "python", "platform", "git_sha", "git_dirty", "created_at",
]
INT_COLUMNS = ["rank", "fixed_batch_size", "fixed_seq_len", "target_len", "budget_bytes", "max_fit",
               "peak_bytes_at_max_fit", "peak_bytes_at_next", "probes", "new_probes", "search_cap",
               "verify_peak_bytes_at_max_fit", "verify_peak_bytes_at_next"]


def cuda_available_or_raise() -> None:
    """Raise the cuda backend's own ConfigError, naming maxfit.verify, when no GPU is visible."""
    from membench.backends import create_backend

    try:
        create_backend(BackendConfig(name="cuda"))
    except ConfigError as error:
        raise ConfigError(f"maxfit.verify=true re-measures the answers on a GPU ({error}); "
                          "drop maxfit.verify to search with simulate only") from error


def verify(finding: Finding, cuda: Prober) -> dict[str, Any]:
    """Re-measure ``finding``'s answer and answer + 1 on the cuda backend."""
    out: dict[str, Any] = {"verified_on": None, "verify_peak_bytes_at_max_fit": None,
                           "verify_peak_bytes_at_next": None, "verify_agrees": None}
    if finding.limited_by == "error":
        return out
    agrees = True
    if finding.max_fit is not None:
        at = cuda(finding.dimension, finding.max_fit)
        out["verified_on"] = at.device
        out["verify_peak_bytes_at_max_fit"] = at.peak_bytes
        agrees = bool(at.fits(finding.budget_bytes))
    if finding.limited_by == "memory":
        following = cuda(finding.dimension, (finding.max_fit or 0) + 1)
        out["verified_on"] = following.device
        out["verify_peak_bytes_at_next"] = following.peak_bytes
        agrees = agrees and following.fits(finding.budget_bytes) is False
    out["verify_agrees"] = agrees
    return out


def uses_trace(run: RunConfig) -> bool:
    """Whether a search for ``run`` evaluates its probes from a trace: simulated probes,
    ``backend.trace=auto`` and a trace engine in this installation."""
    return (search_backend(run) == "simulate" and run.backend.trace == "auto" and not run.parallel.enabled
            and tracing.engine() is not None)  # parallel runs are simulated directly (trace.coverage)


def _checked(prober: Prober, finding: Finding) -> list[int]:
    """The values a confirmation simulates directly: the answer n and, when memory limits it, n + 1,
    each only if the search evaluated it from a trace."""
    points = prober.points.get(finding.dimension, {})
    values = [finding.max_fit] if finding.max_fit is not None else []
    if finding.limited_by == "memory":
        values.append((finding.max_fit or 0) + 1)
    return [x for x in values if x in points and points[x].trace is not None]


def _to_confirm(prober: Prober, findings: list[Finding], confirm: str) -> list[Finding]:
    """The findings a direct simulation confirms: ``all``, or for ``method`` / ``once`` the last one
    (largest budget) limited by memory whose n and n + 1 both came from the trace, else any from it."""
    traced = [f for f in findings if _checked(prober, f)]
    if confirm == "all":
        return traced
    both = [f for f in traced if len(_checked(prober, f)) == 2]
    return (both or traced)[-1:]


def confirm_finding(prober: Prober, direct: Prober, finding: Finding) -> Optional[str]:
    """Simulate ``finding``'s n and n + 1 directly; None when the trace's peaks (and states) match
    to the byte, else what differs."""
    points = prober.points[finding.dimension]
    for x in _checked(prober, finding):
        traced, simulated = points[x], direct(finding.dimension, x)
        if (traced.state, traced.peak_bytes) != (simulated.state, simulated.peak_bytes):
            return (f"{finding.dimension}={x}: trace {traced.trace} gives {traced.state} {traced.peak_bytes} B, "
                    f"direct simulation {simulated.state} {simulated.peak_bytes} B")
    return None


def maxfit_rows(runs: Sequence[RunConfig], dimensions: Sequence[str], budgets_bytes: Sequence[int], *,
                search_cap: int = 65536, verify_on_cuda: bool = False, confirm: str = "once",
                log: Optional[Callable[[str], None]] = None, by: str = "allocated") -> list[dict[str, Any]]:
    """One row per method (``runs``, one RunConfig each) x dimension x budget.

    Simulated searches with ``backend.trace=auto`` evaluate their probes from the method's trace
    (:func:`uses_trace`); ``confirm`` (see :data:`membench.maxfit.config.CONFIRM`) then simulates
    answers directly at n and n + 1 (``maxfit.verify`` measures them on the GPU instead). If a
    confirmation disagrees, that method is searched again by direct simulation.

    Everything that can fail on bad input is checked before the first probe: dimensions,
    budgets, each run's :func:`membench.plan.plan`, and a GPU when ``verify_on_cuda``.
    """
    check_dimensions(dimensions)
    check_budgets(budgets_bytes)
    check_positive("maxfit.search_cap", search_cap)
    check_choice("maxfit.confirm", confirm, CONFIRM)
    if verify_on_cuda:
        cuda_available_or_raise()
    plans = [plan(run) for run in runs]
    stamp = provenance()
    rows = []
    confirmed_once = False
    for the_plan in plans:
        run = the_plan.run
        prober = Prober(the_plan, search_backend(run), via_trace=uses_trace(run), by=by)
        cuda = Prober(the_plan, "cuda", by=by) if verify_on_cuda and prober.run.backend.name != "cuda" else None
        found = [f for dimension in dimensions
                 for f in find_max_fit(run, dimension, budgets_bytes, search_cap=search_cap, prober=prober)]
        confirmed: set[int] = set()
        if prober.via_trace and cuda is None and confirm != "off" and not (confirm == "once" and confirmed_once):
            direct = Prober(the_plan, search_backend(run), by=by)
            for finding in _to_confirm(prober, found, confirm):
                disagreement = confirm_finding(prober, direct, finding)
                if disagreement is not None:
                    if log:
                        log(f"  {run.model.name} {run.method.name}: the trace disagrees with direct simulation "
                            f"({disagreement}); searching again by direct simulation")
                    prober = direct
                    found = [f for dimension in dimensions
                             for f in find_max_fit(run, dimension, budgets_bytes, search_cap=search_cap,
                                                   prober=prober)]
                    confirmed = set()
                    break
                confirmed.add(id(finding))
                confirmed_once = True
        for finding in found:
            row = _row(prober, finding, stamp)
            if prober.via_trace:
                at = prober.points[finding.dimension].get(finding.max_fit if finding.max_fit is not None else 1)
                row["trace"] = at.trace if at is not None else None
                row["confirmed"] = True if id(finding) in confirmed else None
            if cuda is not None:
                row.update(verify(finding, cuda))
            elif prober.run.backend.name == "cuda" and finding.limited_by != "error":
                row["verified_on"] = prober.cache[next(iter(prober.cache))].device
            rows.append(row)
            if log:
                log(_progress_line(row))
    return rows


def _row(prober: Prober, finding: Finding, stamp: dict[str, Any]) -> dict[str, Any]:
    run = prober.run
    return {
        "model": run.model.name, "method": run.method.name, "rank": run.method.rank,
        "precision": run.train.precision,
        "fixed_batch_size": None if finding.dimension == "batch_size" else run.workload.batch_size,
        "fixed_seq_len": None if finding.dimension == "seq_len" else run.workload.seq_len,
        "target_len": run.workload.target_len,
        **dataclasses.asdict(finding),
        "backend": run.backend.name,
        "device": run.backend.device if run.backend.name == "simulate" else None,
        "base_run_id": result_id(run),
        "verified_on": None, "verify_peak_bytes_at_max_fit": None, "verify_peak_bytes_at_next": None,
        "verify_agrees": None, "trace": None, "confirmed": None,
        **{key: stamp.get(key) for key in COLUMNS[COLUMNS.index("torch"):]},
        # A search over several GPUs (maxfit.world_sizes) says how many; one-GPU rows keep their columns.
        **({"world_size": run.parallel.world_size} if run.parallel.enabled else {}),
    }


def _progress_line(row: dict[str, Any]) -> str:
    how = ", from a trace" if row.get("trace") else ""
    how += ", confirmed by direct simulation" if row.get("confirmed") else ""
    return (f"  {row['model']} {row['method']} {row['dimension']} @ {budget_label(row['budget_bytes'])}: "
            f"{fit_text(row)} ({row['probes']} probes, {row['new_probes']} new{how})")
