"""The printed line: units chosen for reading, status first when a run did not finish."""

from __future__ import annotations

from membench.results import Result, Status
from membench.summary import display_unit, summarize

CONFIG = {
    "model": {"name": "llama-7b"},
    "method": {"name": "lora_fa", "kind": "lora_fa", "rank": 64},
    "workload": {"batch_size": 16, "seq_len": 512},
    "train": {"precision": "bf16"},
}
METRICS = {"weight_bytes": 3 << 30, "gradient_bytes": 1 << 29, "optimizer_state_bytes": 1 << 30,
           "activation_bytes": 5 << 30, "saved_tensor_bytes": 4 << 30, "peak_allocated_bytes": 10 << 30,
           "step_time_s": 0.25}
ENV = {"backend": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}


def test_display_unit():
    assert display_unit(3 << 30) == ("GiB", 1 << 30)
    assert display_unit(5 << 20) == ("MiB", 1 << 20)
    assert display_unit(100) == ("KiB", 1 << 10)
    assert display_unit(None) == ("KiB", 1 << 10)


def test_ok_line():
    line = summarize(Result("id", CONFIG, Status(), METRICS, ENV))
    assert line == ("llama-7b lora_fa r=64 bs=16 seq=512 bf16 [cuda: NVIDIA H100 80GB HBM3] → peak 10.00 GiB "
                    "(weights 3.00 + grads 0.50 + optimizer 1.00 + activations 5.00; saved for backward 4.00), "
                    "250 ms/step")


def test_oom_and_error_lines():
    oom = summarize(Result("id", CONFIG, Status("oom", "backward", "CUDA out of memory.\nmore"), METRICS, ENV))
    assert "→ OOM in backward: CUDA out of memory.;" in oom and "more" not in oom
    error = summarize(Result("id", CONFIG, Status("error", "build", "ValueError: bad"), METRICS, ENV))
    assert error.endswith("→ ERROR in build: ValueError: bad")


def test_reserved_line_shows_both_figures_and_the_margin():
    metrics = {**METRICS, "peak_reserved_bytes": 12 << 30}
    env = {**ENV, "backend": "simulate", "device_total_memory_bytes": 80 << 30, "cuda_context_bytes": 1 << 29}
    line = summarize(Result("id", CONFIG, Status(), metrics, env))
    assert "→ peak 10.00 GiB allocated, 12.00 GiB reserved (80.0 GiB card: fits, 67.5 GiB spare) (weights" in line
    tight = summarize(Result("id", CONFIG, Status(), {**metrics, "peak_reserved_bytes": 80 << 30}, env))
    assert "80.00 GiB reserved (80.0 GiB card: does not fit, 0.5 GiB short)" in tight
    cpu = summarize(Result("id", CONFIG, Status(), metrics, {**ENV, "device_total_memory_bytes": None}))
    assert "peak 10.00 GiB allocated, 12.00 GiB reserved (weights" in cpu
    # An OOM's reserved peak stops where the allocator failed: no "fits" verdict after "OOM".
    oom = summarize(Result("id", CONFIG, Status("oom", "forward", "predicted reserved memory runs out"), metrics, env))
    assert "→ OOM in forward: predicted reserved memory runs out; peak 10.00 GiB allocated, 12.00 GiB reserved " \
           "(80.0 GiB card) (weights" in oom and "fits" not in oom


def test_ctx_kept_bytes_are_named_beside_the_saved_ones():
    metrics = {**METRICS, "ctx_kept_bytes_by_function": {"MatMul8bitLtBackward": 1 << 30}}
    line = summarize(Result("id", CONFIG, Status(), metrics, ENV))
    assert "saved for backward 4.00 + kept by autograd functions' ctx 1.00)" in line


def test_a_paged_optimizer_shows_its_managed_memory_beside_the_peak():
    config = {**CONFIG, "train": {"precision": "bf16", "optimizer": "paged_adamw_8bit"}}
    line = summarize(Result("id", config, Status(), {**METRICS, "paged_optimizer_state_bytes": 1 << 29}, ENV))
    assert line.startswith("llama-7b lora_fa r=64 bs=16 seq=512 bf16 paged_adamw_8bit [cuda")
    assert ("optimizer 1.00 + activations 5.00; paged optimizer state 0.50 in managed memory, outside the peak; "
            "saved for backward 4.00") in line
    assert "paged" not in summarize(Result("id", CONFIG, Status(), {**METRICS, "paged_optimizer_state_bytes": 0}, ENV))
