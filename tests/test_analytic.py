"""membench.analytic against measured saved-tensor bytes: the symbolic walk to the byte, Korthikanti by hand.

The walk is compared with the kernels the measurement ran (``measured_kernels``: CPU kernels in a
CPU build of torch); what CUDA's kernels add is checked by hand separately.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from membench.analytic import (ActivationEstimate, TERMS, estimate, estimate_config, korthikanti_activation_bytes,
                               korthikanti_for_run, linear_stack_saved_bytes, measured_kernels)
from membench.identity import recorded_config
from membench.runner import measure
from membench.saved_tensors import SavedTensorCounter
from tests.conftest import run_config, tiny

# Keys missing from conf/model/tiny-*.yaml are added with Hydra's "+".
NO_DROPOUT_ROBERTA = ["+model.hf_config.hidden_dropout_prob=0.0", "+model.hf_config.attention_probs_dropout_prob=0.0"]
ONE_LAYER = {"tiny-roberta": ["model.hf_config.num_hidden_layers=1"], "tiny-llama": ["model.hf_config.num_hidden_layers=1"],
             "tiny-t5": ["model.hf_config.num_layers=1", "model.hf_config.num_decoder_layers=1"]}


# -- (1) a stack of linear layers ---------------------------------------------------------------------
def _measured_linear_stack(widths, tokens, kind, rank, dtype, adapter_fp32):
    torch.manual_seed(0)
    layers = [nn.Linear(widths[i], widths[i + 1]) for i in range(len(widths) - 1)]
    model = nn.Sequential(*layers).to(dtype)
    if kind == "full":
        model.requires_grad_(True)
    else:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[str(i) for i in range(len(layers))])
        model = get_peft_model(model, config, autocast_adapter_dtype=adapter_fp32)
        if not adapter_fp32:
            for name, param in model.named_parameters():
                if ".lora_" in name:
                    param.data = param.data.to(dtype)
        if kind == "lora_fa":
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    param.requires_grad_(False)
    counter = SavedTensorCounter(list(model.parameters()))
    x = torch.randn(tokens, widths[0], dtype=dtype)
    with counter.counting():
        model(x).float().sum().backward()
    return counter.total_bytes


@pytest.mark.parametrize("kind", ["full", "lora", "lora_fa"])
@pytest.mark.parametrize("dtype,adapter_fp32", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)])
def test_linear_stack_matches_saved_tensor_counter(kind, dtype, adapter_fp32):
    widths, tokens, rank = [24, 40, 16, 56], 6, 4
    itemsize = torch.finfo(dtype).bits // 8
    adapter = 4 if adapter_fp32 else itemsize
    predicted = linear_stack_saved_bytes(widths, tokens, kind, rank, itemsize, adapter)
    assert predicted == _measured_linear_stack(widths, tokens, kind, rank, dtype, adapter_fp32)


def test_linear_stack_closed_forms_by_hand():
    # 3 layers 24 -> 40 -> 16 -> 56, 6 tokens, rank 4, fp32.
    assert linear_stack_saved_bytes([24, 40, 16, 56], 6, "full") == 6 * (24 + 40 + 16) * 4
    assert linear_stack_saved_bytes([24, 40, 16, 56], 6, "lora", 4) == 6 * (24 + 40 + 16 + 3 * 4) * 4
    assert linear_stack_saved_bytes([24, 40, 16, 56], 6, "lora_fa", 4) == 3 * 6 * 4 * 4
    # bf16 base, fp32 adapters: LoRA keeps fp32 copies of X, LoRA-FA only fp32 XA.
    assert linear_stack_saved_bytes([24, 40, 16, 56], 6, "lora", 4, 2, 4) == 6 * (24 + 40 + 16 + 12) * 4


# -- (2) one transformer block, exact against real execution on the cpu backend -------------------------
BLOCK_CASES = [
    ("tiny-llama", "full", []),
    ("tiny-llama", "lora_fa", ["train.precision=bf16"]),
    ("tiny-roberta", "lora", NO_DROPOUT_ROBERTA),
    ("tiny-roberta", "lora_fa", NO_DROPOUT_ROBERTA + ["model.attn_implementation=eager"]),
    ("tiny-t5", "lora_fa", ["+model.hf_config.dropout_rate=0.0"]),
]


@pytest.mark.parametrize("model,method,extra", BLOCK_CASES)
def test_one_block_is_exact_on_cpu(model, method, extra):
    run = tiny(model, method, *ONE_LAYER[model], *extra)
    result = measure(run)
    predicted = estimate(run, kernels=measured_kernels(result.env))  # CUDA's, under CudaSemantics
    metrics = result.metrics
    assert predicted.saved_bytes == metrics["saved_tensor_bytes"]
    assert predicted.activation_bytes == metrics["activation_bytes"]


def test_roberta_block_by_hand():
    """Korthikanti-style count of one RoBERTa layer, full fine-tuning, eager, fp32, no dropout.

    Per layer: X (n h), copies of q, k, v (3 n h), the context (n h), two LayerNorm
    inputs (2 n h), the FFN input (n h), GELU input and output (2 n I), all x 4 bytes,
    the softmax output (b a s^2 x 4), and 2 x 2 n LayerNorm statistics x 4.
    """
    b, s, h, a, ffn, labels = 2, 16, 64, 4, 128, 2
    n = b * s
    embeddings = 3 * n * 8 + n * h * 4 + 2 * n * 4  # ids, token-type ids, position ids; LayerNorm
    layer = 8 * n * h * 4 + 2 * n * ffn * 4 + b * a * s * s * 4 + 4 * n * 4
    head = n * h * 4 + b * h * 4 + b * labels * 4 + b * 8 + 4  # dense input (a view of the last state), tanh, loss
    run = tiny("tiny-roberta", "full", *ONE_LAYER["tiny-roberta"], "model.attn_implementation=eager",
               *NO_DROPOUT_ROBERTA, backend="simulate")
    predicted = estimate(run)
    assert predicted.saved_bytes == embeddings + layer + head
    assert predicted.saved_bytes == measure(run).metrics["saved_tensor_bytes"]


def test_terms_sum_and_adapter_terms_by_hand():
    run = tiny("tiny-llama", "lora", "train.precision=bf16", backend="simulate")
    result = estimate(run)
    assert set(result.terms) == set(TERMS)
    assert sum(result.terms.values()) == result.saved_bytes
    n, r, layers = 2 * 16, 8, 2
    in_widths = [64, 64, 64, 64, 64, 64, 128]  # q, k, v, o, gate, up, down
    # fp32 adapters on a bf16 model: one fp32 copy of X per adapted layer, and fp32 XA.
    assert result.terms["adapter_fp32_copies"] == layers * sum(n * k * 4 for k in in_widths)
    assert result.terms["adapter_rank_intermediates"] == layers * len(in_widths) * n * r * 4
    fa = estimate(tiny("tiny-llama", "lora_fa", "train.precision=bf16", backend="simulate"))
    assert fa.terms["adapter_fp32_copies"] == fa.terms["adapter_inputs"] == 0
    assert result.saved_bytes - fa.saved_bytes == result.terms["adapter_fp32_copies"]


# -- (3) the walk equals simulate to the byte --------------------------------------------------------------
def _exact(run) -> None:
    result = measure(run)
    predicted = estimate(run, kernels=measured_kernels(result.env))
    assert (predicted.saved_bytes, predicted.activation_bytes) == (
        result.metrics["saved_tensor_bytes"], result.metrics["activation_bytes"])


# Each family x method x precision x attention kind it supports is exact on tiny models (checked over the full
# product); these cover every method, precision and attention kind per family, at batch 1 and 2.
WALK_CASES = [
    ("full", "train.precision=fp32", "model.attn_implementation=eager"),
    ("lora", "train.precision=bf16", "model.attn_implementation=sdpa"),
    ("lora_fa", "train.precision=fp16", "model.attn_implementation=sdpa"),
    ("lora_fa", "train.precision=bf16-autocast", "model.attn_implementation=eager"),
    ("lora_recompute", "train.precision=bf16-autocast", "model.attn_implementation=sdpa"),
    ("full_recompute", "train.precision=bf16", "model.attn_implementation=eager"),
]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("method,precision,attention", WALK_CASES)
@pytest.mark.parametrize("model", ["tiny-roberta", "tiny-t5", "tiny-llama"])
def test_walk_equals_simulate_to_the_byte(model, method, precision, attention, batch):
    _exact(tiny(model, method, precision, attention, f"workload.batch_size={batch}", backend="simulate"))


# The three kernels whose saved bytes differ between CPU and CUDA (walk.py's docstring), now followed by
# CudaSemantics: the walk with CUDA's kernels equals simulate and cpu on each.
CUDA_KERNEL_CASES = [
    # LayerNorm statistics, fp32 for half inputs: bf16 and fp16 RoBERTa
    ("tiny-roberta", "full", ["train.precision=bf16", "model.attn_implementation=eager"]),
    ("tiny-roberta", "lora", ["train.precision=fp16"]),
    # eager softmax under bf16 autocast, fp32 output
    ("tiny-roberta", "lora", ["train.precision=bf16-autocast", "model.attn_implementation=eager"]),
    ("tiny-t5", "lora_fa", ["train.precision=bf16-autocast", "model.attn_implementation=eager"]),
    # the efficient kernel's log-sum-exp at S = 20 (padded to 32); T5 full also with its bias gradient
    ("tiny-roberta", "lora", ["workload.seq_len=20"]),
    ("tiny-t5", "full", ["workload.seq_len=20"]),
    ("tiny-t5", "lora_fa", ["workload.seq_len=40"]),  # a bias without a gradient
]


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
@pytest.mark.parametrize("model,method,extra", CUDA_KERNEL_CASES)
def test_walk_with_cuda_kernels_equals_the_measurement(model, method, extra, backend):
    run = tiny(model, method, *extra, backend=backend)
    result = measure(run)
    assert measured_kernels(result.env) == "cuda"
    predicted = estimate(run, kernels="cuda")
    assert (predicted.saved_bytes, predicted.activation_bytes) == (
        result.metrics["saved_tensor_bytes"], result.metrics["activation_bytes"])
    assert predicted.saved_bytes != estimate(run, kernels="cpu").saved_bytes  # a case where the kernels differ


def test_measured_kernels_reads_the_env_and_keeps_old_results_cpu():
    assert measured_kernels({"backend": "simulate", "fake_device": "cpu", "kernels": "cuda"}) == "cuda"
    assert measured_kernels({"backend": "cpu", "kernels": "cpu"}) == "cpu"  # backend.cuda_semantics=false
    assert measured_kernels({"backend": "simulate", "fake_device": "cpu"}) == "cpu"  # before the entry
    assert measured_kernels({"backend": "cpu"}) == "cpu"
    assert measured_kernels({"backend": "cuda"}) == "cuda"
    raw = measure(tiny("tiny-roberta", "lora", "backend.cuda_semantics=false", backend="cpu"))
    assert measured_kernels(raw.env) == "cpu"


def test_llama_batch_one_keeps_a_view_of_the_padded_labels():
    """ForCausalLMLoss pads the labels by a column; at b = 1 labels[..., 1:] is contiguous, so no copy."""
    one = estimate(tiny("tiny-llama", "lora", "workload.batch_size=1", backend="simulate"))
    two = estimate(tiny("tiny-llama", "lora", "workload.batch_size=2", backend="simulate"))
    n1, n2, s, vocab = 16, 32, 16, 1000
    # loss = log-softmax (n V fp32) + labels + total weight (4 B)
    assert one.terms["loss"] == n1 * vocab * 4 + (s + 1) * 8 + 4
    assert two.terms["loss"] == n2 * vocab * 4 + n2 * 8 + 4


@pytest.mark.parametrize("model,method,extra,difference", [
    # 5 LayerNorms (embeddings + 2 per layer x 2 layers), n = 32 rows, 2 statistics, fp32 instead of bf16.
    ("tiny-roberta", "full", ["train.precision=bf16"], 5 * 32 * 2 * (4 - 2)),
    # Eager softmax under bf16 autocast: b a s^2 = 2 * 4 * 16 * 16 probabilities per layer in fp32, 2 layers.
    ("tiny-roberta", "lora", ["train.precision=bf16-autocast", "model.attn_implementation=eager"],
     2 * (2 * 4 * 16 * 16) * (4 - 2)),
    # T5 under autocast: only the cross-attention's softmax was bf16 on CPU (self-attention adds the fp32 bias).
    ("tiny-t5", "lora", ["train.precision=bf16-autocast", "model.attn_implementation=eager"],
     2 * (2 * 4 * 16 * 16) * (4 - 2)),
    # fp32 T5 runs the efficient kernel: log-sum-exp rows 16 -> 32 for b a = 8 rows of 6 attentions, fp32.
    ("tiny-t5", "full", [], 6 * 2 * 4 * (32 - 16) * 4),
])
def test_cuda_kernels_add_what_cuda_saves(model, method, extra, difference):
    run = tiny(model, method, *extra, backend="simulate")
    assert estimate(run, kernels="cuda").saved_bytes - estimate(run, kernels="cpu").saved_bytes == difference


def test_korthikanti_by_hand():
    # s = 16, b = 2, h = 64, a = 4, L = 2, fp16: per layer s b h (34 + 5 a s / h) = 2048 * (34 + 5) = 79872.
    s, b, h, a, layers = 16, 2, 64, 4, 2
    full = layers * s * b * h * (34 + 5 * a * s // h)
    assert full == 2 * 79872
    assert korthikanti_activation_bytes(s, b, h, a, layers) == full
    # fp32: sbh(16 * 4 + 2) + a s^2 b (2 * 4 + 1) = 2048 * 66 + 2048 * 9 per layer.
    assert korthikanti_activation_bytes(s, b, h, a, layers, itemsize=4) == layers * (2048 * 66 + 2048 * 9)
    # LoRA, fp32 adapters on fp16, rank 8, q and v adapted (width 64) in both layers: per adapter
    # X copy n k 4 = 32 * 64 * 4 = 8192 and XA n r 4 = 32 * 8 * 4 = 1024; LoRA-FA only the XA.
    adapters = [(32, 64)] * 4
    lora = korthikanti_activation_bytes(s, b, h, a, layers, kind="lora", rank=8, adapters=adapters,
                                        adapter_itemsize=4)
    assert lora == full + 4 * (8192 + 1024)
    fa = korthikanti_activation_bytes(s, b, h, a, layers, kind="lora_fa", rank=8, adapters=adapters,
                                      adapter_itemsize=4)
    assert fa == full + 4 * 1024
    # Recompute: each layer's input only, s b h p = 2048 * 2.
    assert korthikanti_activation_bytes(s, b, h, a, layers, kind="lora", recompute=True) == 2 * 2048 * 2


def test_korthikanti_for_a_run_reads_the_architecture():
    run = tiny("tiny-roberta", "full", backend="simulate")  # fp32, s 16, b 2, h 64, a 4, 2 layers
    assert korthikanti_for_run(run) == korthikanti_activation_bytes(16, 2, 64, 4, 2, itemsize=4)


# Paper-shaped runs of a few seconds each: exact at full size too.
@pytest.mark.parametrize("overrides", [
    ("model=roberta-base", "method=lora_fa", "workload.batch_size=16"),
    ("model=t5-small", "method=lora", "workload.seq_len=256", "workload.batch_size=8"),
    ("model=llama-7b", "method=lora", "train.precision=bf16", "workload.seq_len=512", "workload.batch_size=1"),
])
def test_walk_is_exact_on_paper_sizes(overrides):
    _exact(run_config(*overrides, "backend.name=simulate"))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("model=roberta-large", "method=full", "workload.batch_size=32", "model.attn_implementation=eager"),
    ("model=t5-small", "method=lora_recompute", "workload.seq_len=256", "workload.batch_size=8"),  # recompute in T5
    ("model=llama-7b", "method=lora_fa", "train.precision=bf16", "workload.seq_len=512", "workload.batch_size=4",
     "method.adapter_dtype=base"),
])
def test_walk_is_exact_on_paper_sizes_slow(overrides):
    _exact(run_config(*overrides, "backend.name=simulate"))


# -- API ---------------------------------------------------------------------------------------------------
def test_estimate_config_reads_a_result_config():
    run = tiny("tiny-t5", "lora_recompute", backend="simulate")
    stored = recorded_config(run, "simulate")
    stored["backend"].pop("fake_device")  # a result may lack backend keys
    assert estimate_config(stored) == estimate(run)


def test_lora_fa_minimum_is_below_what_lora_fa_saves():
    for model in ("tiny-roberta", "tiny-t5", "tiny-llama"):
        result = estimate(tiny(model, "lora_fa", backend="simulate"))
        assert isinstance(result, ActivationEstimate)
        assert 0 < result.lora_fa_minimum_bytes < result.saved_bytes
    # A full run reports the same minimum as LoRA-FA at the default rank.
    full = estimate(tiny("tiny-llama", "full", backend="simulate"))
    assert full.lora_fa_minimum_bytes == estimate(tiny("tiny-llama", "lora_fa", backend="simulate")).lora_fa_minimum_bytes


def test_recompute_keeps_only_checkpoint_inputs_inside_blocks():
    result = estimate(tiny("tiny-llama", "lora_fa_recompute", backend="simulate"))
    n, h, layers = 2 * 16, 64, 2
    assert result.terms["checkpoint_inputs"] == layers * n * h * 4
    for term in ("attention", "mlp", "adapter_rank_intermediates"):
        assert result.terms[term] == 0


def test_estimate_is_a_dataclass_of_integers():
    result = estimate(tiny("tiny-roberta", "lora", backend="simulate"))
    for value in dataclasses.astuple(result)[:2] + (result.lora_fa_minimum_bytes,):
        assert isinstance(value, int)
    assert all(isinstance(v, int) for v in result.terms.values())
