"""``membench-maxfit``: the largest batch size and sequence length that fit a memory budget.

For each memory budget (24, 40 and 80 GiB by default), each method and each searched
dimension (``batch_size`` with ``workload.seq_len`` held fixed, ``seq_len`` with
``workload.batch_size`` held fixed), it finds the largest value whose training step fits,
and writes one row per model x method x budget x dimension::

    membench-maxfit model=roberta-large
    membench-maxfit model=llama-7b train.precision=bf16 workload.seq_len=512 method.rank=64
    membench-maxfit model=tiny-llama maxfit.budgets_bytes=[2000000] backend.name=cpu

so that a report can say "on a 24 GiB card, lora_fa fits batch 12 where lora fits 7".

**What a budget means.** A configuration fits a budget when its
``metrics["peak_allocated_bytes"]`` (``torch.cuda.max_memory_allocated`` on a GPU, its
prediction under ``simulate``) is at most the budget, in integer bytes (GiB budgets are
converted once, 1 GiB = 2**30 B). Nothing is subtracted: the peak already holds the cuBLAS
workspaces (they are allocator memory), and what ``max_memory_allocated`` does not see is not
modelled here: the CUDA context (per process, outside the allocator), the caching allocator's reserve
and fragmentation (``max_memory_reserved`` - allocated), and memory that a card's nominal size
does not deliver (a "24 GB" card reports about 23.6 GiB). For a physical card, give a budget
with that headroom taken off (e.g. ``maxfit.budgets_gib=[22]``). Simulated probes include the
cuBLAS workspaces of ``backend.device`` (64 MiB for the H100 profile, ~8 MiB for the generic
ones); the profile's capacity plays no part (a simulated "oom" status against it is ignored,
the predicted peak is compared with the budget, since simulation never stops early).

**Search.** Every probe is one :func:`membench.runner.execute` in this process (2-13 s for a
large model under ``simulate``), so the search is model-guided, never a linear scan. Probes
are cached by their run id, so budgets (and the two dimensions, which share the
configured point) share them:

* batch size: peak memory is affine in batch size for everything else fixed. Probe 1 and the
  configured ``workload.batch_size``, extrapolate the line to the budget, probe the predicted
  answer ``n`` and ``n + 1`` (``n + 1`` only if ``n`` fits); when the prediction misses, the
  line is re-fitted through the bracket's ends (secant). Two rounds in a row that do not halve
  the bracket fall back to one bisection step; with no usable line (flat peaks, e.g. full
  fine-tuning whose optimizer step dominates at small batches), the search doubles.
* sequence length: not affine (eager attention and T5's math-kernel attention keep S x S
  probabilities), so the same safeguarded search fits a quadratic through the three points
  nearest the boundary instead of a line, with the same doubling / bisection fallbacks (an
  exponential + bisection search whenever the fit misleads).
  The model's maximum length (``membench.models.max_sequence_length``, the limit
  ``membench.preflight.check_sequence_length`` enforces) caps it: when even that length fits,
  the row says ``limited_by="model_max_length"`` rather than memory.
* both stop at ``maxfit.search_cap`` (``limited_by="search_cap"``: the answer is at least that).

Each row records ``probes`` (points its search consulted) and ``new_probes`` (of those, the
ones it ran; the others came from the cache). A probe that fails (status ``error``) ends that
search with ``limited_by="error"`` and the message, and the other searches go on.

**Verification.** ``maxfit.verify=true`` re-measures each answer and answer + 1 on the
``cuda`` backend and records ``verified_on`` (the GPU), the measured peaks and whether they
agree. Without a GPU it fails before any probe, with the cuda backend's own ConfigError.

Python API: :func:`find_max_fit` (one method, one dimension, several budgets),
:func:`maxfit_rows` (several methods), :func:`write_maxfit`, :func:`load_maxfit`,
:func:`sentences`, :func:`markdown_table`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from membench.config import (
    BackendConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    WorkloadConfig,
    check_positive,
    register_configs,
)
from membench.errors import ConfigError
from membench.models import max_sequence_length
from membench.preflight import check_sequence_length
from membench.results import Result, config_digest, provenance
from membench.runner import Plan, execute, plan, result_id

GiB = 1 << 30
DIMENSIONS = ("batch_size", "seq_len")
LIMITS = ("memory", "model_max_length", "search_cap", "error")
SCHEMA_VERSION = 1
KIND = "membench-maxfit"
#: Row fields, in the order of the CSV's columns.
COLUMNS = [
    "model", "method", "rank", "precision", "fixed_batch_size", "fixed_seq_len", "target_len",
    "dimension", "budget_bytes", "max_fit", "peak_bytes_at_max_fit", "peak_bytes_at_next", "limited_by",
    "probes", "new_probes", "search_cap", "error", "backend", "device", "base_run_id",
    "verified_on", "verify_peak_bytes_at_max_fit", "verify_peak_bytes_at_next", "verify_agrees",
    "torch", "transformers", "peft", "python", "platform", "git_sha", "git_dirty", "created_at",
]
INT_COLUMNS = ["rank", "fixed_batch_size", "fixed_seq_len", "target_len", "budget_bytes", "max_fit",
               "peak_bytes_at_max_fit", "peak_bytes_at_next", "probes", "new_probes", "search_cap",
               "verify_peak_bytes_at_max_fit", "verify_peak_bytes_at_next"]
#: Method keys that only adapter methods accept (RunConfig rejects them for method.kind=full).
ADAPTER_ONLY_KEYS = ("method.rank", "method.alpha", "method.target_modules", "method.lora_dropout")
NOTE = ("budget = the most max_memory_allocated may reach; the CUDA context, the allocator's "
        "reserve/fragmentation and a card's nominal-vs-usable gap are not included: leave that headroom.")


# --------------------------------------------------------------------------- configuration


@dataclass
class MaxFitConfig:
    """The ``maxfit`` section of ``conf/maxfit.yaml`` (see there for each key)."""

    budgets_gib: list[float] = field(default_factory=lambda: [24.0, 40.0, 80.0])
    budgets_bytes: Optional[list[int]] = None
    methods: list[str] = field(default_factory=lambda: ["full", "lora", "lora_fa", "lora_recompute"])
    dimensions: list[str] = field(default_factory=lambda: list(DIMENSIONS))
    search_cap: int = 65536
    verify: bool = False
    output: str = "results/maxfit"

    def __post_init__(self) -> None:
        check_positive("maxfit.search_cap", self.search_cap)
        check_dimensions(self.dimensions)
        if not self.methods:
            raise ConfigError("maxfit.methods=[] names no method; e.g. [full, lora, lora_fa, lora_recompute]")

    def budgets(self) -> list[int]:
        """The budgets in integer bytes (``budgets_bytes`` when given, else ``budgets_gib``)."""
        if self.budgets_bytes is not None:
            return check_budgets(self.budgets_bytes, "maxfit.budgets_bytes")
        check_budgets(self.budgets_gib, "maxfit.budgets_gib")
        return [int(round(gib * GiB)) for gib in self.budgets_gib]


@dataclass
class MaxFitRunConfig(RunConfig):
    """Root schema of ``conf/maxfit.yaml``: ``conf/config.yaml`` plus a ``maxfit`` section.

    It is merged after ``config``: the RunConfig fields are MISSING here, and OmegaConf
    never lets a MISSING value replace a set one, so they keep config.yaml's values (and
    types); only ``maxfit`` is added.
    """

    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    workload: WorkloadConfig = MISSING
    train: TrainConfig = MISSING
    backend: BackendConfig = MISSING
    results_dir: str = MISSING
    force: bool = MISSING
    maxfit: MaxFitConfig = field(default_factory=MaxFitConfig)


def register_maxfit_configs() -> None:
    register_configs()
    ConfigStore.instance().store(name="maxfit_schema", node=MaxFitRunConfig)


def check_dimensions(dimensions: Sequence[str]) -> None:
    if not dimensions:
        raise ConfigError(f"maxfit.dimensions=[] searches nothing; choose from: {', '.join(DIMENSIONS)}")
    for dimension in dimensions:
        if dimension not in DIMENSIONS:
            raise ConfigError(f"maxfit.dimensions entry {dimension!r} is not supported; "
                              f"choose from: {', '.join(DIMENSIONS)}")


def check_budgets(budgets: Sequence[float], key: str = "budgets_bytes") -> list:
    if not budgets:
        raise ConfigError(f"{key}=[] gives no budget; e.g. [24, 40, 80] (GiB) or bytes in maxfit.budgets_bytes")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0 \
                or not math.isfinite(budget):
            raise ConfigError(f"{key} entry {budget!r} is not a memory budget; budgets must be positive numbers")
    return list(budgets)


register_maxfit_configs()


# --------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class Probe:
    """One measured point: the searched dimension at ``value``, everything else fixed."""

    value: int
    state: str  # ok | oom | error (as in the Result)
    peak_bytes: Optional[int]
    backend: str
    device: Optional[str]
    message: Optional[str] = None

    def fits(self, budget: int) -> Optional[bool]:
        """Whether the step fits ``budget``; None for an error.

        A simulated ``oom`` is against the simulated card's capacity, not the budget, and
        its predicted peak is complete, so only the peak decides. A real OOM does not fit
        (its peak is only what was reached before the allocation failed).
        """
        if self.state == "error" or self.peak_bytes is None:
            return None
        if self.state == "oom" and self.backend != "simulate":
            return False
        return self.peak_bytes <= budget


class Prober:
    """Runs the probes of one method (one Plan), caching them by run id.

    Args:
        the_plan: The validated base run (from :func:`membench.runner.plan`).
        backend: Backend name to probe on (``simulate``, ``cpu`` or ``cuda``); None keeps
            the plan's ``backend.name``.
    """

    def __init__(self, the_plan: Plan, backend: Optional[str] = None) -> None:
        run = the_plan.run
        if backend is not None:
            run = dataclasses.replace(run, backend=dataclasses.replace(run.backend, name=backend))
        self.plan = dataclasses.replace(the_plan, run=run)
        self.cache: dict[str, Probe] = {}
        #: dimension -> value -> Probe, for the searches that share this prober.
        self.points: dict[str, dict[int, Probe]] = {}
        self.executed = 0
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
            result: Result = execute(dataclasses.replace(self.plan, run=run))
        except ConfigError as error:  # e.g. a length the model cannot take: a failed probe, not a crash
            return Probe(value, "error", None, run.backend.name, None, str(error))
        return Probe(value, result.status.state, result.metrics.get("peak_allocated_bytes"),
                     result.env.get("backend", run.backend.name), result.env.get("device_name"),
                     result.status.message)


# --------------------------------------------------------------------------- search


@dataclass
class Finding:
    """The answer of one search: one method, one dimension, one budget."""

    dimension: str
    budget_bytes: int
    max_fit: Optional[int]
    peak_bytes_at_max_fit: Optional[int]
    peak_bytes_at_next: Optional[int]
    limited_by: str  # memory | model_max_length | search_cap | error
    probes: int
    new_probes: int
    search_cap: int
    error: Optional[str] = None


def search_limit(prober: Prober, dimension: str, search_cap: int) -> tuple[int, str]:
    """(the largest value to probe, what caps it): the model's length or the search cap."""
    if dimension == "seq_len":
        limit = max_sequence_length(prober.plan.hf_config)
        if limit is not None and limit <= search_cap:
            return limit, "model_max_length"
    return search_cap, "search_cap"


def _bracket(points: dict[int, Probe], budget: int) -> tuple[int, Optional[int]]:
    """(largest value known to fit or 0, smallest value known not to fit or None)."""
    over = [x for x, p in points.items() if p.fits(budget) is False]
    hi = min(over) if over else None
    fits = [x for x, p in points.items() if p.fits(budget) and (hi is None or x < hi)]
    return (max(fits) if fits else 0), hi


def _spread(descending: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    """Up to ``count`` points, from the first (largest) down, each the largest at or below half the
    previous one (else the smallest left): a wide baseline, so a few bytes of rounding in one peak
    barely move the fit, yet near the boundary. Returned in ascending order."""
    chosen, rest = descending[:1], descending[1:]
    while len(chosen) < count and rest:
        halves = [pt for pt in rest if pt[0] <= chosen[-1][0] / 2]
        chosen.append(halves[0] if halves else rest[-1])
        rest = [pt for pt in rest if pt[0] < chosen[-1][0]]
    return chosen[::-1]


def _predict(points: dict[int, Probe], budget: int, lo: int, hi: Optional[int], degree: int) -> Optional[float]:
    """Where a line (degree 1) or parabola (degree 2) through known points crosses ``budget``.

    It goes through ``lo`` and ``hi`` when both are known (interpolation), else through the
    largest fitting points (extrapolation). None when it cannot (too few points, not rising).
    """
    usable = sorted((x, p.peak_bytes) for x, p in points.items()
                    if p.fits(budget) is not None and (p.state == "ok" or p.backend == "simulate"))
    below = [pt for pt in usable if pt[0] <= lo][::-1]
    above = [pt for pt in usable if hi is not None and pt[0] >= hi]
    chosen = (_spread(below, degree) + above[:1]) if above else _spread(below, degree + 1)
    if len(chosen) < 2:
        return None
    if degree == 2 and len(chosen) == 3:
        xs = np.array([x for x, _ in chosen], dtype=float)
        ys = np.array([y for _, y in chosen], dtype=float)
        roots = np.roots(np.polyfit(xs, ys - budget, 2))
        upward = [r.real for r in roots if abs(r.imag) < 1e-9 and r.real >= lo]
        if upward:
            return min(upward)
    (x1, y1), (x2, y2) = chosen[-2], chosen[-1]
    if y2 <= y1:
        return None
    return x1 + (budget - y1) * (x2 - x1) / (y2 - y1)


def _search_one(probe: Callable[[int], Probe], points: dict[int, Probe], budget: int, start: int,
                limit: int, limit_reason: str, degree: int) -> tuple[Optional[int], str, Optional[str]]:
    """Largest value in [1, limit] that fits ``budget``: (value or None, limited_by, error)."""

    def get(x: int) -> Optional[Probe]:
        points[x] = probe(x)
        return points[x] if points[x].state == "error" else None

    for x in dict.fromkeys((1, min(max(start, 1), limit))):  # two points to fit a line through
        failed = get(x)
        if failed:
            return None, "error", f"{failed.value}: {failed.message}"
        if x == 1 and not points[1].fits(budget):
            return None, "memory", None
    misses = 0  # bracketed rounds in a row that did not halve the bracket
    stalls = 0  # not yet bracketed: extrapolation rounds in a row that found no upper bound
    while True:
        lo, hi = _bracket(points, budget)
        if hi == lo + 1:
            return lo, "memory", None
        if hi is None and lo >= limit:
            return limit, limit_reason, None
        upper = hi - 1 if hi is not None else limit  # the answer is in [lo, upper]
        width = (hi - lo) if hi is not None else None
        guess = None if misses >= 2 or stalls >= 2 else _predict(points, budget, lo, hi, degree)
        if guess is None or not math.isfinite(guess):
            candidates = [(lo + hi) // 2] if hi is not None else [min(2 * lo, limit)]
        else:
            answer = min(max(int(math.floor(guess + 1e-9)), lo), upper)
            candidates = [x for x in (answer, answer + 1) if lo < x <= limit and x not in points]
            if not candidates:
                candidates = [(lo + hi) // 2] if hi is not None else [min(2 * lo, limit)]
        for x in candidates:
            failed = get(x)
            if failed:
                return None, "error", f"{failed.value}: {failed.message}"
            if not points[x].fits(budget):
                break  # x + 1 would not fit either
        new_lo, new_hi = _bracket(points, budget)
        # Once bracketed, two rounds in a row that did not halve the bracket mean the model
        # misleads: bisect once, then trust the (now closer) points again.
        missed = hi is not None and guess is not None and (new_hi - new_lo) * 2 > width
        misses = misses + 1 if missed else 0
        # Not bracketed: extrapolating from below twice without passing the budget, double once.
        stalls = 0 if new_hi is not None or guess is None else stalls + 1


def find_max_fit(run: RunConfig, dimension: str, budgets_bytes: Sequence[int], *, search_cap: int = 65536,
                 prober: Optional[Prober] = None) -> list[Finding]:
    """For each budget (integer bytes), the largest ``dimension`` value at which ``run`` fits.

    The other workload dimension stays at ``run``'s value; ``run.workload.<dimension>`` is
    only the second starting point of the search. ``backend.name=auto`` searches with
    ``simulate``. Pass a shared ``prober`` (built from :func:`membench.runner.plan`) to reuse
    probes across calls.

    Raises:
        ConfigError: unknown dimension, a budget that is not a positive number, or a run
            that fails :func:`membench.runner.plan` (before any probe).
    """
    check_dimensions([dimension])
    check_budgets(budgets_bytes)
    check_positive("search_cap", search_cap)
    if prober is None:
        prober = Prober(plan(run), search_backend(run))
    limit, reason = search_limit(prober, dimension, search_cap)
    degree = 2 if dimension == "seq_len" else 1
    points = prober.points.setdefault(dimension, {})  # what earlier searches learnt, free to use
    findings = []
    for budget in sorted(set(int(b) for b in budgets_bytes)):
        consulted: set[int] = set()
        executed_before = prober.executed

        def probe(x: int, consulted: set[int] = consulted) -> Probe:
            consulted.add(x)
            return prober(dimension, x)

        value, limited_by, error = _search_one(probe, points, budget, getattr(prober.run.workload, dimension),
                                               limit, reason, degree)
        at = points.get(value) if value is not None else None
        following = points.get(value + 1 if value is not None else 1) if limited_by == "memory" else None
        findings.append(Finding(dimension, budget, value, at.peak_bytes if at else None,
                                following.peak_bytes if following else None, limited_by, len(consulted),
                                prober.executed - executed_before, search_cap, error))
    order = {int(b): i for i, b in enumerate(dict.fromkeys(int(b) for b in budgets_bytes))}
    return sorted(findings, key=lambda f: order[f.budget_bytes])


def search_backend(run: RunConfig) -> str:
    """``auto`` searches with ``simulate`` (cheap), whatever the machine; others as given."""
    return "simulate" if run.backend.name == "auto" else run.backend.name


# --------------------------------------------------------------------------- rows


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


def maxfit_rows(runs: Sequence[RunConfig], dimensions: Sequence[str], budgets_bytes: Sequence[int], *,
                search_cap: int = 65536, verify_on_cuda: bool = False,
                log: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """One row per method (``runs``, one RunConfig each) x dimension x budget.

    Everything that can fail on bad input is checked before the first probe: dimensions,
    budgets, each run's :func:`membench.runner.plan`, and a GPU when ``verify_on_cuda``.
    """
    check_dimensions(dimensions)
    check_budgets(budgets_bytes)
    check_positive("maxfit.search_cap", search_cap)
    if verify_on_cuda:
        cuda_available_or_raise()
    plans = [plan(run) for run in runs]
    stamp = provenance()
    rows = []
    for the_plan in plans:
        run = the_plan.run
        prober = Prober(the_plan, search_backend(run))
        cuda = Prober(the_plan, "cuda") if verify_on_cuda and prober.run.backend.name != "cuda" else None
        for dimension in dimensions:
            for finding in find_max_fit(run, dimension, budgets_bytes, search_cap=search_cap, prober=prober):
                row = _row(prober, finding, stamp)
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
        "verify_agrees": None,
        **{key: stamp.get(key) for key in COLUMNS[COLUMNS.index("torch"):]},
    }


def _progress_line(row: dict[str, Any]) -> str:
    return (f"  {row['model']} {row['method']} {row['dimension']} @ {budget_label(row['budget_bytes'])}: "
            f"{fit_text(row)} ({row['probes']} probes, {row['new_probes']} new)")


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", suffix=path.suffix, delete=False,
                                     newline="") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(handle.name, 0o666 & ~umask)  # a temp file is private; the result is an ordinary file
    os.replace(handle.name, path)


def write_maxfit(rows: list[dict[str, Any]], directory: str | Path, settings: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``rows`` to ``<stem>.json`` and ``<stem>.csv`` in ``directory``, each atomically.

    The stem names the model, precision and backend and hashes ``settings`` (the fixed
    configs, budgets, dimensions, cap), so the same search overwrites its own files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else {"model": "none", "precision": "none", "backend": "none"}
    stem = "--".join(["maxfit", str(first["model"]), str(first["precision"]), str(first["backend"]),
                      config_digest(settings)])
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    document = {"schema_version": SCHEMA_VERSION, "kind": KIND, "settings": settings, "rows": rows}
    _atomic_write(json_path, lambda handle: (json.dump(document, handle, indent=2), handle.write("\n")))
    frame = _typed(pd.DataFrame(rows, columns=COLUMNS))  # nullable integers: 512, not 512.0
    _atomic_write(csv_path, lambda handle: frame.to_csv(handle, index=False))
    return json_path, csv_path


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    for column in INT_COLUMNS:
        frame[column] = pd.array(
            [None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v) for v in frame[column]],
            dtype="Int64")
    return frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]


def load_maxfit(directory: str | Path) -> pd.DataFrame:
    """Every row of the ``*.json`` files ``membench-maxfit`` wrote to ``directory``.

    A file that is not valid JSON or not a maxfit file of this schema is skipped with a
    warning naming it. Integer columns use pandas' nullable ``Int64``.
    """
    rows = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            document = json.loads(path.read_text())
            if not isinstance(document, dict) or document.get("kind") != KIND:
                raise ValueError("not a membench-maxfit file")
            if document.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"schema_version {document.get('schema_version')!r}; expected {SCHEMA_VERSION}")
            if not isinstance(document.get("rows"), list) or not all(isinstance(r, dict) for r in document["rows"]):
                raise ValueError("'rows' is not a list of rows")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            warnings.warn(f"{path}: skipped, not a readable maxfit file: {error}", stacklevel=2)
            continue
        rows.extend(document["rows"])
    return _typed(pd.DataFrame(rows, columns=COLUMNS) if not rows else pd.DataFrame(rows))


# --------------------------------------------------------------------------- report text


def budget_label(nbytes: int) -> str:
    """``24 GiB`` for whole GiB, else two decimals in the largest unit (``1.91 MiB``)."""
    nbytes = int(nbytes)
    if nbytes % GiB == 0:
        return f"{nbytes // GiB} GiB"
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def fit_text(row: Any) -> str:
    """A row's answer in words: ``12``, ``none``, ``512 (the model's maximum)``, ..."""
    limited_by = row["limited_by"]
    if limited_by == "error":
        return "error"
    if _missing(row["max_fit"]):
        return "none"
    value = int(row["max_fit"])
    if limited_by == "model_max_length":
        return f"{value} (the model's maximum)"
    if limited_by == "search_cap":
        return f"at least {value} (search cap)"
    return str(value)


GROUP = ["model", "precision", "dimension", "fixed_batch_size", "fixed_seq_len", "target_len", "budget_bytes"]
NOUN = {"batch_size": "batch", "seq_len": "sequence length"}


def _ordered(group: pd.DataFrame) -> list:
    """lora_fa, then lora, then the other methods in file order: the report's comparison first."""
    methods = list(dict.fromkeys(group["method"]))
    first = [m for m in ("lora_fa", "lora") if m in methods]
    return [group[group["method"] == m].iloc[0] for m in first + [m for m in methods if m not in first]]


def _context(group: pd.DataFrame) -> str:
    row = group.iloc[0]
    parts = [str(row["model"]), str(row["precision"])]
    ranks = sorted({int(r) for r in group["rank"] if not _missing(r)})
    if ranks:
        parts.append("r=" + "/".join(map(str, ranks)))
    if row["dimension"] == "batch_size":
        parts.append(f"seq_len {int(row['fixed_seq_len'])}")
    else:
        parts.append(f"batch {int(row['fixed_batch_size'])}")
    if not _missing(row["target_len"]):
        parts.append(f"target_len {int(row['target_len'])}")
    return ", ".join(parts)


def _groups(df: pd.DataFrame):
    keys = df[GROUP].astype(object).where(df[GROUP].notna(), None)
    for _, index in keys.groupby(GROUP, dropna=False, sort=False).groups.items():
        yield df.loc[index]


def sentences(df: pd.DataFrame) -> list[str]:
    """One sentence per model x dimension x fixed setting x budget, e.g.
    ``on a 24 GiB card, lora_fa fits batch 12 where lora fits 7, full none (llama-7b, bf16, r=64, seq_len 512)``.
    """
    out = []
    if df.empty:
        return out
    df = df.sort_values(["model", "dimension", "budget_bytes"], kind="stable")
    for group in _groups(df):
        rows = _ordered(group)
        head, rest = rows[0], rows[1:]
        label = budget_label(head["budget_bytes"])
        card = f"on {'an' if label.startswith(('8', '11 ', '18 ')) else 'a'} {label} card"
        if rest and len({fit_text(r) for r in rows}) == 1:
            out.append(f"{card}, every method ({', '.join(r['method'] for r in rows)}) fits "
                       f"{NOUN[head['dimension']]} {fit_text(head)} ({_context(group)})")
            continue
        text = f"{card}, {head['method']} fits {NOUN[head['dimension']]} {fit_text(head)}"
        if rest:
            text += f" where {rest[0]['method']} fits {fit_text(rest[0])}"
            text += "".join(f", {r['method']} {fit_text(r)}" for r in rest[1:])
        out.append(f"{text} ({_context(group)})")
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A Markdown table: one line per model x dimension x fixed setting x budget, one column per method."""
    if df.empty:
        return "(no max-fit rows)"
    df = df.sort_values(["model", "dimension", "budget_bytes"], kind="stable")
    methods = list(dict.fromkeys(df["method"]))
    lines = ["| model | precision | LoRA rank | searched | held fixed | budget | " + " | ".join(methods) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(methods)]
    for group in _groups(df):
        row = group.iloc[0]
        fixed = (f"seq_len {int(row['fixed_seq_len'])}" if row["dimension"] == "batch_size"
                 else f"batch {int(row['fixed_batch_size'])}")
        cells = []
        for method in methods:
            match = group[group["method"] == method]
            if match.empty:
                cells.append("")
                continue
            cells.append(fit_text(match.iloc[0]))
        ranks = "/".join(str(r) for r in sorted({int(r) for r in group["rank"] if not _missing(r)})) or "—"
        lines.append(f"| {row['model']} | {row['precision']} | {ranks} | {row['dimension']} | {fixed} | "
                     f"{budget_label(row['budget_bytes'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def method_runs(methods: Sequence[str], overrides: Sequence[str], compose: Callable[..., DictConfig],
                available: Sequence[str]) -> list[RunConfig]:
    """One RunConfig per method name: the command line's overrides with ``method=<name>``.

    Adapter-only keys (``method.rank`` ...) are dropped for full fine-tuning, and
    ``method.lorafa_optimizer`` for methods other than LoRA-FA, so one command line serves all.
    """
    from membench.cli import to_run_config

    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ConfigError(f"maxfit.methods entry {unknown[0]!r} is not a method; "
                          f"choose from: {', '.join(sorted(available))}")
    rest = [o for o in overrides if _override_key(o) != "method" and not _override_key(o).startswith("maxfit.")]
    runs = []
    for name in dict.fromkeys(methods):
        kind = compose(config_name="maxfit", overrides=[o for o in rest if not _override_key(o).startswith("method.")]
                       + [f"method={name}"]).method.kind
        dropped = (ADAPTER_ONLY_KEYS if kind == "full" else ()) + (("method.lorafa_optimizer",) if kind != "lora_fa"
                                                                   else ())
        cfg = compose(config_name="maxfit",
                      overrides=[o for o in rest if _override_key(o) not in dropped] + [f"method={name}"])
        run = to_run_config(cfg)
        runs.append(RunConfig(**{f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)}))
    return runs


def run_maxfit(cfg: DictConfig, overrides: Sequence[str], compose: Callable[..., DictConfig],
               available_methods: Sequence[str], out=sys.stdout) -> tuple[list[dict[str, Any]], Path, Path]:
    """The whole command: validate, search every method, write the files, print the table."""
    from membench.cli import to_run_config

    settings: MaxFitConfig = to_run_config(cfg.maxfit)  # the maxfit section alone: method=... may not suit all
    budgets = settings.budgets()
    runs = method_runs(settings.methods, overrides, compose, available_methods)
    if settings.verify:
        cuda_available_or_raise()
    started = time.perf_counter()
    print(f"membench-maxfit: {runs[0].model.name}, methods {', '.join(r.method.name for r in runs)}; "
          f"budgets {', '.join(budget_label(b) for b in budgets)}; searching with {search_backend(runs[0])}",
          file=out, flush=True)
    rows = maxfit_rows(runs, settings.dimensions, budgets, search_cap=settings.search_cap,
                       verify_on_cuda=settings.verify, log=lambda line: print(line, file=out, flush=True))
    elapsed = time.perf_counter() - started
    recorded = {"runs": [dataclasses.asdict(r) for r in runs], "budgets_bytes": budgets,
                "dimensions": list(settings.dimensions), "search_cap": settings.search_cap,
                "verify": settings.verify}
    for run in recorded["runs"]:
        run.pop("results_dir")
        run.pop("force")
    json_path, csv_path = write_maxfit(rows, settings.output, recorded)
    frame = _typed(pd.DataFrame(rows))
    print("", markdown_table(frame), "", *sentences(frame), "", NOTE, sep="\n", file=out)
    total = sum(row["new_probes"] for row in rows)
    print(f"{total} probes in {elapsed:.0f} s; wrote {json_path} and {csv_path}", file=out, flush=True)
    return rows, json_path, csv_path


def main() -> None:
    """Entry point of ``membench-maxfit`` (a Hydra app on conf/maxfit.yaml)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from membench.backends.base import BusyDeviceError
    from membench.cli import CONF_DIR

    register_maxfit_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="maxfit")
    def app(cfg: DictConfig) -> None:
        overrides = list(HydraConfig.get().overrides.task)
        available = GlobalHydra.instance().config_loader().get_group_options("method")
        try:
            run_maxfit(cfg, overrides, hydra.compose, available)
        except ConfigError as error:
            print(f"membench-maxfit: error: {error}", file=sys.stderr)
            sys.exit(2)
        except BusyDeviceError as error:
            print(f"membench-maxfit: refusing to measure: {error}", file=sys.stderr)
            sys.exit(3)

    app()


if __name__ == "__main__":
    main()
