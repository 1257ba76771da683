"""Proof on real processes: each rank of a real FSDP2 run over gloo allocates what simulate predicts for it.

The ``cpu`` backend starts one process per rank (:mod:`membench.parallel.launch`): real tensors,
real collectives, the same allocator model. Simulation plays the same rank on the fake process
group with fake tensors. One stated difference, reported and left out of the count: gloo's
reduce-scatter reduces a full-size copy of its input made on gloo's own thread (NCCL reduces in
place), ``env.ranks[i].gloo_buffer_bytes``.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from conftest import tiny
from membench.backends import create_backend
from membench.plan import plan
from membench.runner import execute, measure
from test_simulate import without_overhead


def simulated_rank(method: str, world_size: int, rank: int) -> dict:
    run = tiny("tiny-llama", method, "parallel.strategy=fsdp2", f"parallel.world_size={world_size}",
               "backend.trace=off", backend="simulate")
    backend = create_backend(run.backend)
    backend.rank = rank
    result = execute(plan(run), backend)
    assert result.status.state == "ok", result.status
    return result.metrics


def _differences(real: list, method: str, world_size: int) -> list[str]:
    wrong = []
    for rank, result in enumerate(real):
        assert result.status.state == "ok", (rank, result.status)
        simulated = simulated_rank(method, world_size, rank)
        if without_overhead(simulated) != without_overhead(result.metrics):
            wrong.append(f"rank {rank}: {without_overhead(result.metrics)} != {without_overhead(simulated)}")
        wrong += [f"rank {rank}: {key}" for key in ("sharded_weight_bytes", "shard_padding_bytes",
                                                    "gathered_param_peak_bytes")
                  if simulated[key] != result.metrics[key]]
    return wrong


@pytest.mark.parametrize(("method", "world_size"), [("full", 2), ("lora", 4)])
def test_every_rank_allocates_what_simulate_predicts_for_it(method, world_size):
    """Byte for byte. One retry, for a stated race: gloo's worker thread holds a reduce-scatter's input until
    it lets go of the finished work, and if it lets go late, that buffer is still live at the next block's
    backward peak (seen once in six torchrun launches, never in sixteen of these; simulation, where
    collectives do nothing, frees it at once). A difference in both attempts fails."""
    from membench.parallel.launch import measure_ranks

    run = tiny("tiny-llama", method, "parallel.strategy=fsdp2", f"parallel.world_size={world_size}")
    real = measure_ranks(run)
    assert len(real) == world_size and not dist.is_initialized()
    if _differences(real, method, world_size):
        real = measure_ranks(run)
    assert _differences(real, method, world_size) == []
    if method == "full":  # gradients of every group are reduce-scattered: gloo stages them
        assert all(result.env["gloo_buffer_bytes"] > 0 for result in real)


def test_a_cpu_run_records_every_rank_and_its_headline_is_the_maximum():
    result = measure(tiny("tiny-llama", "full", "parallel.strategy=fsdp2", "parallel.world_size=2"))
    assert result.status.state == "ok"
    ranks = result.env["ranks"]
    assert [entry["rank"] for entry in ranks] == [0, 1]
    assert result.metrics["peak_allocated_bytes"] == max(entry["peak_allocated_bytes"] for entry in ranks)


def test_ddp_over_gloo_holds_one_gradient_bucket_beside_everything_one_gpu_holds():
    """DDP replicates the model and adds its gradient buckets, allocated by DDP's own C++ Reducer.

    tiny-llama's gradients (about 0.8 MB) fit DDP's first bucket (1 MiB by default), so the buckets are
    one flat storage of every trainable parameter's bytes, and every other figure is one GPU's.
    """
    from membench.allocator import allocator_bytes

    one = measure(tiny("tiny-llama", "full"))
    ddp = measure(tiny("tiny-llama", "full", "parallel.strategy=ddp", "parallel.world_size=2"))
    assert one.status.state == ddp.status.state == "ok", ddp.status
    for key in ("weight_bytes", "gradient_bytes", "optimizer_state_bytes", "saved_tensor_bytes"):
        assert ddp.metrics[key] == one.metrics[key], key
    # Once in many loaded suite runs, the real DDP rank held one more 512-byte block through the measured forward
    # (activation_bytes 470528 against 470016): an allocation of DDP or gloo whose timing varies between runs, not
    # identified yet. One allocator block is allowed for it; anything more fails.
    extra = ddp.metrics["activation_bytes"] - one.metrics["activation_bytes"]
    assert extra in (0, 512), extra
    bucket = allocator_bytes(ddp.metrics["sharded_weight_bytes"])  # DDP shards nothing: every parameter's bytes
    assert ddp.metrics["peak_allocated_bytes"] - one.metrics["peak_allocated_bytes"] - bucket in (0, extra)
    assert [entry["state"] for entry in ddp.env["ranks"]] == ["ok", "ok"]
