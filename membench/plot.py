"""``membench-plot``: a memory timeline of a run's measured step, from the caching-allocator model.

    membench-plot results/runs/A.json [results/runs/B.json ...] [-o timeline.png]

Each result's configuration is run again with its allocation log recorded (on ``simulate``, or on
``cpu`` for a cpu result; a ``cuda`` result is simulated for the card it ran on), the log is replayed
through :mod:`membench.reserved`, and the measured step is drawn: live bytes stacked by category
(parameter, gradient, optimizer state, activation, temporary, workspace), the allocator's allocated and
reserved bytes as lines, the phases shaded. Several results are drawn side by side on one y-axis.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from membench.allocator import allocator_bytes
from membench.caching_allocator import AllocatorSettings
from membench.events import ALLOC, FREE, PHASE
from membench.reserved import CATEGORIES, capacity_for, categorize, process_history, replay_reserved
from membench.results import read_result
from membench.summary import describe_config

GIB = 1 << 30
MAX_POINTS = 4000  # events are pooled into at most this many windows (each keeps its highest point)
COLOURS = {"parameter": "#4c72b0", "gradient": "#dd8452", "optimizer state": "#55a868", "activation": "#c44e52",
           "temporary": "#8172b3", "workspace": "#937860"}
PHASE_COLOURS = {"forward": "#f2f2f2", "backward": "#e0e0e0", "optimizer_step": "#cfcfcf"}
PHASE_LABELS = {"forward": "forward", "backward": "backward", "optimizer_step": "optim."}


@dataclass
class Timeline:
    """One measured step, event by event (bytes); ``stacks[c][i]`` is category c's live bytes at point i."""

    title: str
    allocated: list[int]
    reserved: list[int]
    stacks: dict[str, list[int]]
    phases: list[tuple[str, int, int]]  # (phase, first point, last point)
    peak_allocated: int
    peak_reserved: int


def record_timeline(config: dict, title: str = "") -> Timeline:
    """Run ``config`` (a result's ``config``) with recording and build its measured step's timeline."""
    from membench.analytic.estimator import run_from_config
    from membench.backends import create_backend
    from membench.plan import plan
    from membench.runner import execute

    run = run_from_config(config)
    name = "cpu" if run.backend.name == "cpu" else "simulate"
    backend_config = dataclasses.replace(run.backend, name=name, memory_snapshot=False)
    if hasattr(backend_config, "trace"):
        backend_config = dataclasses.replace(backend_config, trace="off")  # the log needs a direct run
    run = dataclasses.replace(run, backend=backend_config)
    backend = create_backend(run.backend)
    events = backend.tracker.record()
    execute(plan(run), backend)
    history = process_history(events, run.workload.warmup_steps)
    figures, _, _ = replay_reserved(history, AllocatorSettings.parse(run.backend.alloc_conf or None),
                                    capacity_for(backend), timeline=True)
    return build_timeline(history, figures.timeline, title or describe_config(config))


def build_timeline(history: list[tuple], points: list[tuple[int, int, int]], title: str) -> Timeline:
    """The measured steps of ``history`` (``points`` from :func:`membench.reserved.replay_reserved`)."""
    categories = categorize(history)
    live_category: dict = {}
    live = dict.fromkeys(CATEGORIES, 0)
    start = next(i for i, e in enumerate(history) if e[0] == PHASE and e[2].startswith("measured"))
    window = max(1, (len(history) - start) // MAX_POINTS)
    allocated, reserved, phases = [], [], []
    stacks: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    best: Optional[tuple] = None
    by_index = {p[0]: p for p in points}
    count = 0
    for index, event in enumerate(history):
        if event[0] == ALLOC and event[1] not in live_category:
            category = categories.get(index, "temporary")
            live_category[event[1]] = (category, allocator_bytes(event[2]))
            live[category] += allocator_bytes(event[2])
        elif event[0] == FREE and event[1] in live_category:
            category, size = live_category.pop(event[1])
            live[category] -= size
        if index < start:
            continue
        if event[0] == PHASE:
            if phases:
                phases[-1] = (phases[-1][0], phases[-1][1], len(allocated))
            phases.append((event[1], len(allocated), len(allocated)))
        point = by_index.get(index)
        if point is None:
            break  # the replay stopped here (a modelled OOM)
        if best is None or point[1] > best[0][1]:
            best = (point, dict(live))
        count += 1
        if count % window == 0:
            allocated.append(best[0][1])
            reserved.append(best[0][2])
            for category in CATEGORIES:
                stacks[category].append(best[1][category])
            best = None
    if best is not None:
        allocated.append(best[0][1])
        reserved.append(best[0][2])
        for category in CATEGORIES:
            stacks[category].append(best[1][category])
    if phases:
        phases[-1] = (phases[-1][0], phases[-1][1], len(allocated))
    return Timeline(title, allocated, reserved, stacks, phases, max(allocated, default=0), max(reserved, default=0))


def draw(timelines: Sequence[Timeline], path: Path) -> Path:
    """Side-by-side panels, one per timeline, sharing the y-axis (GiB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(timelines), figsize=(6.5 * len(timelines), 4.8), sharey=True, squeeze=False)
    for axis, timeline in zip(axes[0], timelines):
        x = list(range(len(timeline.allocated)))
        for phase, first, last in timeline.phases:
            axis.axvspan(first, max(first, last - 1), color=PHASE_COLOURS.get(phase, "#f8f8f8"), zorder=0)
            axis.text((first + last) / 2, 0.01, PHASE_LABELS.get(phase, phase), transform=axis.get_xaxis_transform(),
                      ha="center", va="bottom", fontsize=8, color="#555555")
        axis.stackplot(x, *[[v / GIB for v in timeline.stacks[c]] for c in CATEGORIES],
                       labels=CATEGORIES, colors=[COLOURS[c] for c in CATEGORIES], alpha=0.85, zorder=1)
        axis.plot(x, [v / GIB for v in timeline.allocated], color="black", linewidth=1.0, label="allocated", zorder=2)
        axis.plot(x, [v / GIB for v in timeline.reserved], color="#d62728", linestyle="--", linewidth=1.4,
                  label="reserved", zorder=3)
        axis.set_title(f"{timeline.title}\npeak {timeline.peak_allocated / GIB:.2f} GiB allocated, "
                       f"{timeline.peak_reserved / GIB:.2f} GiB reserved", fontsize=9)
        axis.set_xlabel("allocator events of the measured step (pooled)")
        axis.set_xlim(0, max(1, len(x) - 1))
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("GiB")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles[::-1], labels[::-1], loc="center right", fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 0.86, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="membench-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="result JSON files (drawn side by side)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="PNG to write (default: beside the first result, <stem>.timeline.png)")
    args = parser.parse_args(argv)
    timelines = [record_timeline(read_result(path).config) for path in args.results]
    output = args.output or args.results[0].with_name(args.results[0].stem + ".timeline.png")
    print(draw(timelines, output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
