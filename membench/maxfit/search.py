"""The search for the largest value that fits each budget: extrapolation with bisection / doubling fallbacks.

See :mod:`membench.maxfit` for the method; :func:`find_max_fit` is the entry point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from membench.config import RunConfig, check_positive
from membench.maxfit.config import check_budgets, check_dimensions
from membench.maxfit.probe import Probe, Prober
from membench.models import max_sequence_length
from membench.plan import plan

LIMITS = ("memory", "model_max_length", "search_cap", "error")


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
                    if p.fits(budget) is not None and (p.state == "ok" or p.backend == "simulate") and p.complete)
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
                limit: int, limit_reason: str, degree: int,
                first: int = 1) -> tuple[Optional[int], str, Optional[str]]:
    """Largest value in [1, limit] that fits ``budget``: (value or None, limited_by, error).

    The search starts at ``first`` (1, or 2 on traces, which do not hold size 1); below it,
    only when ``first`` does not fit, it probes 1.
    """

    def get(x: int) -> Optional[Probe]:
        points[x] = probe(x)
        return points[x] if points[x].state == "error" else None

    first = max(1, min(first, limit))
    for x in dict.fromkeys((first, min(max(start, first), limit))):  # two points to fit a line through
        failed = get(x)
        if failed:
            return None, "error", f"{failed.value}: {failed.message}"
        if x == first and not points[first].fits(budget):
            if first == 1:
                return None, "memory", None
            failed = get(1)
            if failed:
                return None, "error", f"{failed.value}: {failed.message}"
            return (1, "memory", None) if points[1].fits(budget) else (None, "memory", None)
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
    ``simulate``. Pass a shared ``prober`` (built from :func:`membench.plan.plan`) to reuse
    probes across calls.

    Raises:
        ConfigError: unknown dimension, a budget that is not a positive number, or a run
            that fails :func:`membench.plan.plan` (before any probe).
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
                                               limit, reason, degree, prober.first)
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
