"""Every family in the catalogue, tiny: simulate equals cpu, LoRA-FA saves fewer bytes than LoRA, full trains all.

One tiny config.json per family (2 layers, hidden 32-64) through ``model=custom``, with no
method.target_modules (the all-linear default). Each (family, method, backend) result is
measured once per module and shared by the three checks.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_config
from membench.runner import measure
from test_simulate import without_overhead

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("causal_lm", dict(model_type="llama", **COMMON)),
    "qwen2": ("causal_lm", dict(model_type="qwen2", **COMMON)),
    "qwen3": ("causal_lm", dict(model_type="qwen3", head_dim=8, **COMMON)),
    "qwen3_moe": ("causal_lm", dict(model_type="qwen3_moe", head_dim=8, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, **COMMON)),
    "mistral": ("causal_lm", dict(model_type="mistral", sliding_window=None, **COMMON)),
    "mixtral": ("causal_lm", dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                                  sliding_window=None, **COMMON)),
    "gemma2": ("causal_lm", dict(model_type="gemma2", head_dim=8, query_pre_attn_scalar=8, sliding_window=16, **COMMON)),
    "gemma3_text": ("causal_lm", dict(model_type="gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                      **COMMON)),
    "phi3": ("causal_lm", dict(model_type="phi3", pad_token_id=0, **COMMON)),
    "gpt2": ("causal_lm", dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)),
    "bert": ("sequence_classification", dict(model_type="bert", hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, vocab_size=128,
                                             max_position_embeddings=64, num_labels=2)),
    "deberta-v2": ("sequence_classification", dict(model_type="deberta-v2", hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=64, vocab_size=128,
                                                   max_position_embeddings=64, relative_attention=True,
                                                   position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                                                   pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                                   type_vocab_size=0, num_labels=2)),
}
METHODS = ("full", "lora", "lora_fa")
# Fake-tensor gaps, to be closed in the simulate backend (each is reported by the run, not hidden):
KNOWN_SIMULATE_GAPS = {
    "Expected inputs of BF16 type": "transformers' grouped_mm MoE experts: torch's meta kernel for aten._grouped_mm "
                                    "accepts only bf16, the CPU kernel also fp32",
}
WORKLOAD = ("workload.batch_size=2", "workload.seq_len=8", "workload.warmup_steps=1", "method.rank=2")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(family, method, backend) -> Result, measured lazily and once for the whole module."""
    folder = tmp_path_factory.mktemp("families")
    cache: dict = {}

    def get(family: str, method: str, backend: str):
        key = (family, method, backend)
        if key not in cache:
            task, values = FAMILIES[family]
            path = folder / f"{family}.json"
            path.write_text(json.dumps(values))
            extra = [e for e in WORKLOAD if method != "full" or not e.startswith("method.rank")]
            run = run_config("model=custom", f"model.config_path={path}", f"model.task={task}", f"method={method}",
                             f"backend.name={backend}", f"results_dir={folder / 'runs'}", *extra)
            cache[key] = measure(run)
        return cache[key]

    return get


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_simulate_equals_cpu(results, family, method):
    real, simulated = results(family, method, "cpu"), results(family, method, "simulate")
    assert real.status.state == "ok", real.status
    message = simulated.status.message or ""
    for known in KNOWN_SIMULATE_GAPS:
        if simulated.status.state == "error" and known in message:
            pytest.xfail(f"simulate cannot run {family} yet: {KNOWN_SIMULATE_GAPS[known]}")
    assert simulated.status.state == "ok", simulated.status
    assert without_overhead(simulated.metrics) == without_overhead(real.metrics)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_fa_saves_fewer_bytes_than_lora(results, family):
    lora, lora_fa = results(family, "lora", "cpu"), results(family, "lora_fa", "cpu")
    assert lora.status.state == lora_fa.status.state == "ok", (lora.status, lora_fa.status)
    assert lora_fa.metrics["saved_tensor_bytes"] < lora.metrics["saved_tensor_bytes"]
    assert lora.env["adapted_layers"] > 0 and lora.env["target_modules"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_gives_every_parameter_a_gradient(results, family):
    full = results(family, "full", "cpu").metrics
    assert full["trainable_params"] == full["total_params"]
    # fp32: 4 bytes per parameter, plus the allocator's rounding of each gradient to 512-byte blocks
    assert full["gradient_bytes"] >= 4 * full["total_params"]
