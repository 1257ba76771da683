"""membench.compat: each patch is applied and undone, does what it is for, and fails loudly when its target moves."""

from __future__ import annotations

import pickle
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import masking_utils

from membench import compat
from membench.compat import CompatError, installed_version

TORCH = installed_version("torch")
TRANSFORMERS = installed_version("transformers")


def loud(package: str, version: str, *fragments: str, need: str = "") -> str:
    """A pytest ``match`` pattern: the package, its version, what changed, and what membench needs it for."""
    found = "".join(".*" + re.escape(fragment) for fragment in fragments)
    return re.escape(f"{package} {version} ") + found + ".*membench needs it" + (".*" + re.escape(need) if need else "")


def test_every_target_is_as_expected_on_the_installed_versions():
    assert compat.check_all() == list(compat.CHECKS)
    assert len(compat.CHECKS) == 19


def test_check_all_lists_every_failure_at_once(monkeypatch):
    monkeypatch.setattr(F, "dropout", lambda x: x)
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda ids, extra: None)
    with pytest.raises(CompatError, match=f"2 of {len(compat.CHECKS)} patch targets changed") as caught:
        compat.check_all()
    assert "route_dropout_and_sdpa_like_cuda: torch" in str(caught.value)
    assert "no_packed_sequences: transformers" in str(caught.value)


# --- route_dropout_and_sdpa_like_cuda ----------------------------------------------------------------------

def marked(name):
    """A replacement factory whose product says what it replaced."""
    def make(original):
        def replacement(*args, **kwargs):
            return name, original
        return replacement
    return make


def test_routing_swaps_both_functions_and_restores_them_even_after_an_error():
    original = (F.dropout, F.scaled_dot_product_attention)
    with pytest.raises(KeyError):
        with compat.route_dropout_and_sdpa_like_cuda(marked("dropout"), marked("sdpa")):
            # the replacements are in place and were handed the originals to fall back on
            assert F.dropout(torch.ones(1)) == ("dropout", original[0])
            assert F.scaled_dot_product_attention(None, None, None) == ("sdpa", original[1])
            raise KeyError("boom")
    assert (F.dropout, F.scaled_dot_product_attention) == original


def test_routing_makes_cpu_dropout_keep_a_bool_mask():
    """The effect that matters: under CudaSemantics, which routes through compat, dropout saves 1 B per element."""
    from membench.backends.cuda_semantics import CudaSemantics
    from membench.saved_tensors import SavedTensorCounter

    x = torch.randn(1000, requires_grad=True)
    counts = {}
    for label, context in (("cpu", torch.autograd.grad_mode.enable_grad()), ("routed", CudaSemantics())):
        counter = SavedTensorCounter([])
        with context, counter.counting():
            F.dropout(x, 0.5)
        counts[label] = counter.total_bytes
    assert counts == {"cpu": 1000 * 4, "routed": 1000}


@pytest.mark.parametrize(("target", "replacement", "fragments"), [
    ("dropout", lambda input, p: input, ["torch.nn.functional.dropout with (input, p), not",
                                         "(input, p, training, inplace)"]),
    ("dropout", None, ["has no torch.nn.functional.dropout(input, p, training, inplace)"]),
    ("scaled_dot_product_attention", lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
     scale=None, enable_gqa=False, block_mask=None: None,
     ["scaled_dot_product_attention with (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, "
      "block_mask)"]),
])
def test_routing_refuses_changed_functions(monkeypatch, target, replacement, fragments):
    monkeypatch.setattr(F, target, replacement)
    before = getattr(F, target)
    with pytest.raises(CompatError, match=loud("torch", TORCH, *fragments)):
        with compat.route_dropout_and_sdpa_like_cuda(marked("dropout"), marked("sdpa")):
            pass
    assert getattr(F, target) is before  # nothing was swapped


@pytest.mark.parametrize(("op", "stand_in", "fragment"), [
    ("_safe_softmax", None, "has no op aten._safe_softmax(self, dim, dtype)"),
    ("_scaled_dot_product_flash_attention_for_cpu", types.SimpleNamespace(default=torch.ops.aten.mm.default),
     "has aten._scaled_dot_product_flash_attention_for_cpu(self, mat2), not"),
])
def test_routing_refuses_a_missing_or_changed_kernel(monkeypatch, op, stand_in, fragment):
    monkeypatch.setattr(torch.ops.aten, op, stand_in)
    with pytest.raises(CompatError, match=loud("torch", TORCH, fragment)):
        compat.check_dropout_and_sdpa_routing()


def test_kernel_wrappers_call_the_kernels_they_name():
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, 5, 4) for _ in range(3))
    output, logsumexp = compat.cpu_flash_attention(query, key, value, False, None, None)
    scores = query @ key.transpose(-2, -1) / 2  # scale 1/sqrt(4)
    torch.testing.assert_close(output, scores.softmax(-1) @ value)
    torch.testing.assert_close(logsumexp, scores.logsumexp(-1))
    grad = torch.randn_like(output)
    grads = compat.cpu_flash_attention_backward(grad, query, key, value, output, logsumexp, False, None, None)
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    reference = (inputs[0] @ inputs[1].transpose(-2, -1) / 2).softmax(-1) @ inputs[2]
    for got, want in zip(grads, torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(got, want)
    masked = torch.tensor([[0.0, float("-inf")], [float("-inf"), float("-inf")]])
    assert compat.safe_softmax(masked, -1).tolist() == [[1.0, 0.0], [0.0, 0.0]]  # a fully masked row: zeros
    assert compat.math_sdp_reduces_in_half_precision() is torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()


# --- route_layer_norm_and_softmax_like_cuda ----------------------------------------------------------------

def test_norm_routing_swaps_both_functions_and_restores_them_even_after_an_error():
    original = (F.layer_norm, F.softmax)
    with pytest.raises(KeyError):
        with compat.route_layer_norm_and_softmax_like_cuda(marked("layer_norm"), marked("softmax")):
            assert F.layer_norm(torch.ones(1), [1]) == ("layer_norm", original[0])
            assert F.softmax(torch.ones(1), 0) == ("softmax", original[1])
            raise KeyError("boom")
    assert (F.layer_norm, F.softmax) == original


def test_norm_routing_makes_half_layer_norm_keep_fp32_statistics_and_autocast_softmax_fp32():
    """The effect that matters, under CudaSemantics (which routes through compat)."""
    from membench.backends.cuda_semantics import CudaSemantics
    from membench.saved_tensors import SavedTensorCounter

    x = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    scores = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    counts = {}
    for label, context in (("cpu", torch.autograd.grad_mode.enable_grad()), ("routed", CudaSemantics())):
        counter = SavedTensorCounter([])
        with context, counter.counting():
            # Keep both outputs and their graphs alive, as a real forward does until backward: storage keys
            # are unique only among live storages, and a freed output's address may be reused by the next.
            outputs = [F.layer_norm(x, [8])]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs.append(F.softmax(scores, -1))
        counts[label] = counter.total_bytes
        del outputs
    # input (160 B) + mean and rstd (10 rows each), then the softmax output (80 elements)
    assert counts == {"cpu": 160 + 2 * 10 * 2 + 80 * 2, "routed": 160 + 2 * 10 * 4 + 80 * 4}


@pytest.mark.parametrize(("target", "replacement", "fragments"), [
    ("layer_norm", lambda input, normalized_shape, weight=None, bias=None, eps=1e-5, elementwise=True: input,
     ["torch.nn.functional.layer_norm with (input, normalized_shape, weight, bias, eps, elementwise), not",
      "(input, normalized_shape, weight, bias, eps)"]),
    ("softmax", None, ["has no torch.nn.functional.softmax(input, dim, _stacklevel, dtype)"]),
])
def test_norm_routing_refuses_changed_functions(monkeypatch, target, replacement, fragments):
    monkeypatch.setattr(F, target, replacement)
    before = getattr(F, target)
    with pytest.raises(CompatError, match=loud("torch", TORCH, *fragments, need="LayerNorm")):
        with compat.route_layer_norm_and_softmax_like_cuda(marked("layer_norm"), marked("softmax")):
            pass
    assert getattr(F, target) is before  # nothing was swapped


@pytest.mark.parametrize(("op", "stand_in", "fragment"), [
    ("native_layer_norm", None, "has no op aten.native_layer_norm(input, normalized_shape, weight, bias, eps)"),
    ("native_layer_norm_backward", types.SimpleNamespace(default=torch.ops.aten.mm.default),
     "has aten.native_layer_norm_backward(self, mat2), not"),
])
def test_norm_routing_refuses_a_missing_or_changed_kernel(monkeypatch, op, stand_in, fragment):
    monkeypatch.setattr(torch.ops.aten, op, stand_in)
    with pytest.raises(CompatError, match=loud("torch", TORCH, fragment)):
        compat.check_layer_norm_and_softmax_routing()


def test_layer_norm_wrappers_call_the_kernels_they_name():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 6), torch.randn(6), torch.randn(6)
    output, mean, rstd = compat.layer_norm_forward(x, [6], weight, bias, 1e-5)
    torch.testing.assert_close(output, F.layer_norm(x, [6], weight, bias, 1e-5))
    torch.testing.assert_close(mean, x.mean(-1, keepdim=True))
    torch.testing.assert_close(rstd, (x.var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt())
    grad = torch.randn_like(output)
    grads = compat.layer_norm_backward(grad, x, [6], mean, rstd, weight, bias, [True, True, True])
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
    reference = F.layer_norm(inputs[0], [6], inputs[1], inputs[2], 1e-5)
    for got, want in zip(grads, torch.autograd.grad(reference, inputs, grad), strict=True):
        torch.testing.assert_close(got, want)


# --- no_packed_sequences ----------------------------------------------------------------------------------

def test_no_packed_sequences_answers_none_and_restores_even_after_an_error():
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])  # two sequences packed in one row
    original = masking_utils.find_packed_sequence_indices
    assert original(packed) is not None  # transformers sees the packing
    with pytest.raises(KeyError):
        with compat.no_packed_sequences():
            assert masking_utils.find_packed_sequence_indices(packed) is None
            raise KeyError("boom")
    assert masking_utils.find_packed_sequence_indices is original


@pytest.mark.parametrize(("replacement", "fragment"), [
    (None, "has no masking_utils.find_packed_sequence_indices(position_ids)"),
    (lambda position_ids, cu_seqlens: None, "has masking_utils.find_packed_sequence_indices with "
                                            "(position_ids, cu_seqlens), not"),
])
def test_no_packed_sequences_refuses_a_missing_or_changed_check(monkeypatch, replacement, fragment):
    """The old code did nothing when the function was missing; now it says so."""
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", replacement)
    with pytest.raises(CompatError, match=loud("transformers", TRANSFORMERS, fragment, need="packed-sequence check")):
        with compat.no_packed_sequences():
            pass
    assert masking_utils.find_packed_sequence_indices is replacement


def test_no_packed_sequences_refuses_when_transformers_stops_calling_it_by_name(monkeypatch):
    for name, value in list(vars(masking_utils).items()):
        if isinstance(value, types.FunctionType) and "find_packed_sequence_indices" in value.__code__.co_names:
            monkeypatch.setattr(masking_utils, name, lambda *args, **kwargs: None)
    with pytest.raises(CompatError, match=loud("transformers", TRANSFORMERS, "no longer calls")):
        compat.checked_masking_utils()


# --- storage_id, when_storage_freed ------------------------------------------------------------------------

def test_storage_id_is_shared_by_views_and_distinct_between_storages():
    x, y = torch.zeros(16), torch.zeros(16)
    assert compat.storage_id(x[4:].view(3, 4).untyped_storage()) == compat.storage_id(x.untyped_storage())
    assert compat.storage_id(x.untyped_storage()) != compat.storage_id(y.untyped_storage())


def test_when_storage_freed_fires_once_when_the_last_view_dies():
    freed = []
    x = torch.zeros(16)
    view = x[2:]
    compat.when_storage_freed(x.untyped_storage(), freed.append, "x")
    del x
    assert freed == []  # the view still holds the storage
    del view
    assert freed == ["x"]


def test_storage_checks_fail_loudly():
    with pytest.raises(CompatError, match=loud("torch", TORCH, "has no UntypedStorage._cdata")):
        compat.storage_id(object())
    with pytest.raises(CompatError, match=loud("torch", TORCH, "storages take no weak references")):
        compat.when_storage_freed(1, print)


# --- op_returns_alias --------------------------------------------------------------------------------------

def test_op_returns_alias_tells_views_and_inplace_ops_from_new_storage():
    aten = torch.ops.aten
    assert [compat.op_returns_alias(op) for op in (aten.view.default, aten.add_.Tensor, aten.mm.default)] == [
        True, True, False]


def test_op_schema_check_fails_loudly(monkeypatch):
    monkeypatch.setattr(compat.torch_memory, "op_returns_alias", lambda op: False)
    with pytest.raises(CompatError, match=loud("torch", TORCH, "without alias_info")):
        compat.check_op_schema()


# --- global_module_forward_hooks ---------------------------------------------------------------------------

class Boom(nn.Module):
    def forward(self, x):
        raise KeyError("boom")


def test_global_hooks_see_every_forward_also_a_failing_one_and_are_removed():
    seen = []
    inner = nn.Linear(2, 2)
    with compat.global_module_forward_hooks(lambda m, a: seen.append(("in", type(m).__name__)),
                                            lambda m, a, o: seen.append(("out", type(m).__name__))):
        nn.Sequential(inner)(torch.zeros(1, 2))
        with pytest.raises(KeyError):
            Boom()(torch.zeros(1))
    assert seen == [("in", "Sequential"), ("in", "Linear"), ("out", "Linear"), ("out", "Sequential"),
                    ("in", "Boom"), ("out", "Boom")]
    inner(torch.zeros(1, 2))
    assert len(seen) == 6  # removed on exit


def test_global_hooks_refuse_a_registrar_without_always_call(monkeypatch):
    monkeypatch.setattr(nn.modules.module, "register_module_forward_hook", lambda hook: None)
    with pytest.raises(CompatError, match=loud("torch", TORCH, "register_module_forward_hook with (hook), not",
                                               "always_call")):
        with compat.global_module_forward_hooks(print, print):
            pass


# --- adamw_host_step_counters ------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "counters"), [({"foreach": False}, 2), ({"foreach": True}, 2),
                                                   ({"fused": True}, 0)])
def test_adamw_step_counters_are_found_unless_fused(options, counters):
    weights = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW(weights, **options)
    assert compat.adamw_host_step_counters(optimizer) == []  # no state before the first step
    for weight in weights:
        weight.grad = torch.ones_like(weight)
    optimizer.step()
    found = compat.adamw_host_step_counters(optimizer)
    assert len(found) == counters
    assert all(c is optimizer.state[w]["step"] and c.dim() == 0 for c, w in zip(found, weights))


def test_adamw_step_counters_refuse_a_changed_state(monkeypatch):
    weight = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(3)
    optimizer.step()
    optimizer.state[weight]["step"] = 1  # as if torch kept a Python int
    with pytest.raises(CompatError, match=loud("torch", TORCH, "optimizer.state[p]['step'] as int")):
        compat.adamw_host_step_counters(optimizer)
    del optimizer.param_groups[0]["capturable"]
    with pytest.raises(CompatError, match=loud("torch", TORCH, "param_groups without 'fused'/'capturable'")):
        compat.adamw_host_step_counters(optimizer)


def test_other_optimizers_have_no_host_counters():
    weight = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    optimizer.state[weight]["step"] = 3  # e.g. PEFT's LoRA-FA optimizer counts in an int
    assert compat.adamw_host_step_counters(optimizer) == []


# --- enable_activation_checkpointing -----------------------------------------------------------------------

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []


class CurrentModel(Model):
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
        self.calls.append(("activation_checkpointing_enable", activation_checkpointing_kwargs))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(("gradient_checkpointing_enable", gradient_checkpointing_kwargs))


class OlderModel(Model):
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.calls.append(("gradient_checkpointing_enable", gradient_checkpointing_kwargs))


@pytest.mark.parametrize(("model_class", "method"), [(CurrentModel, "activation_checkpointing_enable"),
                                                     (OlderModel, "gradient_checkpointing_enable")])
def test_activation_checkpointing_uses_the_current_name_and_non_reentrant(model_class, method):
    model = model_class()
    compat.enable_activation_checkpointing(model)
    assert model.calls == [(method, {"use_reentrant": False})]


def test_activation_checkpointing_turns_it_on_for_a_real_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert not model.is_gradient_checkpointing
    compat.enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing


def test_activation_checkpointing_refuses_a_model_without_either_method():
    with pytest.raises(CompatError, match=loud("transformers", TRANSFORMERS, "has no Model.activation_checkpointing")):
        compat.enable_activation_checkpointing(Model())


# --- record_cuda_memory_history ----------------------------------------------------------------------------

@pytest.fixture
def history(monkeypatch):
    """Stand-ins for torch's history API that log their calls (a CPU build records nothing)."""
    calls = []

    def record_memory_history(enabled="all", context="all", stacks="all", max_entries=0, clear_history=False):
        calls.append(("record", enabled, max_entries, clear_history))

    def dump_snapshot(filename="dump_snapshot.pickle"):
        calls.append(("dump", filename))
        with open(filename, "wb") as handle:
            pickle.dump({"segments": [], "device_traces": [[]]}, handle)

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record_memory_history)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump_snapshot)
    return calls


def test_history_is_recorded_dumped_and_stopped_even_after_an_error(history, tmp_path):
    with pytest.raises(KeyError):
        with compat.record_cuda_memory_history(123) as dump:
            dump(str(tmp_path / "s.pickle"))
            raise KeyError("boom")
    assert history == [("record", "all", 123, True), ("dump", str(tmp_path / "s.pickle")), ("record", None, 0, False)]
    assert pickle.loads((tmp_path / "s.pickle").read_bytes()) == {"segments": [], "device_traces": [[]]}


def test_history_without_clear_history_is_recorded_without_it(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", context="all", stacks="all", max_entries=0: calls.append(
                            (enabled, max_entries)))
    with compat.record_cuda_memory_history(5):
        pass
    assert calls == [("all", 5), (None, 0)]


@pytest.mark.parametrize(("name", "replacement", "fragment"), [
    ("_record_memory_history", lambda enabled=True: None, "_record_memory_history with (enabled), not"),
    ("_dump_snapshot", None, "has no torch.cuda.memory._dump_snapshot(filename)"),
])
def test_history_refuses_a_changed_api(monkeypatch, name, replacement, fragment):
    monkeypatch.setattr(torch.cuda.memory, name, replacement)
    with pytest.raises(CompatError, match=loud("torch", TORCH, fragment, need="allocator's history")):
        with compat.record_cuda_memory_history(5):
            pass


# --- checked_autograd_node_functions -----------------------------------------------------------------------

def test_autograd_node_functions_number_nodes_and_name_the_running_one():
    next_number, running = compat.checked_autograd_node_functions()
    first = next_number()
    x = torch.ones(2, requires_grad=True)
    y = (x * 2).sum()
    assert first <= y.grad_fn._sequence_nr() < next_number()
    assert running() is None  # outside backward
    seen = []
    x.register_hook(lambda grad: seen.append(running()))
    y.backward()
    assert seen and seen[0] is not None


@pytest.mark.parametrize("missing", ["_current_autograd_node", "_get_sequence_nr"])
def test_autograd_node_functions_fail_loudly_when_gone(monkeypatch, missing):
    owner = torch._C if missing == "_current_autograd_node" else torch._C._autograd
    monkeypatch.delattr(owner, missing)
    with pytest.raises(CompatError, match=loud("torch", TORCH, missing)):
        compat.checked_autograd_node_functions()


def test_quantising_on_meta_leaves_bitsandbytes_able_to_quantise_for_real():
    """The cached blockwise map must not stay on meta after a simulated (meta) double quantisation."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes import functional

    functional.name2qmap.pop("dynamic", None)  # as in a fresh process
    compat.quantization_maps_off_meta()
    meta = bnb.nn.Params4bit(torch.empty(64, 64, device="meta"), quant_type="nf4", compress_statistics=True)
    meta._quantize(torch.device("meta"))
    assert functional.name2qmap["dynamic"].device.type == "cpu"
    real = bnb.nn.Params4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True).to("cpu")
    assert real.quant_state.state2.code.device.type == "cpu"
    functional.name2qmap["dynamic"] = functional.name2qmap["dynamic"].to("meta")  # what the fix prevents
    with pytest.raises(NotImplementedError, match="meta"):
        bnb.nn.Params4bit(torch.randn(64, 64), quant_type="nf4", compress_statistics=True).to("cpu")
    compat.quantization_maps_off_meta()


# --- bitsandbytes_optimizer_as_on_cuda ---------------------------------------------------------------------

def test_eight_bit_layout_is_what_bitsandbytes_does():
    """The sizes read from bitsandbytes' source are the ones its optimizer allocates with (real CPU step)."""
    from bitsandbytes.optim import AdamW8bit

    layout = compat.eight_bit_layout()
    large, small = nn.Parameter(torch.zeros(layout.min_8bit_size + 1)), nn.Parameter(torch.zeros(3))
    optimizer = AdamW8bit([large, small])
    for weight in (large, small):
        weight.grad = torch.ones_like(weight)
    optimizer.step()
    state = optimizer.state[large]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert state["absmax1"].numel() == -(-large.numel() // layout.blocksize)  # one per started block
    assert state["qmap1"].numel() == state["qmap2"].numel() == layout.qmap_numel
    assert optimizer.state[small]["state1"].dtype == torch.float32  # below min_8bit_size
    assert layout.paged_min_numel > layout.min_8bit_size


def test_eight_bit_layout_refuses_a_changed_source(monkeypatch):
    from bitsandbytes.optim.optimizer import Optimizer2State

    monkeypatch.setattr(Optimizer2State, "init_state", lambda self, group, p, gindex, pindex: None)
    with pytest.raises(CompatError, match=loud("bitsandbytes", installed_version("bitsandbytes"),
                                               "init_state", need="quantisation maps")):
        compat.eight_bit_layout()


def test_bitsandbytes_optimizer_as_on_cuda_keeps_maps_on_the_host_and_pages_large_state():
    """Maps built untracked and copied at the first step; the buffers CUDA pages are made off the device."""
    from bitsandbytes.optim import PagedAdamW8bit

    from membench.allocator import allocator_bytes
    from membench.backends.tracker import AllocationTracker

    layout = compat.eight_bit_layout()
    paged, plain = nn.Parameter(torch.zeros(layout.paged_min_numel)), nn.Parameter(torch.zeros(layout.min_8bit_size))
    for weight in (paged, plain):
        weight.grad = torch.ones_like(weight)
    tracker = AllocationTracker("cpu")
    for tensor in (paged, plain, paged.grad, plain.grad):  # as a backend's session counts what predates it
        tracker.track(tensor)
    before = tracker.allocated
    with tracker:
        optimizer = compat.bitsandbytes_optimizer_as_on_cuda(lambda: PagedAdamW8bit([paged, plain]),
                                                             tracker.off_device)
        assert tracker.allocated == before  # the maps live on the host
        optimizer.step()
    qmap = optimizer.state[paged]["qmap1"]
    assert isinstance(qmap, torch.Tensor) and qmap is optimizer.state[plain]["qmap1"]  # one device copy, shared

    def absmax(weight):  # one fp32 value per started block, for each of the two states
        return 2 * allocator_bytes(4 * -(-weight.numel() // layout.blocksize))

    maps = 2 * allocator_bytes(4 * layout.qmap_numel)
    assert tracker.allocated - before == maps + absmax(paged) + absmax(plain) + 2 * allocator_bytes(plain.numel())
    found = compat.paged_state_tensors(optimizer)
    assert {id(t) for t in found} == {id(optimizer.state[paged]["state1"]), id(optimizer.state[paged]["state2"])}
    assert compat.paged_state_tensors(torch.optim.SGD([plain])) is None


# --- follow_storage_resizes, fake_process_group, fsdp2_api (torch_distributed) ----------------------------

def test_storage_resizes_are_followed_and_the_method_restored_even_after_an_error():
    original = torch.UntypedStorage.resize_
    seen = []
    tensor = torch.empty(64)
    with pytest.raises(RuntimeError, match="inside"):
        with compat.follow_storage_resizes(lambda storage: seen.append(storage.nbytes())):
            tensor.untyped_storage().resize_(0)
            tensor.untyped_storage().resize_(128)
            raise RuntimeError("inside")
    assert seen == [0, 128]
    assert torch.UntypedStorage.resize_ is original
    tensor.untyped_storage().resize_(64)
    assert seen == [0, 128]  # no longer followed


def test_storage_resize_follower_refuses_a_missing_method(monkeypatch):
    monkeypatch.setattr(torch.UntypedStorage, "resize_", None)
    with pytest.raises(CompatError, match=loud("torch", TORCH, "has no UntypedStorage.resize_",
                                               need="to follow FSDP2")):
        with compat.follow_storage_resizes(lambda storage: None):
            pass


def test_fake_process_group_plays_one_rank_and_is_destroyed_even_after_an_error():
    import torch.distributed as dist

    with pytest.raises(RuntimeError, match="inside"):
        with compat.fake_process_group(8, rank=3):
            assert (dist.get_world_size(), dist.get_rank()) == (8, 3)
            raise RuntimeError("inside")
    assert not dist.is_initialized()


def test_fsdp2_api_refuses_a_fully_shard_without_the_options_membench_sets(monkeypatch):
    import torch.distributed.fsdp as fsdp

    assert compat.fsdp2_api()[0] is fsdp.fully_shard
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, *, mesh=None: module)
    with pytest.raises(CompatError, match=loud("torch", TORCH, "without reshard_after_forward, mp_policy, "
                                               "offload_policy", need="to shard a model with FSDP2")):
        compat.fsdp2_api()


def test_dtensor_metadata_scope_pauses_and_restores_torchs_lock():
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator._fake_mode_lock
    calls = []
    with pytest.raises(RuntimeError, match="inside"):
        with compat.dtensor_metadata_unseen(lambda: calls.append("pause"), lambda: calls.append("resume")):
            with ShardingPropagator._fake_mode_lock:
                assert calls == ["pause"]
            raise RuntimeError("inside")
    assert calls == ["pause", "resume"] and ShardingPropagator._fake_mode_lock is original


def test_dtensor_metadata_scope_refuses_a_propagator_without_its_lock(monkeypatch):
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    monkeypatch.setattr(ShardingPropagator, "_fake_mode_lock", None)
    with pytest.raises(CompatError, match=loud("torch", TORCH, "has no ShardingPropagator._fake_mode_lock",
                                               need="to leave out the fake global-shape tensors")):
        with compat.dtensor_metadata_unseen(lambda: None, lambda: None):
            pass


def _symbolic_sizes():
    """Two SymInts of one fresh shape environment (hints 6 and 10), and that environment."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv(duck_shape=False)
    mode = compat.FakeTensorMode(shape_env=shape_env)
    template = mode.from_tensor(torch.empty(6, 10, device="meta"),
                                symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 2))
    return (*template.shape, shape_env)


def _arithmetic(a, b):
    """Size arithmetic as a tensor's metadata makes it: products, sums, comparisons, max, floor division,
    and one expression as int and as float (equal expressions, other Python types: other nodes)."""
    return [a * b, a * b * 4, a + b, (a + 1) * b - a, torch.sym_max(a, b), a // 2, a * b > 64, a == b, (a >= 2) & (b >= 2),
            a * 2, a * 2.0]


def test_memoized_symbolic_arithmetic_builds_the_nodes_torch_builds_and_restores_torch():
    from torch.fx.experimental.sym_node import SymNode

    before = {name: getattr(SymNode, name) for name in [*compat.symbolic_binary_operations(), "maybe_as_int", "wrap_int"]}
    a, b, shape_env = _symbolic_sizes()
    plain = _arithmetic(a, b)
    with compat.memoized_symbolic_arithmetic(shape_env):
        first, again = _arithmetic(a, b), _arithmetic(a, b)
        assert all(x.node is y.node for x, y in zip(first, again))  # one node per distinct operation
        assert first[-2].node.pytype is int and first[-1].node.pytype is float
        assert a.node.wrap_int(7) is a.node.wrap_int(7) and a.node.wrap_int(7).expr == 7
        assert [(a * 0).node.maybe_as_int(), (a * b).node.maybe_as_int(), (a * 0).node.maybe_as_int()] == [0, None, 0]
        c, d, other_env = _symbolic_sizes()  # another environment's operands go to torch
        assert (c * d).node is not (c * d).node
    assert {name: getattr(SymNode, name) for name in before} == before
    assert (a * b).node is not (a * b).node
    for mine, torchs in zip(first, plain):
        assert (mine.node.expr, mine.node.hint, mine.node.pytype) == (torchs.node.expr, torchs.node.hint,
                                                                      torchs.node.pytype)


@pytest.mark.parametrize(("attribute", "replacement", "fragment"),
                         [("_mul", lambda self, other: None, "SymNode._mul built by binary_magic_impl"),
                          ("expr", property(lambda self: self._expr), "SymNode.expr that returns self._expr"),
                          ("wrap_int", None, "SymNode.wrap_int")], ids=["operation", "expr", "wrap_int"])
def test_memoized_symbolic_arithmetic_refuses_a_changed_target(monkeypatch, attribute, replacement, fragment):
    from torch.fx.experimental.sym_node import SymNode

    monkeypatch.setattr(SymNode, attribute, replacement)
    with pytest.raises(CompatError, match=loud("torch", TORCH, fragment, need="memoize symbolic size arithmetic")):
        with compat.memoized_symbolic_arithmetic(None):
            pass


def test_dropout_keeps_its_input_under_the_python_dispatcher_as_aten_does_and_restores_torch():
    x = torch.ones(3, 4)

    def dropout(p: float, train: bool):
        with torch._C._EnablePythonDispatcher():
            return torch.ops.aten.dropout.default(x, p, train)

    assert torch.ops.aten.dropout.default(x, 0.0, True) is x  # ATen's kernel
    assert dropout(0.0, True) is not x  # torch's Python decomposition clones
    with compat.dropout_keeps_its_input_like_cpp():
        assert dropout(0.0, True) is x and dropout(0.5, False) is x
        assert dropout(0.5, True).shape == x.shape  # any other p: the decomposition, as before
    assert dropout(0.0, True) is not x


def test_dropout_patch_refuses_a_changed_decomposition(monkeypatch):
    from torch._C import DispatchKey

    kernels = dict(torch.ops.aten.dropout.default.py_kernels)
    kernels[DispatchKey.CompositeImplicitAutograd] = lambda input, p, train: input
    monkeypatch.setattr(torch.ops.aten.dropout.default, "py_kernels", kernels)
    with pytest.raises(CompatError, match=loud("torch", TORCH, "aten.dropout", "input.clone()",
                                               need="dropout keep its input")):
        with compat.dropout_keeps_its_input_like_cpp():
            pass


def test_fast_fake_cache_keys_equal_torchs_and_give_the_same_hits_misses_and_bytes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    original = FakeTensorMode._prep_args_for_hash
    compat.check_fake_cache_keys()  # value for value, on tensors of every kind (and those left to torch)

    def counted_step():
        FakeTensorMode.cache.clear()
        before = (FakeTensorMode.cache_hits, FakeTensorMode.cache_misses)
        with FakeTensorMode():
            layer = nn.Linear(16, 8)
            x = torch.randn(4, 16, requires_grad=True)
            loss = F.gelu(layer(x)).t().sum() + layer(x[1:]).mean()
            loss.backward()
        return FakeTensorMode.cache_hits - before[0], FakeTensorMode.cache_misses - before[1], x.grad.shape

    plain = counted_step()
    with compat.fast_fake_cache_keys():
        assert FakeTensorMode._prep_args_for_hash is not original
        fast = counted_step()
    assert fast == plain and plain[0] > 0
    assert FakeTensorMode._prep_args_for_hash is original


def test_fast_fake_cache_keys_are_checked_against_torchs(monkeypatch):
    from membench.compat import torch_fake

    make = torch_fake._fast_prep_args_for_hash

    def drops_requires_grad(*args):  # a fast key that forgets one field
        fast = make(*args)

        def prep(self, result, arguments, state, ids):
            fast(self, result, arguments, state, ids)
            result[:] = [value for value in result if value is not True]
        return prep

    monkeypatch.setattr(torch_fake, "_fast_prep_args_for_hash", drops_requires_grad)
    with pytest.raises(CompatError, match="fast key gave"):
        compat.check_fake_cache_keys()
    monkeypatch.setattr(torch_fake, "TENSOR_METADATA_FIELDS", ("dtype", "shape"))
    with pytest.raises(CompatError, match=loud("torch", TORCH, "has TensorMetadata fields",
                                               need="to build FakeTensorMode's dispatch-cache keys")):
        with compat.fast_fake_cache_keys():
            pass


def test_cheap_fake_views_are_checked_against_torchs_and_undone(monkeypatch):
    from torch._subclasses import fake_impls
    from torch._subclasses.fake_tensor import FakeTensorMode

    from membench.compat import torch_fake_views

    build = FakeTensorMode._get_output_tensor_from_cache_entry
    unsafe_view = fake_impls.op_implementations_dict[torch.ops.aten._unsafe_view.default]
    compat.check_fake_views()  # the same views and guards both ways, and both cheap ways taken
    assert FakeTensorMode._get_output_tensor_from_cache_entry is build
    assert fake_impls.op_implementations_dict[torch.ops.aten._unsafe_view.default] is unsafe_view

    made = torch_fake_views._view_of

    def at_offset_zero(fake_tensor, mode, base, shape, stride, offset, *rest):  # a cheap view that loses its offset
        return made(fake_tensor, mode, base, shape, stride, 0, *rest)

    monkeypatch.setattr(torch_fake_views, "_view_of", at_offset_zero)
    with pytest.raises(CompatError, match="made cheaply"):
        compat.check_fake_views()
    monkeypatch.setattr(torch_fake_views, "_remembered_reshapes", lambda fake_tensor, view, storage_id, counts: view)
    with pytest.raises(CompatError, match="made no view cheaply"):
        compat.check_fake_views()
