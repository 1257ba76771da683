"""The simulation equals real execution, byte for byte.

``simulate`` runs the model on fake tensors; ``cpu`` runs the same code for
real. Both count with the same allocator model, so every figure must agree.
The one stated difference: simulate adds the modelled GPU's cuBLAS workspaces
(``runtime_overhead_bytes``) to the live bytes from the first step on, which
real CPU execution does not have.

The cpu runs take two real warm-up steps; simulate replaces warm-up with one
optimizer step on zero gradients (SimulateBackend.primes_optimizer). Equality
here is what shows that shortcut reaches the same steady state.
"""

from __future__ import annotations

import pytest

from conftest import TINY_MODELS, tiny
from membench.allocator import allocator_bytes
from membench.devices import DEVICES
from membench.runner import measure

BYTE_FIGURES = ("weight_bytes", "optimizer_state_bytes", "gradient_bytes", "activation_bytes", "saved_tensor_bytes",
                "total_params", "trainable_params")

CASES = [
    ("full", ()),
    ("lora", ()),
    ("lora_fa", ()),
    ("lora_recompute", ()),
    ("lora_fa", ("method.lora_dropout=0.1",)),
    ("lora", ("train.precision=bf16",)),
    ("lora_fa", ("train.precision=bf16", "method.adapter_dtype=base")),
    ("lora", ("train.precision=bf16-autocast",)),
    ("full", ("train.optimizer_impl=fused",)),
    ("lora", ("model.attn_implementation=eager",)),
    ("lora", ("workload.batch_size=1",)),  # size-1 dimensions: views and broadcasts where bs=2 copies
    ("full", ("train.precision=fp16",)),
    ("lora_fa", ("method.lorafa_optimizer=true",)),  # PEFT's LoRA-FA AdamW (its own step temporaries)
    ("full", ("train.optimizer_impl=for_loop",)),  # one parameter at a time: other step temporaries than foreach
    # CudaSemantics' LayerNorm, autocast softmax and padded efficient log-sum-exp (tests/test_cuda_semantics.py)
    ("full", ("train.precision=bf16", "model.attn_implementation=eager")),  # bf16 LayerNorm statistics in fp32
    ("lora", ("train.precision=bf16-autocast", "model.attn_implementation=eager")),  # fp32 eager softmax
    ("full", ("workload.seq_len=20",)),  # fp32 SDPA: the efficient kernel, 20 query rows padded to 32
]


def without_overhead(metrics: dict) -> dict:
    """The figures with the modelled cuBLAS workspaces taken out (they exist from the first step on)."""
    overhead = metrics["runtime_overhead_bytes"]
    return {
        "peak_allocated_bytes": metrics["peak_allocated_bytes"] - overhead,
        "phase_peak_bytes": {k: v - overhead for k, v in metrics["phase_peak_bytes"].items()},
        "phase_allocated_bytes": {k: v - (0 if k == "model_ready" else overhead)
                                  for k, v in metrics["phase_allocated_bytes"].items()},
        **{key: metrics[key] for key in BYTE_FIGURES},
    }


def assert_simulate_equals_cpu(real, simulated) -> None:
    """Both results ran to the end and agree on every figure but the modelled cuBLAS workspaces."""
    assert real.status.state == simulated.status.state == "ok", (real.status, simulated.status)
    assert without_overhead(simulated.metrics) == without_overhead(real.metrics)


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize(("method", "extra"), CASES, ids=lambda case: "-".join(case) if isinstance(case, tuple) else case)
def test_simulate_equals_cpu(model, method, extra):
    real = measure(tiny(model, method, *extra, backend="cpu"))
    simulated_run = tiny(model, method, *extra, backend="simulate")
    simulated = measure(simulated_run)
    assert_simulate_equals_cpu(real, simulated)
    assert real.metrics["runtime_overhead_bytes"] == 0
    assert simulated.metrics["runtime_overhead_bytes"] == DEVICES[simulated_run.backend.device].runtime_overhead_bytes


def test_simulate_runs_no_real_memory():
    result = measure(tiny("tiny-llama", "lora", backend="simulate"))
    assert result.env["backend"] == "simulate"
    assert result.env["device_name"] == "NVIDIA H100 80GB HBM3"
    assert result.metrics["step_time_s"] is None  # fake tensors time nothing real


def test_cuda_semantics_is_what_makes_cpu_match_cuda():
    """Without it, CPU dropout keeps a float mask where CUDA keeps a bool one: (4 - 1) bytes more per element.

    tiny-roberta, LoRA-FA, eager attention (no SDPA, so dropout is the only difference). A dropout
    site saves its mask only when its input needs a gradient: the embeddings' dropout does not
    (LoRA-FA freezes everything below the first adapted projection); every block's attention
    probabilities (B x heads x S x S), attention output and FFN output (B x S x H each) do, and so do
    the classification head's two dropouts on the first token (B x H each).
    """
    emulated_run = tiny("tiny-roberta", "lora_fa", "model.attn_implementation=eager")
    emulated = measure(emulated_run)
    raw = measure(tiny("tiny-roberta", "lora_fa", "model.attn_implementation=eager", "backend.cuda_semantics=false"))
    assert emulated.status.state == raw.status.state == "ok"
    dims = emulated_run.model.hf_config
    batch, seq = emulated_run.workload.batch_size, emulated_run.workload.seq_len
    layers, heads, hidden = dims["num_hidden_layers"], dims["num_attention_heads"], dims["hidden_size"]
    sites = (layers * [batch * heads * seq * seq]  # attention probabilities
             + 2 * layers * [batch * seq * hidden]  # attention output, FFN output
             + 2 * [batch * hidden])  # classification head: dense input, out_proj input
    float_mask, bool_mask = 4, 1  # bytes per element: fp32 noise (CPU's dropout) vs native_dropout's bool mask
    extra_saved = sum((float_mask - bool_mask) * elements for elements in sites)
    extra_live = sum(allocator_bytes(float_mask * elements) - allocator_bytes(bool_mask * elements)
                     for elements in sites)
    assert raw.metrics["saved_tensor_bytes"] - emulated.metrics["saved_tensor_bytes"] == extra_saved
    assert raw.metrics["activation_bytes"] - emulated.metrics["activation_bytes"] == extra_live
    for key in ("weight_bytes", "gradient_bytes", "optimizer_state_bytes"):
        assert raw.metrics[key] == emulated.metrics[key], key  # dropout touches activations only


def test_predicted_oom_is_a_result():
    """A simulated peak above the card is recorded as status oom, with the figures kept."""
    capacity = 24 << 30
    small = measure(tiny("tiny-llama", "full", "workload.batch_size=64", "backend.device=gpu-24gb", backend="simulate"))
    assert small.status.state == "ok"
    per_sequence = small.metrics["activation_bytes"] // 64
    batch = 2 * capacity // per_sequence  # about twice what the card holds
    huge = measure(tiny("tiny-llama", "full", f"workload.batch_size={batch}", "backend.device=gpu-24gb",
                        backend="simulate"))
    assert huge.status.state == "oom"
    assert "exceeds" in huge.status.message and "24.0 GiB" in huge.status.message
    assert huge.status.phase in ("forward", "backward", "optimizer_step")
    assert huge.metrics["peak_allocated_bytes"] > capacity
