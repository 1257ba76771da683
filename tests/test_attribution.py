"""Saved-tensor attribution: by module and by op, each summing to the saved total, equal on simulate and cpu."""

from __future__ import annotations

import json
from collections import OrderedDict

import pandas as pd
import pytest
import torch

from conftest import TINY_MODELS, tiny
from membench.attribution import AttributionError, compare, module_label, top_findings
from membench.results import read_result, write_result
from membench.runner import measure
from membench.saved_tensors import BEFORE_FORWARD, OpOrigins, SavedTensorCounter, module_pattern

METHODS = ["full", "lora", "lora_fa", "lora_recompute"]
FIELDS = ("saved_bytes_by_module", "saved_tensors_by_module", "saved_bytes_by_op", "saved_tensors_by_op",
          "saved_bytes_by_module_op")

_cache: dict[tuple, object] = {}


def run(model: str, method: str, *extra: str, backend: str = "cpu"):
    """One measurement per configuration for the whole module (they take about a second each)."""
    key = (model, method, extra, backend)
    if key not in _cache:
        _cache[key] = measure(tiny(model, method, *extra, backend=backend))
    return _cache[key]


def check_sums(metrics: dict) -> None:
    total = metrics["saved_tensor_bytes"]
    assert total > 0
    assert sum(metrics["saved_bytes_by_module"].values()) == total
    assert sum(metrics["saved_bytes_by_op"].values()) == total
    assert sum(sum(ops.values()) for ops in metrics["saved_bytes_by_module_op"].values()) == total
    assert sum(metrics["saved_tensors_by_module"].values()) == sum(metrics["saved_tensors_by_op"].values())
    assert set(metrics["saved_tensors_by_module"]) == set(metrics["saved_bytes_by_module"])
    for module, ops in metrics["saved_bytes_by_module_op"].items():
        assert sum(ops.values()) == metrics["saved_bytes_by_module"][module]
    for field in FIELDS[:4]:
        assert all(isinstance(value, int) for value in metrics[field].values()), field


@pytest.mark.parametrize("backend", ["cpu", "simulate"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_attribution_sums_to_the_saved_total(model, method, backend):
    result = run(model, method, backend=backend)
    assert result.status.state == "ok"
    check_sums(result.metrics)
    # Layer indices are collapsed: one key per module pattern, not one per layer.
    assert not any(part.isdigit() for key in result.metrics["saved_bytes_by_module"] for part in key.split("."))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", TINY_MODELS)
def test_simulate_and_cpu_attribute_alike(model, method):
    real = run(model, method, backend="cpu").metrics
    simulated = run(model, method, backend="simulate").metrics
    for field in FIELDS:
        assert simulated[field] == real[field], field


@pytest.mark.parametrize("extra", [(), ("train.precision=bf16",), ("method.lora_dropout=0.1",),
                                   ("model.attn_implementation=eager",)], ids=lambda e: "-".join(e) or "fp32")
def test_simulate_and_cpu_attribute_alike_in_other_numerics(extra):
    real = run("tiny-llama", "lora", *extra, backend="cpu").metrics
    simulated = run("tiny-llama", "lora", *extra, backend="simulate").metrics
    check_sums(real)
    for field in FIELDS:
        assert simulated[field] == real[field], field


@pytest.mark.parametrize("model", TINY_MODELS)
def test_lora_keeps_more_than_lora_fa_only_in_lora_a(model):
    """Freezing A means A's input X is no longer saved; nothing else changes."""
    lora = run(model, "lora", backend="simulate").metrics
    lora_fa = run(model, "lora_fa", backend="simulate").metrics
    extra = lora["saved_tensor_bytes"] - lora_fa["saved_tensor_bytes"]
    assert extra > 0
    modules = set(lora["saved_bytes_by_module"]) | set(lora_fa["saved_bytes_by_module"])
    difference = {m: lora["saved_bytes_by_module"].get(m, 0) - lora_fa["saved_bytes_by_module"].get(m, 0)
                  for m in modules}
    changed = {m: d for m, d in difference.items() if d}
    assert changed and all(".lora_A." in m or m.endswith(".lora_A") for m in changed), changed
    assert sum(changed.values()) == extra
    assert all(".lora_A" not in m for m in lora_fa["saved_bytes_by_module"])  # a frozen A saves nothing


def test_bf16_lora_saves_fp32_copies_of_x_in_lora_a():
    """PEFT's fp32 adapters on a bf16 model: each adapted layer keeps its own fp32 copy of X for A's gradient."""
    lora = run("tiny-llama", "lora", "train.precision=bf16", backend="simulate").metrics
    lora_fa = run("tiny-llama", "lora_fa", "train.precision=bf16", backend="simulate").metrics
    table = compare({"metrics": lora, "run_id": "lora"}, {"metrics": lora_fa, "run_id": "lora_fa"}, by="op")
    copies = table.set_index("op").loc["aten._to_copy"]
    assert copies["difference"] == lora["saved_tensor_bytes"] - lora_fa["saved_tensor_bytes"]
    q_proj = "base_model.model.model.layers.*.self_attn.q_proj.lora_A.default"
    assert lora["saved_bytes_by_module_op"][q_proj] == {"aten._to_copy": lora["saved_bytes_by_module"][q_proj]}
    assert lora["saved_tensors_by_module"][q_proj] == 2  # tiny-llama: one fp32 copy per layer, 2 layers
    batch, seq, hidden = 2, 16, 64
    assert lora["saved_bytes_by_module"][q_proj] == 2 * batch * seq * hidden * 4


def test_batch_tensors_are_before_forward():
    """Full fine-tuning trains the embedding, whose backward keeps the input ids: made before forward."""
    metrics = run("tiny-llama", "full", backend="simulate").metrics
    assert metrics["saved_bytes_by_op"][BEFORE_FORWARD] == 2 * 16 * 8  # int64 input_ids


def test_module_pattern():
    assert module_pattern("model.layers.31.mlp.down_proj") == "model.layers.*.mlp.down_proj"
    assert module_pattern("encoder.block.0.layer.1.DenseReluDense") == "encoder.block.*.layer.*.DenseReluDense"
    assert module_pattern("h.10a.x") == "h.10a.x"
    assert module_pattern("") == "(root)"
    assert module_label("base_model.model.model.layers.*.self_attn.q_proj.lora_A.default") == \
        "model.layers.*.self_attn.q_proj.lora_A"
    assert module_label("base_model.model") == "(root)"
    assert module_label("base_model.model.classifier.modules_to_save.default.dense") == "classifier.modules_to_save.dense"


def test_op_origins_dispatch_mode_attributes_real_tensors():
    """The cuda backend's way (no allocator model): a dispatch mode remembers which op made each storage."""
    model = torch.nn.Sequential(OrderedDict(inp=torch.nn.Linear(8, 8), act=torch.nn.GELU(), out=torch.nn.Linear(8, 2)))
    inputs = torch.randn(4, 8)
    counter = SavedTensorCounter(list(model.parameters()), model)
    with OpOrigins() as origins, counter.counting(origins.origin):
        model(inputs.view(4, 8).t().t()).sum()  # views of the input made no storage
    size = 4 * 8 * 4
    # Linear saves its input (for the weight gradient); GELU saves its input, the first addmm's output.
    assert counter.by_op() == ({"(before forward)": size, "aten.addmm": size, "aten.gelu": size},
                               {"(before forward)": 1, "aten.addmm": 1, "aten.gelu": 1})
    assert counter.by_module()[0] == {"act": size, "inp": size, "out": size}
    assert counter.by_module_and_op() == {"act": {"aten.addmm": size}, "inp": {BEFORE_FORWARD: size},
                                          "out": {"aten.gelu": size}}
    assert counter.total_bytes == 3 * size


def test_counting_leaves_no_module_hooks_behind():
    from torch.nn.modules import module as module_module

    before = (len(module_module._global_forward_pre_hooks), len(module_module._global_forward_hooks))
    run("tiny-roberta", "lora", backend="simulate")
    assert (len(module_module._global_forward_pre_hooks), len(module_module._global_forward_hooks)) == before


def test_compare_and_top_findings():
    lora = run("tiny-llama", "lora", "train.precision=bf16", backend="simulate").to_dict()
    lora_fa = run("tiny-llama", "lora_fa", "train.precision=bf16", backend="simulate").to_dict()
    table = compare(lora, lora_fa)
    assert list(table.columns) == ["module", "bytes_a", "bytes_b", "difference", "tensors_a", "tensors_b"]
    assert table["bytes_a"].sum() == lora["metrics"]["saved_tensor_bytes"]
    assert table["bytes_b"].sum() == lora_fa["metrics"]["saved_tensor_bytes"]
    assert (table["difference"] == table["bytes_a"] - table["bytes_b"]).all()
    assert table["difference"].abs().is_monotonic_decreasing
    assert all(pd.api.types.is_integer_dtype(table[c]) for c in table.columns[1:])
    assert table.loc[0, "module"].endswith(".lora_A") and table.loc[0, "module"].startswith("model.layers.*.")
    assert table.attrs["a"] == lora["run_id"]

    by_op = compare(lora, lora_fa, by="op")
    assert by_op.loc[0, "op"] == "aten._to_copy"

    findings = top_findings(lora, lora_fa, n=3)
    assert len(findings) == 3
    first = findings[0]
    assert first.startswith("LoRA keeps ") and "more than LoRA-FA in `layers.*." in first
    assert "lora_A`" in first and "aten._to_copy" in first and "fp32 copy of X" in first
    assert "2 tensors × " in first  # tiny-llama has 2 layers
    assert "KiB" in first  # display units only in sentences

    reverse = top_findings(lora_fa, lora, n=1)
    assert reverse[0].startswith("LoRA keeps ")  # the run that keeps more is the subject either way

    same = top_findings(lora, lora)
    assert len(same) == 1 and "save the same" in same[0]


def test_compare_reads_result_files(tmp_path):
    lora = run("tiny-t5", "lora", backend="simulate")
    lora_fa = run("tiny-t5", "lora_fa", backend="simulate")
    loaded = [json.loads(write_result(r, tmp_path).read_text()) for r in (lora, lora_fa)]
    table = compare(*loaded)
    assert table["difference"].sum() == lora.metrics["saved_tensor_bytes"] - lora_fa.metrics["saved_tensor_bytes"]
    assert compare(lora, lora_fa).equals(table)  # Result objects work too
    assert top_findings(*loaded)[0].startswith("LoRA keeps ")


def test_old_result_files_load_but_cannot_be_compared(tmp_path):
    result = run("tiny-llama", "lora_fa", backend="simulate")
    data = result.to_dict()
    for field in FIELDS:
        del data["metrics"][field]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    old = read_result(path)
    assert old.metrics["saved_tensor_bytes"] == result.metrics["saved_tensor_bytes"]
    with pytest.raises(AttributionError, match="has no saved-tensor attribution by module.*force=true"):
        compare(data, result.to_dict())
    with pytest.raises(ValueError, match="by='layer'"):
        compare(result.to_dict(), result.to_dict(), by="layer")
