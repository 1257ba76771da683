"""Data parallelism (parallel.*): per-rank figures of torch's own FSDP2, simulated in one process.

The fake process group lets one process play rank 0 of any world size. The ``cpu`` backend runs
the same FSDP2 code for real (here in one process on the fake group, whose collectives return
without communicating: the memory a rank allocates does not depend on what the others send);
tests/test_parallel_processes.py runs it over gloo with one process per rank.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from conftest import run_config, tiny
from membench.errors import ConfigError
from membench.identity import recorded_config, result_id
from membench.plan import plan
from membench.runner import execute, measure
from membench.summary import summarize
from test_simulate import assert_simulate_equals_cpu

FSDP = ("parallel.strategy=fsdp2",)


def fsdp(world_size: int, *extra: str, method: str = "full", backend: str = "simulate"):
    return tiny("tiny-llama", method, *FSDP, f"parallel.world_size={world_size}", *extra, backend=backend)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["parallel.world_size=4"], "parallel.world_size=4 needs a parallel strategy"),
        (["parallel.strategy=zero3"], "parallel.strategy='zero3' is not supported; choose one of: none, ddp, fsdp2"),
        ([*FSDP, "parallel.world_size=0"], "parallel.world_size=0 must be an integer from 1 to 1024"),
        ([*FSDP, "parallel.world_size=1025"], "parallel.world_size=1025 must be an integer from 1 to 1024"),
        ([*FSDP, "parallel.world_size=4", "parallel.reshard_after_forward=3"],
         "parallel.reshard_after_forward=3 must be true, false or an integer that divides parallel.world_size=4"),
        ([*FSDP, "parallel.param_dtype=fp8"], "parallel.param_dtype='fp8' is not supported; choose one of: fp32"),
        (["parallel.strategy=ddp", "parallel.world_size=2", "parallel.cpu_offload=true"],
         "parallel.cpu_offload=True is an FSDP2 option; it has no effect with parallel.strategy=ddp"),
        ([*FSDP, "parallel.bucket_cap_mb=50"], "parallel.bucket_cap_mb=50.0 is a DDP option"),
        ([*FSDP, "parallel.param_dtype=fp32", "train.precision=bf16"],
         "parallel.param_dtype=fp32 contradicts train.precision=bf16"),
        ([*FSDP, "parallel.param_dtype=fp16", "train.precision=bf16"], "use parallel.param_dtype=bf16 or null"),
    ],
)
def test_bad_parallel_values_are_named(overrides, expected):
    with pytest.raises(ConfigError) as error:
        run_config("model=tiny-llama", *overrides)
    assert expected in str(error.value)


def test_one_gpu_keeps_its_run_id_and_a_parallel_run_gets_its_own():
    """parallel.* was added after identity version 1: at its defaults it is recorded but not hashed."""
    run = tiny("tiny-llama", "lora_fa", backend="simulate")
    explicit = tiny("tiny-llama", "lora_fa", "parallel.strategy=none", "parallel.world_size=1", backend="simulate")
    assert recorded_config(run, "simulate")["parallel"]["strategy"] == "none"
    assert result_id(explicit) == result_id(run)
    ids = {result_id(run), result_id(fsdp(4, method="lora_fa")), result_id(fsdp(8, method="lora_fa")),
           result_id(fsdp(1, method="lora_fa"))}
    assert len(ids) == 4


@pytest.mark.parametrize("world_size", [4, 3])
def test_fsdp2_shards_weights_exactly_one_world_size_th_apart_from_reported_padding(world_size):
    """Done-means of issue 12: sharded weights are 1/W of world size 1's, to the byte, apart from padding.

    tiny-llama's dim 0s (1000, 128, 64, 32) divide by 4, so W=4 pads nothing; W=3 pads the
    embedding (1000 rows) and more, and the result reports it.
    """
    whole = measure(fsdp(1))
    sharded = measure(fsdp(world_size))
    assert whole.status.state == sharded.status.state == "ok"
    one, many = whole.metrics, sharded.metrics
    assert one["shard_padding_bytes"] == 0 and many["world_size"] == world_size
    assert world_size * many["sharded_weight_bytes"] == one["sharded_weight_bytes"] + many["shard_padding_bytes"]
    assert (many["shard_padding_bytes"] == 0) == (world_size == 4)
    # Gradients and AdamW's two states are sharded the same way (each storage rounded to 512 B).
    assert many["gradient_bytes"] < one["gradient_bytes"] / world_size + 512 * 30
    assert many["optimizer_state_bytes"] < one["optimizer_state_bytes"] / world_size + 2 * 512 * 30
    # Gathered weights are neither weights nor activations: activations do not change with W.
    assert many["activation_bytes"] == one["activation_bytes"]
    assert many["saved_tensor_bytes"] == one["saved_tensor_bytes"]
    assert 0 < many["gathered_param_peak_bytes"] <= one["sharded_weight_bytes"] + many["shard_padding_bytes"]
    line = summarize(sharded)
    assert f"fsdp2x{world_size}" in line and "per GPU" in line and "per GPU" not in summarize(whole)


def test_one_gpu_holds_every_weight_and_gathers_nothing():
    metrics = measure(tiny("tiny-llama", "lora", backend="simulate")).metrics
    assert metrics["world_size"] == 1 and metrics["shard_padding_bytes"] == 0
    assert metrics["gathered_param_peak_bytes"] is None
    # Exact bytes; weight_bytes rounds each storage up to 512 B (and also counts buffers).
    assert metrics["sharded_weight_bytes"] <= metrics["weight_bytes"] < metrics["sharded_weight_bytes"] + 512 * 40


# LoRA is covered by lora_recompute (LoRA plus recompute); each case costs seconds on a 2-core CI machine.
@pytest.mark.parametrize(("method", "extra"), [("full", ()), ("lora_fa", ("train.precision=bf16",)),
                                                ("lora_recompute", ()),
                                                ("full", ("parallel.reshard_after_forward=false",)),
                                                ("full", ("parallel.reshard_after_forward=2",)),
                                                ("full", ("parallel.wrap_embeddings=true",)),
                                                ("full", ("parallel.param_dtype=bf16", "parallel.reduce_dtype=fp32"))])
def test_fsdp2_simulation_equals_real_execution_of_the_same_rank(method, extra):
    """simulate (fake tensors) == cpu (real tensors), both as rank 0 of 4 on the fake process group."""
    real = execute(plan(fsdp(4, *extra, method=method, backend="cpu")))  # in this process, on the fake group
    simulated = measure(fsdp(4, *extra, method=method))
    assert_simulate_equals_cpu(real, simulated)
    for key in ("sharded_weight_bytes", "shard_padding_bytes", "gathered_param_peak_bytes"):
        assert simulated.metrics[key] == real.metrics[key], key


@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5"])
def test_fsdp2_shards_every_family_and_simulation_still_equals_real_execution(model):
    """Blocks are found by structure (RoBERTa's encoder.layer, T5's encoder.block and decoder.block); a real
    model built on meta gets real buffers (RoBERTa's position ids) from transformers' own initialisation."""
    args = (model, "lora_fa", *FSDP, "parallel.world_size=2")
    real = execute(plan(tiny(*args, backend="cpu")))
    simulated = measure(tiny(*args, backend="simulate"))
    assert_simulate_equals_cpu(real, simulated)


def test_the_process_group_never_outlives_a_run(monkeypatch):
    measure(fsdp(2))
    assert not dist.is_initialized()
    import membench.runner

    def boom(*args, **kwargs):
        raise RuntimeError("inside the model")

    monkeypatch.setattr(membench.runner, "MeasuredLoop", boom)
    failed = measure(fsdp(2))
    assert failed.status.state == "error" and not dist.is_initialized()
    monkeypatch.undo()
    assert measure(fsdp(2)).status.state == "ok"  # and the next run starts a fresh one


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=tiny-llama", "parallel.strategy=ddp", "parallel.world_size=2", "backend.name=simulate"],
         "parallel.strategy=ddp cannot be simulated: DDP's C++ Reducer reads every parameter's data"),
        (["model=llama-3.1-70b", "train.precision=bf16", "parallel.strategy=ddp", "parallel.world_size=8",
          "backend.name=simulate"], "its weights alone (131.4 GiB) exceed one GPU's 79.6 GiB; use parallel.strategy=fsdp2"),
        (["model=tiny-llama", "parallel.strategy=ddp", "parallel.world_size=2", "backend.name=cpu",
          "workload.warmup_steps=1"], "parallel.strategy=ddp needs workload.warmup_steps >= 2, not 1"),
        (["model=tiny-llama", *FSDP, "parallel.world_size=2", "workload.warmup_steps=0"],
         "parallel.strategy=fsdp2 needs workload.warmup_steps >= 1, not 0"),
        (["model=tiny-llama", *FSDP, "parallel.world_size=2", "parallel.cpu_offload=true", "backend.name=simulate"],
         "parallel.cpu_offload=true needs backend.name=cuda: FSDP2's CPUOffloadPolicy pins host memory"),
    ],
)
def test_parallel_runs_that_cannot_be_measured_fail_before_any_model_is_built(monkeypatch, overrides, expected):
    import membench.runner

    def no_backend(*args, **kwargs):
        raise AssertionError("a backend was created before validation finished")

    monkeypatch.setattr(membench.runner, "create_backend", no_backend)
    with pytest.raises(ConfigError) as error:
        measure(run_config(*overrides))
    assert expected in str(error.value)


def test_an_fsdp2_the_installed_torch_lacks_is_a_config_error(monkeypatch):
    import torch.distributed.fsdp as torch_fsdp

    monkeypatch.setattr(torch_fsdp, "fully_shard", lambda module, *, mesh=None: module)
    with pytest.raises(ConfigError, match="parallel.strategy=fsdp2 cannot run with the installed torch: torch .* has "
                                          r"fully_shard\(module, mesh\) without reshard_after_forward"):
        plan(fsdp(2))


def test_maxfit_and_fit_settings_of_one_gpu_runs_keep_their_layout():
    """membench-maxfit and membench-fit name their files by hashing the runs' settings: the parallel section
    enters them only when set, so one-GPU searches keep their file names."""
    from membench.identity import settings_record

    one = settings_record(tiny("tiny-llama", "lora_fa", backend="simulate"))
    assert set(one) == {"model", "method", "workload", "train", "backend"}
    assert settings_record(fsdp(2))["parallel"]["world_size"] == 2


@pytest.mark.parametrize("override, match", [
    ("method=qlora", "model.quantization=nf4 with parallel.strategy=fsdp2 is not modelled"),
    ("train.optimizer=adamw_8bit", "train.optimizer=adamw_8bit cannot step FSDP2's sharded parameters"),
    ("train.optimizer=adafactor", "train.optimizer=adafactor cannot step FSDP2's sharded parameters"),
])
def test_fsdp2_with_a_quantised_base_or_an_optimizer_it_breaks_is_refused_before_building(override, match):
    from membench.plan import plan

    with pytest.raises(ConfigError, match=match):
        plan(run_config("model=tiny-llama", "method=lora", override, "parallel.strategy=fsdp2",
                        "parallel.world_size=2", "backend.name=simulate"))


def test_report_shows_per_gpu_peak_by_world_size_and_the_fewest_gpus(tmp_path):
    """membench-report on FSDP2 runs: scale.md lists each world size's per-GPU peak, the figure is written."""
    from membench.report.cli import build_report
    from membench.results import write_result

    runs = tmp_path / "runs"
    peaks = {}
    for size in (2, 4):
        result = measure(tiny("tiny-llama", "full", "parallel.strategy=fsdp2", f"parallel.world_size={size}",
                              backend="simulate"))
        write_result(result, runs)
        peaks[size] = result.metrics["peak_allocated_bytes"]
    assert peaks[4] < peaks[2]  # a quarter of the weights, gradients and optimizer state instead of a half
    written, _ = build_report([runs], tmp_path / "report")
    table = (tmp_path / "report" / "scale.md").read_text()
    assert f"{peaks[2] / (1 << 30):.1f}" in table and "2 GPUs" in table and "4 GPUs" in table
    assert "fewest (NVIDIA H100 80GB HBM3)" in table and "| ≤ 2 |" in table  # a tiny model fits on the fewest run
    assert tmp_path / "report" / "figures" / "peak_vs_world_size.png" in written
    # LoRA and LoRA-FA at two world sizes: each world size is its own workload (attribution picked one per
    # workload and failed when two runs shared it)
    for size in (2, 4):
        for method in ("lora", "lora_fa"):
            write_result(measure(tiny("tiny-llama", method, "parallel.strategy=fsdp2", f"parallel.world_size={size}",
                                      backend="simulate")), runs)
    build_report([runs], tmp_path / "report")
    assert "## tiny-llama: tiny-llama r=8 bs=2 seq=16 fp32 fsdp2x" in (tmp_path / "report" / "attribution.md").read_text()
