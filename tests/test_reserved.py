"""Reserved memory from the caching-allocator model (membench.reserved): process history, settings, OOM."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import tiny
from membench.backends import create_backend
from membench.backends.simulate import SimulateBackend
from membench.caching_allocator import AllocatorSettings
from membench.devices import DEVICES
from membench.errors import ConfigError
from membench.events import ALLOC, FREE, PHASE, WORKSPACE
from membench.plan import plan
from membench.reserved import categorize, process_history, replay_process, replay_reserved
from membench.runner import execute

MiB = 1 << 20
RESERVED_KEYS = ("peak_reserved_bytes", "fragmentation_bytes", "reserved_segments", "num_alloc_retries")


@pytest.mark.parametrize(("model", "method"), [("tiny-llama", "lora"), ("tiny-t5", "full")])
def test_simulate_gives_the_cpu_runs_reserved_memory(model, method):
    """cpu runs its warm-up steps for real; simulate primes the optimizer and the warm-up is synthesised.

    Workspaces are off in the simulated profile: the cpu backend has none (tests/test_simulate.py).
    """
    cpu = execute(plan(tiny(model, method, backend="cpu")))
    no_workspaces = dataclasses.replace(DEVICES["h100-80gb"], runtime_overhead_bytes=0)
    simulated = execute(plan(tiny(model, method, backend="simulate")), SimulateBackend(no_workspaces))
    assert cpu.status.state == simulated.status.state == "ok"
    assert cpu.metrics["peak_reserved_bytes"] > cpu.metrics["peak_allocated_bytes"] > 0
    for key in RESERVED_KEYS:
        assert simulated.metrics[key] == cpu.metrics[key], key
    # With the profile's two cuBLAS workspaces: one 32 MiB segment each, held for the whole process.
    with_workspaces = execute(plan(tiny(model, method, backend="simulate")))
    assert with_workspaces.metrics["peak_reserved_bytes"] == cpu.metrics["peak_reserved_bytes"] + 64 * MiB
    assert with_workspaces.metrics["reserved_segments"] == cpu.metrics["reserved_segments"] + 2


def test_primed_log_becomes_the_cuda_process_history():
    """Weights, then warm-up steps copied from the measured step, the first with the priming's optimizer state."""
    log = [(ALLOC, 1, 4 * MiB, None),  # a weight
           (ALLOC, -1, 32 * MiB, WORKSPACE), (ALLOC, -2, 32 * MiB, WORKSPACE),
           (ALLOC, 2, 4 * MiB, "zeros_like"),  # the priming's zero gradient, before its phase mark
           (PHASE, "optimizer_step", "optimizer priming"), (ALLOC, 3, 8 * MiB, "zeros_like"),  # AdamW state
           (ALLOC, 4, 4 * MiB, "add"), (FREE, 4), (FREE, 2),
           (PHASE, "forward", "measured step 1/1"), (ALLOC, 5, 6 * MiB, "mm"),
           (PHASE, "backward", "measured step 1/1"), (ALLOC, 6, 4 * MiB, "mm"), (FREE, 5),
           (PHASE, "optimizer_step", "measured step 1/1"), (ALLOC, 7, 4 * MiB, "add"), (FREE, 7), (FREE, 6),
           (PHASE, "done", "end of run"), (FREE, 1)]
    history = process_history(log, warmup_steps=2)
    labels = [e[2] for e in history if e[0] == PHASE]
    assert labels == ["warm-up step 1/2"] * 3 + ["warm-up step 2/2"] * 3 + ["measured step 1/1"] * 3
    first_step = history[1:history.index((PHASE, "forward", "warm-up step 2/2"))]
    assert first_step == [
        (PHASE, "forward", "warm-up step 1/2"), (ALLOC, -1, 32 * MiB, WORKSPACE),
        (ALLOC, (("warm-up", 0), 5), 6 * MiB, "mm"),
        (PHASE, "backward", "warm-up step 1/2"), (ALLOC, -2, 32 * MiB, WORKSPACE),
        (ALLOC, (("warm-up", 0), 6), 4 * MiB, "mm"), (FREE, (("warm-up", 0), 5)),
        (PHASE, "optimizer_step", "warm-up step 1/2"), (ALLOC, 3, 8 * MiB, "zeros_like"),
        (ALLOC, ("prime", 4), 4 * MiB, "add"), (FREE, ("prime", 4)), (FREE, (("warm-up", 0), 6))]
    assert history[0] == (ALLOC, 1, 4 * MiB, None) and (ALLOC, 2, 4 * MiB, "zeros_like") not in history
    categories = categorize(history)
    assert [categories[i] for i, e in enumerate(first_step, 1) if e[0] == ALLOC] == [
        "workspace", "activation", "workspace", "gradient", "optimizer state", "temporary"]
    figures, _, _ = replay_reserved(history)
    assert figures.peak_reserved_bytes > 0 and figures.num_alloc_retries == 0


def test_expandable_segments_reduce_fragmentation():
    """Buffers that grow step by step: each needs a bigger segment by default; one segment grows instead."""
    log = [(PHASE, "forward", "measured step 1/1")]
    for key, size in enumerate((30, 50, 70, 90, 110)):
        log.append((ALLOC, key, size * MiB, "empty"))
        if key:
            log.append((FREE, key - 1))
    default, _, _ = replay_reserved(log, AllocatorSettings.parse(""))
    expandable, _, _ = replay_reserved(log, AllocatorSettings.parse("expandable_segments:True"))
    assert default.peak_allocated_bytes == expandable.peak_allocated_bytes == 200 * MiB
    assert (default.peak_reserved_bytes, default.fragmentation_bytes, default.reserved_segments) == (350 * MiB, 150 * MiB, 5)
    assert (expandable.peak_reserved_bytes, expandable.fragmentation_bytes, expandable.reserved_segments) == (240 * MiB, 40 * MiB, 1)
    # A capacity between the two: the default allocator frees its cached segments and retries.
    squeezed, _, _ = replay_reserved(log, AllocatorSettings.parse(""), capacity_bytes=300 * MiB)
    assert squeezed.oom is None and squeezed.num_alloc_retries > 0


@pytest.mark.parametrize(("alloc_conf", "message"), [
    ("expandable_segment:True", "Supported keys: max_split_size_mb"),
    ("max_split_size_mb:abc", "Supported keys"),
    ("backend:cudaMallocAsync", "not modelled"),
])
def test_bad_alloc_conf_fails_before_any_model(alloc_conf, message):
    with pytest.raises(ConfigError, match=message):
        tiny("tiny-llama", "lora", f"backend.alloc_conf={alloc_conf}", backend="simulate")


def test_alloc_conf_reaches_the_model_and_the_result():
    run = tiny("tiny-llama", "lora", "backend.alloc_conf=expandable_segments:True", backend="simulate")
    result = execute(plan(run))
    assert result.env["alloc_conf"] == "expandable_segments:True"
    assert result.config["backend"]["alloc_conf"] == "expandable_segments:True"
    assert result.metrics["peak_reserved_bytes"] >= result.metrics["peak_allocated_bytes"]


def test_reserved_beyond_the_card_is_a_predicted_oom():
    small = dataclasses.replace(DEVICES["h100-80gb"], total_memory_bytes=80 * MiB, cuda_context_bytes=40 * MiB)
    backend = SimulateBackend(small)
    result = execute(plan(tiny("tiny-llama", "lora", backend="simulate")), backend)
    # 40 MiB of allocator room: the two 32 MiB cuBLAS workspaces alone need 64 MiB of segments.
    assert result.status.state == "oom"
    assert "predicted reserved memory runs out" in result.status.message
    assert result.metrics["peak_allocated_bytes"] < 80 * MiB  # by allocated bytes alone it would fit
    assert create_backend(tiny("tiny-llama", "lora", backend="simulate").backend).name == "simulate"


def test_runs_in_one_process_share_the_workspaces_and_release_their_segments():
    """gc.collect(); torch.cuda.empty_cache() between runs: only the cuBLAS workspaces carry over."""
    history = [(ALLOC, 1, 30 * MiB, None), (PHASE, "forward", "measured step 1/1"),
               (ALLOC, -1, 32 * MiB, WORKSPACE), (ALLOC, 2, 50 * MiB, "mm"), (FREE, 2)]
    first, second = replay_process([history, history])
    assert first.peak_reserved_bytes == second.peak_reserved_bytes == (30 + 32 + 50) * MiB
    # In address order (oldest first): the first run's weight segment was released, its workspace kept.
    assert first.segment_sizes == [30 * MiB, 32 * MiB, 50 * MiB]
    assert second.segment_sizes == [32 * MiB, 30 * MiB, 50 * MiB]


@pytest.mark.slow
def test_reserved_memory_matches_the_h100_in_the_process_it_was_measured_in():
    """The three H100 reserved figures, runs replayed in one modelled process: within 0.5%, nothing fitted."""
    from membench.reserved_reference import predict, reference_rows

    rows = predict(reference_rows())
    assert [row["case"] for row in rows] == [row["case"] for row in reference_rows()]
    for row in rows:
        assert row["predicted_peak_reserved_bytes"] >= row["predicted_peak_allocated_bytes"]
        assert abs(row["error"]) < 0.005, row
