"""Every config file composes, and every bad input fails early with a message that helps."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException

import membench.runner
from conftest import METHODS, MODELS, TINY_MODELS, run_config, tiny
from membench.config import RunConfig
from membench.errors import ConfigError
from membench.plan import plan
from membench.runner import measure


# Every method on one model per task (test_every_model_plans_on_meta composes every model): a method file
# sets method.* and, for the quantised ones, model.quantization, whatever the model.
@pytest.mark.parametrize("model", TINY_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_on_every_task(model, method):
    run = run_config(f"model={model}", f"method={method}")
    assert isinstance(run, RunConfig)
    assert run.model.name == model
    assert run.method.name == method


@pytest.mark.parametrize("model", [m for m in MODELS if m not in ("custom", "hub")])  # these need a config file
def test_every_model_plans_on_meta(model):
    """The real model configs build (on meta) and their default targets match layers."""
    the_plan = plan(run_config(f"model={model}", "method=lora", "workload.seq_len=128"))
    assert the_plan.adapted, "default targets adapted no layer"
    assert all(p.device.type == "meta" for p in the_plan.meta_model.parameters())


def test_default_config_is_the_reference_row():
    run = run_config()
    assert (run.model.name, run.method.kind, run.workload.batch_size, run.workload.seq_len, run.method.rank) == (
        "roberta-large", "lora_fa", 32, 128, 8)


def test_unknown_model_lists_choices():
    with pytest.raises(MissingConfigException) as error:
        run_config("model=gpt-17")
    assert "gpt-17" in str(error.value)
    assert "llama-7b" in str(error.value)  # Hydra lists the available options


def test_unknown_method_lists_choices():
    with pytest.raises(MissingConfigException) as error:
        run_config("method=qlora_xl")
    assert "qlora_xl" in str(error.value) and "lora_fa" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method.rank=0"], "method.rank=0 must be a positive integer"),
        (["method.rank=-4"], "method.rank=-4 must be a positive integer"),
        (["workload.batch_size=0"], "workload.batch_size=0 must be a positive integer"),
        (["workload.seq_len=-1"], "workload.seq_len=-1 must be a positive integer"),
        (["train.precision=fp8"], "train.precision='fp8' is not supported; choose one of: fp32, bf16, fp16, bf16-autocast"),
        (["method.kind=qlora"], "method.kind='qlora' is not supported; choose one of: full, lora, lora_fa"),
        (["backend.name=tpu"], "backend.name='tpu' is not supported; choose one of: auto, cuda, simulate, cpu"),
        (["backend.device=h900"], "backend.device='h900' is not supported"),
        (["method=full", "method.rank=8"], "method.rank=8 has no effect with method.kind=full"),
        (["method=lora", "method.lorafa_optimizer=true"], "needs method.kind=lora_fa"),
        (["method.lorafa_optimizer=true", "train.optimizer_impl=fused"], "no fused kernel"),
        (["model=tiny-llama", "workload.target_len=8"], "workload.target_len=8 only applies to seq2seq models"),
        (["method.lora_dropout=1.5"], "method.lora_dropout=1.5 must be in [0, 1)"),
    ],
)
def test_bad_values_are_named(overrides, expected):
    with pytest.raises(ConfigError) as error:
        run_config(*overrides)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("model", "overrides", "expected"),
    [
        # tiny-llama: k_proj is 64 -> 32 (2 KV heads of 16), so ranks must stay below 32.
        ("tiny-llama", ["method.rank=32"], "method.rank=32 is not below the smaller dimension of target"),
        ("tiny-llama", ["method.rank=32"], "use a rank between 1 and 31"),
        ("tiny-roberta", ["workload.seq_len=600"], "workload.seq_len=600 exceeds the 512 positions of model 'tiny-roberta'"),
        ("tiny-llama", ["workload.seq_len=257"], "use a length between 1 and 256"),
        ("tiny-llama", ["method.target_modules=[q_proj,qkv]"], "entry 'qkv' matches no linear layer"),
        ("tiny-llama", ["method.target_modules=[qkv]"], "linear layer names are: down_proj, gate_proj, k_proj"),
    ],
)
def test_shape_errors_come_before_any_allocation(monkeypatch, model, overrides, expected):
    """Shape checks run on a meta model: no backend is created, nothing is allocated."""

    def no_backend(*args, **kwargs):
        raise AssertionError("a backend was created before validation finished")

    monkeypatch.setattr(membench.runner, "create_backend", no_backend)
    run = run_config(f"model={model}", "method=lora", *overrides)
    with pytest.raises(ConfigError) as error:
        measure(run)
    assert expected in str(error.value)


def test_targets_that_are_all_excluded():
    with pytest.raises(ConfigError, match="selects only excluded layers"):
        plan(tiny("tiny-roberta", "lora", "method.target_modules=[classifier.dense]"))


def test_model_config_that_transformers_rejects():
    with pytest.raises(ConfigError) as error:
        plan(tiny("tiny-roberta", "lora", "model.hf_config.num_attention_heads=3"))
    assert "model 'tiny-roberta' cannot be built from its config" in str(error.value)


def test_t5_has_no_position_limit():
    """Relative positions: a long T5 input is fine (no absolute position table)."""
    assert plan(tiny("tiny-t5", "lora", "workload.seq_len=4096")).adapted


def test_custom_model_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,'
        ' "num_attention_heads": 2, "vocab_size": 100, "max_position_embeddings": 64}'
    )
    the_plan = plan(run_config("model=custom", f"model.config_path={tmp_path}", "method=lora", "workload.seq_len=64"))
    assert the_plan.hf_config.hidden_size == 32
    assert len(the_plan.adapted) == 7


def test_custom_model_with_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match="is not a readable config.json"):
        plan(run_config("model=custom", f"model.config_path={tmp_path / 'missing.json'}", "method=lora"))


@pytest.mark.parametrize("model", TINY_MODELS)
def test_tiny_models_are_tiny(model):
    the_plan = plan(tiny(model, "full"))
    assert sum(p.numel() for p in the_plan.meta_model.parameters()) < 1_000_000
