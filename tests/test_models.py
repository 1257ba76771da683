"""Models by Hub id or folder, default LoRA targets for every architecture, and the catalogue's shapes.

No network: Hub ids are tried with HF_HUB_OFFLINE=1 and an empty cache; folders hold tiny config.json files.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_config
from membench.config import RunConfig
from membench.errors import ConfigError
from membench.plan import plan

# The defaults the five original families had before "all-linear" (membench.models.FAMILY_TARGETS then).
FAMILY_TARGETS = {
    "roberta-base": (["query", "key", "value", "dense"], ["classifier.dense", "classifier.out_proj"]),
    "t5-small": (["q", "k", "v", "o", "wi", "wo"], []),
    "llama-7b": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], []),
    "mistral-7b": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], []),
    "qwen2.5-7b": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], []),
}

# Published parameter counts (model cards / config.json of the repositories named in each YAML file).
PUBLISHED = {
    "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "llama-3.1-405b": 405.9e9,
    "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9,
    "qwen2.5-0.5b": 0.494e9, "qwen2.5-7b": 7.62e9, "qwen2.5-14b": 14.7e9, "qwen2.5-32b": 32.5e9,
    "qwen2.5-72b": 72.7e9, "qwen3-8b": 8.19e9, "qwen3-30b-a3b": 30.5e9,
    "mistral-7b": 7.24e9, "mixtral-8x7b": 46.7e9,
    "gemma-2-9b": 9.24e9, "gemma-3-12b": 12e9,  # Gemma 3: the language model of the "12B" (vision tower not built)
    "phi-3.5-mini": 3.82e9, "phi-4": 14.7e9,
    "gpt2": 124e6, "bert-base": 110e6, "deberta-v3-base": 184e6,
}
MOE = {"qwen3-30b-a3b", "mixtral-8x7b"}


@pytest.mark.parametrize("model", sorted(FAMILY_TARGETS))
def test_all_linear_reproduces_the_family_defaults(model):
    the_plan = plan(run_config(f"model={model}", "method=lora", "workload.seq_len=128"))
    assert (the_plan.targets, the_plan.excludes) == FAMILY_TARGETS[model]


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_catalogue_matches_published_size(model):
    """Each catalogue model builds on meta with no target_modules given; its size is the published one (±3%)."""
    the_plan = plan(run_config(f"model={model}", "method=lora", "workload.seq_len=128"))
    params = sum(p.numel() for p in the_plan.meta_model.parameters())
    assert abs(params / PUBLISHED[model] - 1) < 0.03, (model, params)
    assert the_plan.adapted
    head = the_plan.meta_model.get_output_embeddings()
    assert all(not layer.name.endswith(("lm_head", "classifier", "out_proj")) for layer in the_plan.adapted), head
    # MoE experts are fused 3-D parameters: adapted through PEFT's target_parameters, none left out.
    assert bool(the_plan.target_parameters) == (model in MOE) and not the_plan.not_adapted


def test_all_linear_spelling_and_gemma2_falls_back_to_eager():
    the_plan = plan(run_config("model=gemma-2-9b", "method=lora", "method.target_modules=all-linear"))
    assert the_plan.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert the_plan.model.attn_implementation == "eager" and the_plan.run.model.attn_implementation == "sdpa"
    assert "sdpa" in the_plan.resolution["attn_implementation_reason"]


def test_gpt2_conv1d_rank_check_reads_the_transposed_weight():
    """Conv1D stores in x out: c_attn is 768 -> 2304, c_proj 768 -> 768 (GPT-2 base)."""
    the_plan = plan(run_config("model=gpt2", "method=lora"))
    shapes = {layer.name.split(".", 3)[-1]: (layer.in_features, layer.out_features) for layer in the_plan.adapted}
    assert shapes["attn.c_attn"] == (768, 2304) and shapes["mlp.c_fc"] == (768, 3072) and shapes["mlp.c_proj"] == (3072, 768)
    with pytest.raises(ConfigError, match="c_attn.*768 -> 2304|c_proj"):
        plan(run_config("model=gpt2", "method=lora", "method.rank=768"))


def write_config(folder, **values):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values))
    return folder


TINY_QWEN3 = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)


def test_hub_folder_with_only_a_config(tmp_path):
    folder = write_config(tmp_path / "My-Model", **TINY_QWEN3)
    run = run_config("model=hub", f"model.id={folder}", "method=lora")
    assert run.model.name == "my-model" and run.model.task == "auto"
    the_plan = plan(run)
    assert the_plan.model.task == "causal_lm" and "Qwen3ForCausalLM" in the_plan.resolution["task_reason"]
    assert len(the_plan.adapted) == 14


@pytest.mark.parametrize(("values", "task"), [
    (dict(architectures=["T5ForConditionalGeneration"], model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=1,
          num_heads=4, vocab_size=64), "seq2seq_lm"),
    (dict(architectures=["BertForMaskedLM"], model_type="bert", hidden_size=32, num_hidden_layers=1,
          num_attention_heads=4, intermediate_size=64, vocab_size=64), "sequence_classification"),
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=32, n_layer=1, n_head=4, vocab_size=64),
     "causal_lm"),
])
def test_task_is_inferred(tmp_path, values, task):
    the_plan = plan(run_config("model=hub", f"model.id={write_config(tmp_path / 'm', **values)}", "method=lora",
                               "method.rank=2"))
    assert the_plan.model.task == task


def test_task_override_and_a_task_without_head(tmp_path):
    folder = write_config(tmp_path / "m", **TINY_QWEN3)
    assert plan(run_config("model=hub", f"model.id={folder}", "model.task=sequence_classification",
                           "method=lora")).model.task == "sequence_classification"
    t5 = write_config(tmp_path / "t5", model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      vocab_size=64)
    with pytest.raises(ConfigError, match="model.task='causal_lm'.*no causal_lm head.*seq2seq_lm"):
        plan(run_config("model=hub", f"model.id={t5}", "model.task=causal_lm", "method=lora", "method.rank=2"))


def test_hub_bad_input(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: without this an already imported hub would try
    # the network (and back off for 20 s where there is none)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(ConfigError, match="model.id='nobody/no-such-model'.*cannot be fetched.*HF_HUB_OFFLINE"):
        plan(run_config("model=hub", "model.id=nobody/no-such-model", "method=lora"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        plan(run_config("model=hub", f"model.id={tmp_path / 'empty'}", "method=lora"))
    with pytest.raises(ConfigError, match="is not a folder"):
        plan(run_config("model=hub", f"model.id={tmp_path / 'missing'}", "method=lora"))
    unknown = write_config(tmp_path / "unknown", model_type="not-a-model", architectures=["NotAModel"])
    with pytest.raises(ConfigError, match="model_type this transformers.*does not know"):
        plan(run_config("model=hub", f"model.id={unknown}", "method=lora"))
    remote = write_config(tmp_path / "remote", model_type="custom-arch", architectures=["CustomForCausalLM"],
                          auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    with pytest.raises(ConfigError, match="trust_remote_code"):
        plan(run_config("model=hub", f"model.id={remote}", "method=lora"))
    with pytest.raises(ConfigError, match="both name a config"):
        run_config("model=hub", f"model.id={remote}", f"model.config_path={remote}")


def test_new_model_fields_rename_nothing():
    from membench.identity import identity_fields, recorded_config

    run = run_config("model=tiny-llama", "method=lora")
    assert {"id", "revision", "trust_remote_code"}.isdisjoint(identity_fields(recorded_config(run, "simulate"))["model"])
    assert isinstance(run, RunConfig)
