"""The recorded allocation log replays to the run's own figures, byte for byte."""

from __future__ import annotations

import pytest

from conftest import tiny
from membench.backends import create_backend
from membench.events import ALLOC, FREE, PHASE, WORKSPACE, replay
from membench.plan import plan
from membench.runner import execute


def recorded_run(model: str, method: str, backend: str):
    run = tiny(model, method, backend=backend)
    the_backend = create_backend(run.backend)
    events = the_backend.tracker.record()
    return execute(plan(run), the_backend), events


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
@pytest.mark.parametrize(("model", "method"), [("tiny-llama", "lora"), ("tiny-t5", "full"),
                                               ("tiny-roberta", "lora_fa_recompute")])
def test_replay_gives_the_runs_peaks(model, method, backend):
    result, events = recorded_run(model, method, backend)
    assert result.status.state == "ok"
    replayed = replay(events)
    metrics = result.metrics
    assert replayed.phase_peaks("measured") == metrics["phase_peak_bytes"]
    assert max(replayed.phase_peaks("measured").values()) == metrics["peak_allocated_bytes"]
    measured = [p for p in replayed.phases if p.label.startswith("measured")]
    assert [p.phase for p in measured] == ["forward", "backward", "optimizer_step"]
    for phase in measured:
        assert phase.allocated_after == metrics["phase_allocated_bytes"][phase.phase]


def test_log_holds_workspaces_frees_and_phase_marks():
    result, events = recorded_run("tiny-llama", "lora_fa", "simulate")
    kinds = {event[0] for event in events}
    assert kinds == {ALLOC, FREE, PHASE}
    workspaces = [event for event in events if event[0] == ALLOC and event[3] == WORKSPACE]
    assert sum(event[2] for event in workspaces) == result.metrics["runtime_overhead_bytes"] > 0
    freed = {event[1] for event in events if event[0] == FREE}
    assert not any(event[1] in freed for event in workspaces)  # workspaces live for the whole process
    labels = [event[2] for event in events if event[0] == PHASE]
    assert labels[0] == "optimizer priming" and labels[-2:] == ["measured step 1/1", "end of run"]


def test_replay_of_a_hand_made_log():
    log = [(ALLOC, 1, 100, None), (PHASE, "forward", "measured step 1/1"), (ALLOC, 2, 1000, None),
           (FREE, 2), (ALLOC, 3, 513, None), (PHASE, "backward", "measured step 1/1"), (FREE, 1)]
    replayed = replay(log)
    # 100 -> 512; 1000 -> 1024; 513 -> 1024 (rounded up to 512 B each)
    assert replayed.peak == 512 + 1024
    assert [(p.phase, p.peak, p.allocated_after) for p in replayed.phases] == [
        ("forward", 512 + 1024, 512 + 1024), ("backward", 512 + 1024, 1024)]
    assert replayed.allocated == 1024
