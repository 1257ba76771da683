"""MoE experts stored as fused parameters are adapted through PEFT's ``target_parameters``.

Qwen3-MoE and Mixtral keep each layer's experts as 3-D parameters (``experts.gate_up_proj``,
``experts.down_proj``): there is no Linear for LoRA to wrap. With the default targets, membench adapts
them through PEFT's ParamWrapper, and simulate equals real CPU execution for it (bf16: torch's fake
kernel for ``aten._grouped_mm`` takes bf16 only).
"""

from __future__ import annotations

import json

import pytest

from conftest import run_config
from membench.errors import ConfigError
from membench.plan import plan
from membench.runner import measure
from test_families import FAMILIES, WORKLOAD
from test_simulate import assert_simulate_equals_cpu

MOE = ["qwen3_moe", "mixtral"]


def moe_run(tmp_path, family, method, *extra, backend="simulate"):
    task, values = FAMILIES[family]
    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(values))
    return run_config("model=custom", f"model.config_path={path}", f"model.task={task}", f"method={method}",
                      f"backend.name={backend}", "train.precision=bf16", *WORKLOAD, *extra)


@pytest.mark.parametrize("method", ["lora", "lora_fa"])
@pytest.mark.parametrize("family", MOE)
def test_experts_are_adapted_and_simulate_equals_cpu(tmp_path, family, method):
    real = measure(moe_run(tmp_path, family, method, backend="cpu"))
    simulated = measure(moe_run(tmp_path, family, method))
    assert_simulate_equals_cpu(real, simulated)
    assert simulated.env["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
    assert "not_adapted" not in simulated.env


def test_experts_add_trainable_parameters_and_can_be_left_out(tmp_path):
    adapted = measure(moe_run(tmp_path, "qwen3_moe", "lora"))
    left_out = measure(moe_run(tmp_path, "qwen3_moe", "lora", "method.target_parameters=[]"))
    assert left_out.env["not_adapted"] == ["experts.gate_up_proj", "experts.down_proj"]
    assert "target_parameters" not in left_out.env
    assert adapted.metrics["trainable_params"] > left_out.metrics["trainable_params"]
    assert adapted.run_id != left_out.run_id


def test_dora_on_fused_experts_is_refused_before_any_model_is_built(tmp_path):
    with pytest.raises(ConfigError, match="method.dora=true: PEFT's DoRA does not support"):
        plan(moe_run(tmp_path, "qwen3_moe", "dora"))
    assert plan(moe_run(tmp_path, "qwen3_moe", "dora", "method.target_parameters=[]")).not_adapted


def test_a_target_parameter_that_names_nothing_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'experts.up' names no parameter.*experts.gate_up_proj"):
        plan(moe_run(tmp_path, "qwen3_moe", "lora", "method.target_parameters=[experts.up]"))
