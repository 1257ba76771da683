"""What must hold for any model: the physics of LoRA, LoRA-FA, recompute and AdamW.

All runs execute for real on the CPU (backend=cpu), with the allocator model.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import TINY_MODELS, tiny
from membench.backends import create_backend
from membench.allocator import allocator_bytes
from membench.plan import plan
from membench.runner import build, measure


@functools.lru_cache(maxsize=None)
def measured(model: str, method: str, *extra: str, backend: str = "cpu"):
    result = measure(tiny(model, method, *extra, backend=backend))
    assert result.status.state == "ok", result.status.message
    return result.metrics


@pytest.mark.parametrize("model", TINY_MODELS)
def test_lora_fa_saves_fewer_bytes_than_lora(model):
    lora, lora_fa = measured(model, "lora"), measured(model, "lora_fa")
    assert lora_fa["saved_tensor_bytes"] < lora["saved_tensor_bytes"]
    assert lora_fa["activation_bytes"] < lora["activation_bytes"]
    assert lora_fa["peak_allocated_bytes"] < lora["peak_allocated_bytes"]


@pytest.mark.parametrize("model", TINY_MODELS)
def test_lora_fa_saves_fewer_bytes_with_adapter_dropout(model):
    lora = measured(model, "lora", "method.lora_dropout=0.1")
    lora_fa = measured(model, "lora_fa", "method.lora_dropout=0.1")
    assert lora_fa["saved_tensor_bytes"] < lora["saved_tensor_bytes"]


@pytest.mark.parametrize("model", TINY_MODELS)
def test_recompute_saves_fewer_bytes_than_lora(model):
    lora, recompute = measured(model, "lora"), measured(model, "lora_recompute")
    assert recompute["saved_tensor_bytes"] < lora["saved_tensor_bytes"]
    assert recompute["activation_bytes"] < lora["activation_bytes"]


@pytest.mark.parametrize("model", TINY_MODELS)
def test_lora_fa_trains_only_b(model):
    lora, lora_fa = measured(model, "lora"), measured(model, "lora_fa")
    assert lora_fa["trainable_params"] < lora["trainable_params"]
    assert lora_fa["gradient_bytes"] < lora["gradient_bytes"]


@pytest.mark.parametrize("model", TINY_MODELS)
def test_full_fine_tuning_has_a_gradient_for_every_parameter(model):
    the_plan = plan(tiny(model, "full"))
    backend = create_backend(the_plan.run.backend)
    net, batch = build(the_plan, backend)
    net(**batch).loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize("method", ["full", "lora", "lora_fa"])
def test_adamw_state_is_two_fp32_copies_of_the_trainable_weights(model, method):
    metrics = measured(model, method)
    the_plan = plan(tiny(model, method))
    net, _ = build(the_plan, create_backend(the_plan.run.backend))
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    expected = sum(2 * allocator_bytes(p.numel() * 4) for p in trainable)
    assert metrics["optimizer_state_bytes"] == expected
    assert metrics["trainable_params"] == sum(p.numel() for p in trainable)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_full_fine_tuning_gradients_equal_the_weights(model):
    metrics = measured(model, "full")
    assert metrics["trainable_params"] == metrics["total_params"]
    assert 0 < metrics["gradient_bytes"] <= metrics["weight_bytes"]


@pytest.mark.parametrize("model", TINY_MODELS)
def test_phase_figures_are_consistent(model):
    m = measured(model, "lora")
    assert set(m["phase_peak_bytes"]) == {"forward", "backward", "optimizer_step"}
    assert m["peak_allocated_bytes"] == max(m["phase_peak_bytes"].values())
    assert m["peak_allocated_bytes"] >= m["weight_bytes"] + m["activation_bytes"]
    assert m["saved_tensor_bytes"] <= m["activation_bytes"]
    assert m["step_time_s"] > 0 and m["tokens_per_s"] > 0
    # After zero_grad(set_to_none=True) only weights, optimizer state and the batch remain.
    assert m["phase_allocated_bytes"]["optimizer_step"] == m["phase_allocated_bytes"]["optimizer_state"] - m["gradient_bytes"]


def test_bf16_weights_are_half_of_fp32():
    fp32 = measured("tiny-llama", "full")
    bf16 = measured("tiny-llama", "full", "train.precision=bf16")
    # Half, plus the 512-byte rounding of many small tensors (norm weights) and fp32 rotary buffers.
    assert fp32["weight_bytes"] / 2 <= bf16["weight_bytes"] < fp32["weight_bytes"] * 0.55


def test_adapter_dtype_fp32_costs_more_on_a_bf16_model():
    """PEFT's default fp32 adapters upcast X in every adapted layer: plain LoRA saves that copy."""
    fp32 = measured("tiny-llama", "lora", "train.precision=bf16", "method.adapter_dtype=fp32")
    base = measured("tiny-llama", "lora", "train.precision=bf16", "method.adapter_dtype=base")
    assert fp32["saved_tensor_bytes"] > base["saved_tensor_bytes"]


def test_order_of_runs_does_not_change_results():
    """Runs sharing a process (Hydra's sequential multirun) give the same bytes in any order."""
    runs = [tiny("tiny-llama", m, backend="simulate") for m in ("lora", "full", "lora_fa")]
    keys = ("weight_bytes", "activation_bytes", "saved_tensor_bytes", "peak_allocated_bytes", "optimizer_state_bytes")
    forward = {r.method.name: measure(r).metrics for r in runs}
    backward = {r.method.name: measure(r).metrics for r in reversed(runs)}
    for name in forward:
        assert {k: forward[name][k] for k in keys} == {k: backward[name][k] for k in keys}


def test_more_measured_steps_measure_the_same_step():
    """Steps are identical: three measured steps report what one does (saved bytes not summed)."""
    keys = ("activation_bytes", "saved_tensor_bytes", "peak_allocated_bytes", "gradient_bytes", "phase_peak_bytes")
    one = measured("tiny-llama", "lora")
    three = measured("tiny-llama", "lora", "workload.measured_steps=3")
    assert {k: one[k] for k in keys} == {k: three[k] for k in keys}


def test_without_warmup_the_first_step_allocates_optimizer_state():
    cold = measured("tiny-llama", "lora", "workload.warmup_steps=0")
    warm = measured("tiny-llama", "lora")
    assert cold["optimizer_state_bytes"] == warm["optimizer_state_bytes"] > 0
    assert cold["peak_allocated_bytes"] <= warm["peak_allocated_bytes"]


def test_a_plan_can_run_twice():
    from membench.runner import execute

    the_plan = plan(tiny("tiny-llama", "lora", backend="simulate"))
    first, second = execute(the_plan), execute(the_plan)
    assert first.metrics == second.metrics
