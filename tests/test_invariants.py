"""What must hold for any model: the physics of LoRA, LoRA-FA, recompute and AdamW.

All runs execute for real on the CPU (backend=cpu), with the allocator model.
"""

from __future__ import annotations

import functools

import pytest
import torch

from conftest import TINY_MODELS, run_config, tiny
from membench.backends import create_backend
from membench.allocator import allocator_bytes
from membench.devices import DEVICES
from membench.models import default_targets
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


# Current 7B decoders in simulation, once each at a realistic LoRA setting (seconds per run, fake tensors).
SEVEN_B = ["mistral-7b", "qwen2.5-7b"]
REALISTIC = ("train.precision=bf16", "workload.batch_size=2", "workload.seq_len=512", "backend.name=simulate",
             "backend.device=h100-80gb")
BYTES_PER_ELEMENT = {"bf16": 2, "fp32": 4}  # weights by train.precision, adapters by method.adapter_dtype


@functools.lru_cache(maxsize=None)
def simulated_7b(model: str, method: str):
    run = run_config(f"model={model}", f"method={method}", *REALISTIC)
    return run, measure(run)


def transformers_layout(run):
    """What the transformers config alone says: the model's tensors (on the meta device) and its LoRA targets."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(run.model.model_type, **run.model.hf_config)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    targets = run.method.target_modules or default_targets(run.model, config)
    adapted = [module for name, module in net.named_modules()
               if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    return net, adapted


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
@pytest.mark.parametrize("model", SEVEN_B)
def test_7b_weights_and_trainable_parameters_follow_the_transformers_config(model, method):
    """Weights: every base parameter at 2 bytes (bf16) plus the fp32 adapters, each tensor allocator-rounded."""
    run, result = simulated_7b(model, method)
    assert result.status.state == "ok", result.status.message
    net, adapted = transformers_layout(run)
    assert adapted, "no layer matches the LoRA targets"
    parameters, buffers = list(net.parameters()), list(net.buffers())  # each once (tied weights included)
    assert all(p.element_size() == BYTES_PER_ELEMENT[run.train.precision] for p in parameters)
    rank, adapter_size = run.method.rank, BYTES_PER_ELEMENT[run.method.adapter_dtype]
    a_shapes = [rank * layer.in_features for layer in adapted]  # A: r x in, frozen in LoRA-FA
    b_shapes = [rank * layer.out_features for layer in adapted]  # B: out x r, always trained
    trainable = b_shapes if method == "lora_fa" else a_shapes + b_shapes
    m = result.metrics
    assert m["weight_bytes"] == (sum(allocator_bytes(p.numel() * p.element_size()) for p in parameters + buffers)
                                 + sum(allocator_bytes(adapter_size * n) for n in a_shapes + b_shapes))
    assert m["total_params"] == sum(p.numel() for p in parameters) + sum(a_shapes) + sum(b_shapes)
    assert m["trainable_params"] == sum(trainable)
    assert m["gradient_bytes"] == sum(allocator_bytes(adapter_size * n) for n in trainable)
    assert m["optimizer_state_bytes"] == 2 * m["gradient_bytes"]  # AdamW: exp_avg, exp_avg_sq per trainable


@pytest.mark.slow
@pytest.mark.parametrize("model", SEVEN_B)
def test_7b_lora_fa_saves_fewer_bytes_and_every_part_fits_under_the_peak(model):
    runs = {method: simulated_7b(model, method) for method in ("lora", "lora_fa")}
    for method, (run, result) in runs.items():
        m = result.metrics
        assert result.status.state == "ok", (method, result.status.message)
        parts = {key: m[key] for key in ("weight_bytes", "gradient_bytes", "optimizer_state_bytes",
                                         "activation_bytes", "saved_tensor_bytes")}
        assert all(value >= 0 for value in parts.values()), (method, parts)
        assert parts["saved_tensor_bytes"] <= parts["activation_bytes"]
        assert (parts["weight_bytes"] + parts["gradient_bytes"] + parts["optimizer_state_bytes"]
                + parts["activation_bytes"]) <= m["peak_allocated_bytes"], method
        assert m["peak_allocated_bytes"] == max(m["phase_peak_bytes"].values())
        capacity = DEVICES[run.backend.device].total_memory_bytes  # the 80 GB profile
        assert result.env["device_total_memory_bytes"] == capacity
        assert m["peak_allocated_bytes"] <= capacity  # status ok agrees with the bytes
    lora, lora_fa = runs["lora"][1].metrics, runs["lora_fa"][1].metrics
    assert lora_fa["saved_tensor_bytes"] < lora["saved_tensor_bytes"]
    assert lora_fa["peak_allocated_bytes"] < lora["peak_allocated_bytes"]
