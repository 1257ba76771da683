"""QLoRA, QDoRA and DoRA: bitsandbytes' and PEFT's own layers, simulated exactly.

* simulate equals real CPU execution (bitsandbytes' CPU kernels) byte for byte, as in test_simulate;
* a 4-bit layer's bytes are the packed weight plus its statistics, counted by hand from the shapes;
* CUDA's 4-bit matmul fallback (more than 1536 rows) allocates its dequantised weight, and no more;
* DoRA keeps more per adapted layer than LoRA, and LoRA-FA still saves on a 4-bit base;
* bad input fails before any model is built, naming the value and what is accepted.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import run_config, tiny
from membench.allocator import allocator_bytes
from membench.errors import ConfigError
from membench.plan import plan
from membench.runner import build, measure
from test_simulate import assert_simulate_equals_cpu

bnb = pytest.importorskip("bitsandbytes")

CASES = [
    ("qlora", ()),
    ("qlora_fa", ("train.precision=bf16",)),
    ("qdora", ("train.precision=bf16",)),
    ("dora", ()),
    ("qlora_fa_recompute", ("model.quantization=fp4", "model.double_quant=false")),
    ("qlora", ("train.precision=bf16", "model.prepare_kbit_training=true")),
    ("qlora_fa", ("model.quantization=int8",)),
    # 8 x 256 = 2048 rows: CUDA's 4-bit matmul takes its dequantise-then-linear fallback
    ("qlora", ("train.precision=bf16", "workload.batch_size=8", "workload.seq_len=256")),
]


@pytest.mark.parametrize(("method", "extra"), CASES, ids=lambda case: "-".join(case) if isinstance(case, tuple) else case)
def test_simulate_equals_cpu(method, extra):
    real = measure(tiny("tiny-llama", method, *extra, backend="cpu"))
    simulated = measure(tiny("tiny-llama", method, *extra, backend="simulate"))
    assert_simulate_equals_cpu(real, simulated)
    assert simulated.metrics["ctx_kept_bytes_by_function"] == real.metrics["ctx_kept_bytes_by_function"]


def _four_bit_layer_bytes(out_features: int, in_features: int, double_quant: bool) -> int:
    """A 4-bit layer's allocations, from bitsandbytes' format (block size 64, functional.quantize_4bit)."""
    blocks = math.ceil(out_features * in_features / 64)
    packed = allocator_bytes(out_features * in_features // 2)
    code = allocator_bytes(16 * 4)  # the 4-bit type's 16 fp32 values
    if not double_quant:
        return packed + code + allocator_bytes(blocks * 4)  # one fp32 absmax per block
    # uint8 absmax per block, then the second level over blocks of 256: fp32 absmax, 256-entry fp32 code, offset
    second = allocator_bytes(math.ceil(blocks / 256) * 4) + allocator_bytes(256 * 4) + allocator_bytes(4)
    return packed + code + allocator_bytes(blocks) + second


@pytest.mark.parametrize("double_quant", [True, False])
def test_four_bit_weight_bytes_are_the_packed_weight_and_its_statistics(double_quant):
    run = tiny("tiny-llama", "qlora", f"model.double_quant={str(double_quant).lower()}", backend="simulate")
    result = measure(run)
    the_plan = plan(run)
    expected = 0
    for name, module in the_plan.meta_model.named_modules():
        if isinstance(module, torch.nn.Linear) and name in {layer.name for layer in the_plan.adapted}:
            expected += _four_bit_layer_bytes(module.out_features, module.in_features, double_quant)
    # Everything else (embeddings, norms, the unquantised head, the adapters) as the plain LoRA run has it.
    lora = measure(tiny("tiny-llama", "lora", backend="simulate"))
    dense = sum(allocator_bytes(module.weight.numel() * 4) for name, module in the_plan.meta_model.named_modules()
                if isinstance(module, torch.nn.Linear) and name in {layer.name for layer in the_plan.adapted})
    assert result.metrics["weight_bytes"] == lora.metrics["weight_bytes"] - dense + expected
    assert result.metrics["total_params"] == lora.metrics["total_params"]  # two 4-bit weights per byte


def test_cuda_fallback_allocates_the_dequantised_weight():
    """Above 1536 rows the forward holds an [N, K] weight in the input dtype (plus two fp32 absmax copies)."""
    from membench.backends.quantized_kernels import CUDA_FUSED_MAX_ROWS, Gemm4bitAsOnCuda
    from membench.backends.tracker import AllocationTracker

    from membench.quantization import state_tensors

    def state_tensors_of(param):
        return state_tensors(torch.nn.ParameterList([param]))

    weight = torch.randn(256, 128, dtype=torch.bfloat16)
    packed = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
    blocks = weight.numel() // 64

    def peak_over_output(rows: int, emulate: bool) -> int:
        x = torch.randn(rows, 128, dtype=torch.bfloat16)
        tracker = AllocationTracker("cpu")
        for tensor in (x, packed, *state_tensors_of(packed)):
            tracker.track(tensor)
        before = tracker.allocated
        with tracker:
            if emulate:
                with Gemm4bitAsOnCuda():
                    out = bnb.matmul_4bit(x, packed, quant_state=packed.quant_state)
            else:
                out = bnb.matmul_4bit(x, packed, quant_state=packed.quant_state)
        return tracker.peak - before - allocator_bytes(out.numel() * out.element_size())

    temporaries = allocator_bytes(weight.numel() * 2) + 2 * allocator_bytes(blocks * 4)
    assert peak_over_output(CUDA_FUSED_MAX_ROWS + 1, emulate=True) == temporaries
    assert peak_over_output(CUDA_FUSED_MAX_ROWS + 1, emulate=False) == 0
    assert peak_over_output(CUDA_FUSED_MAX_ROWS, emulate=True) == 0  # the fused kernel: the output only


def test_dora_keeps_more_than_lora_and_lora_fa_still_saves_on_a_four_bit_base():
    results = {method: measure(tiny("tiny-llama", method, "train.precision=bf16", backend="simulate")).metrics
               for method in ("lora", "dora", "qlora", "qlora_fa", "qdora")}
    assert results["dora"]["saved_tensor_bytes"] > results["lora"]["saved_tensor_bytes"]
    assert results["qdora"]["saved_tensor_bytes"] > results["qlora"]["saved_tensor_bytes"]
    assert results["qlora_fa"]["saved_tensor_bytes"] < results["qlora"]["saved_tensor_bytes"]
    assert results["qlora"]["weight_bytes"] < results["lora"]["weight_bytes"]
    # A 4-bit base changes what the base layers keep, not what LoRA keeps: saved bytes equal LoRA's.
    assert results["qlora"]["saved_tensor_bytes"] == results["lora"]["saved_tensor_bytes"]


def test_int8_matmul_input_is_kept_as_a_ctx_attribute():
    """LLM.int8()'s matmul keeps its input as ``ctx.A``: invisible to saved-tensor hooks, counted by name."""
    result = measure(tiny("tiny-llama", "qlora_fa", "model.quantization=int8", backend="simulate")).metrics
    kept = result["ctx_kept_bytes_by_function"]
    assert kept and all(name.startswith("MatMul8bit") for name in kept)
    assert result["activation_bytes"] >= result["saved_tensor_bytes"] + sum(kept.values())


def test_quantized_model_builds_bitsandbytes_layers():
    run = tiny("tiny-llama", "qlora", backend="simulate")
    from membench.backends import create_backend

    model, _ = build(plan(run), create_backend(run.backend))
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == len(plan(run).adapted)  # every block linear; the head stays unquantised
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)


def test_t5_keeps_its_fp32_modules_unquantised_as_transformers_loader_does():
    """T5's ``_keep_in_fp32_modules`` (``wo``): its forward casts the input to the weight's dtype, uint8 if 4-bit."""
    run = tiny("tiny-t5", "qlora", "train.precision=bf16", backend="simulate")
    from membench.backends import create_backend

    model, _ = build(plan(run), create_backend(run.backend))
    four_bit = [name for name, layer in model.named_modules() if isinstance(layer, bnb.nn.Linear4bit)]
    assert any(".DenseReluDense.wi" in name for name in four_bit)
    assert not any(".DenseReluDense.wo" in name for name in four_bit)
    assert_simulate_equals_cpu(measure(tiny("tiny-t5", "qlora", "train.precision=bf16", backend="cpu")), measure(run))


def test_a_quantised_classifier_head_is_a_clear_error_and_skipping_it_runs():
    """transformers' loader quantises RoBERTa's classifier, which PEFT then trains in full: named before any build."""
    with pytest.raises(ConfigError, match=r"quantises classifier\.dense, classifier\.out_proj, .*"
                                          r"model\.quantization_skip_modules=\[classifier\]"):
        plan(tiny("tiny-roberta", "qlora", backend="simulate"))
    skip = "model.quantization_skip_modules=[classifier]"
    simulated = measure(tiny("tiny-roberta", "qlora", skip, backend="simulate"))
    assert_simulate_equals_cpu(measure(tiny("tiny-roberta", "qlora", skip, backend="cpu")), simulated)
    assert simulated.metrics["trainable_params"] > 0


@pytest.mark.parametrize(("overrides", "expected"), [
    (["method=full", "model.quantization=nf4"], "method.kind=full needs model.quantization=none"),
    (["method=qlora", "model.quantization=nf8"], "model.quantization='nf8' is not supported; choose one of: none, nf4"),
    (["method=qlora", "train.precision=bf16", "model.compute_dtype=fp16"],
     "model.compute_dtype=fp16 contradicts train.precision=bf16"),
    (["method=lora", "model.prepare_kbit_training=true"], "prepares a quantised base"),
    (["method=qlora", "model.quantization=int8", "model.compute_dtype=bf16"], "4-bit knobs"),
    (["method=full", "method.dora=true"], "method.kind=full has none"),
    (["method=lora", "model.quantization_skip_modules=[lm_head]"], "names what a quantised base leaves unquantised"),
])
def test_bad_input_is_named(overrides, expected):
    with pytest.raises(ConfigError) as error:
        run_config("model=tiny-llama", *overrides)
    assert expected in str(error.value)


def test_missing_bitsandbytes_is_a_clear_error_before_any_model(monkeypatch):
    import sys

    import membench.runner

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # "import bitsandbytes" raises ImportError
    monkeypatch.setattr(membench.runner, "build", lambda *args: pytest.fail("a model was built"))
    with pytest.raises(ConfigError, match="model.quantization=nf4 needs bitsandbytes.*use model.quantization=none"):
        run_config("model=tiny-llama", "method=qlora")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dora_extra_saved_bytes_per_layer_match_the_reported_count(precision):
    """One adapted layer: DoRA keeps M*N*(base + adapter bytes) + 2*N*adapter bytes more than LoRA."""
    from membench.report.quantized import dora_extra_saved_bytes

    extra = ["model.hf_config.num_hidden_layers=1", "method.target_modules=[q_proj]", f"train.precision={precision}"]
    lora = measure(tiny("tiny-llama", "lora", *extra, backend="simulate")).metrics
    dora = measure(tiny("tiny-llama", "dora", *extra, backend="simulate")).metrics
    tokens, out_features = 2 * 16, 64  # conftest's TINY_WORKLOAD; tiny-llama's q_proj
    base_bytes = 4 if precision == "fp32" else 2
    assert dora["saved_tensor_bytes"] - lora["saved_tensor_bytes"] == dora_extra_saved_bytes(
        tokens, out_features, base_bytes, adapter_bytes=4)


def test_dora_on_a_layer_peft_refuses_is_a_clear_error(monkeypatch):
    """PEFT decides what its DoRA supports; the plan asks it on meta and names the refusal."""
    from peft.tuners.lora import layer

    def refuse(self, *args, **kwargs):
        raise ValueError(f"{type(self).__name__} does not support DoRA (yet), please set use_dora to False")

    monkeypatch.setattr(layer.Linear, "__init__", refuse)
    with pytest.raises(ConfigError, match=r"method.dora=true: PEFT's DoRA does not support .*Linear does not support"):
        plan(tiny("tiny-llama", "dora", backend="simulate"))
