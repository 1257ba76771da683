"""CPU tensors that save what CUDA kernels save: kernel choice, the math mirror, fused savings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from membench.allocator import allocator_bytes
from membench.backends.cuda_semantics import (
    CudaSemantics,
    _FusedAttentionSavings,
    _math_attention,
    cuda_attention_kernel,
)
from membench.backends.tracker import AllocationTracker
from membench.saved_tensors import SavedTensorCounter

B, H, L, D = 2, 4, 16, 8


def qkv(dtype=torch.float32, kv_heads=H, head_dim=D, requires_grad=True):
    torch.manual_seed(0)
    make = lambda heads: torch.randn(B, heads, L, head_dim, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(H), make(kv_heads), make(kv_heads)


def strided_mask():
    return torch.zeros(L, L, H).permute(2, 0, 1)[None]  # how T5's relative bias comes out of its embedding


@pytest.mark.parametrize(
    ("dtype", "mask", "kv_heads", "head_dim", "expected"),
    [
        (torch.bfloat16, None, H, D, "flash"),
        (torch.float16, None, 2, D, "flash"),  # flash handles grouped-query attention natively
        (torch.bfloat16, None, H, 512, "efficient"),  # flash stops at head dim 256
        (torch.bfloat16, "dense", H, D, "efficient"),  # any mask rules flash out
        (torch.float32, None, H, D, "efficient"),  # flash is fp16/bf16 only
        (torch.float32, None, 2, D, "math"),  # efficient has no grouped-query attention
        (torch.float32, "strided", H, D, "math"),  # fused kernels need a contiguous last dim
        (torch.float32, None, H, 6, "math"),  # efficient needs fp32 head dims in multiples of 4
        (torch.float64, None, H, D, "math"),  # no fused kernel takes fp64
    ],
)
def test_kernel_choice_follows_torch_rules(dtype, mask, kv_heads, head_dim, expected):
    query, key, value = qkv(dtype, kv_heads, head_dim)
    attn_mask = {"dense": torch.zeros(1, H, L, L), "strided": strided_mask(), None: None}[mask]
    assert cuda_attention_kernel(query, key, value, attn_mask, enable_gqa=kv_heads != H) == expected


def test_strided_value_rules_out_fused_kernels():
    query, key, _ = qkv()
    value = torch.randn(B, H, D, L).transpose(-2, -1)
    assert cuda_attention_kernel(query, key, value, None, False) == "math"


def saved_and_output(function):
    counter = SavedTensorCounter([])
    with counter.counting():
        output = function()
    return counter.total_bytes, output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("causal", "mask", "kv_heads"), [(False, "float", H), (True, None, H), (False, None, 2),
                                                          (False, "bool", H)])
def test_math_mirror_saves_what_the_math_kernel_saves(dtype, causal, mask, kv_heads):
    query, key, value = qkv(dtype, kv_heads)
    attn_mask = {"float": torch.randn(1, H, L, L, dtype=dtype), "bool": torch.rand(1, H, L, L) > 0.2, None: None}[mask]
    gqa = kv_heads != H
    additive = attn_mask if mask != "bool" else torch.zeros(attn_mask.shape, dtype=dtype).masked_fill_(
        ~attn_mask, float("-inf"))  # SDPA converts bool masks before calling the math kernel
    aten = saved_and_output(lambda: torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, additive, 0.0, causal, None, enable_gqa=gqa)[0])
    mirror = saved_and_output(lambda: _math_attention(query, key, value, attn_mask, 0.0, causal, None, gqa))
    assert mirror[0] == aten[0] > 0
    assert mirror[1].dtype == dtype
    torch.testing.assert_close(mirror[1], aten[1])
    # the same gradients for q, k and v, from the same upstream gradient
    upstream = torch.randn_like(aten[1])
    for got, want in zip(torch.autograd.grad(mirror[1], (query, key, value), upstream),
                         torch.autograd.grad(aten[1], (query, key, value), upstream), strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want)


def test_math_mirror_dropout_keeps_a_bool_mask():
    query, key, value = qkv()
    saved, _ = saved_and_output(lambda: _math_attention(query, key, value, None, 0.1, False, None, False))
    probabilities = B * H * L * L
    # scaled q and k, and v; softmax output, bool mask, dropped probabilities (a float mask: 3 B more each).
    assert saved == 3 * (B * H * L * D * 4) + probabilities * (4 + 1 + 4)


def test_math_mirror_refuses_mask_and_causal_together():
    query, key, value = qkv()
    with pytest.raises(ValueError, match="not both"):
        _math_attention(query, key, value, torch.zeros(1, H, L, L), 0.0, True, None, False)


def explicit_attention(query, key, value, bias, scale):
    """softmax(Q K^T * scale + bias) V, written out: the reference autograd differentiates."""
    return ((query @ key.transpose(-2, -1)) * scale + bias).softmax(-1) @ value


@pytest.mark.parametrize("needs_grad", [(True, True, True, True), (False, True, False, True), (True, False, True, False)])
@pytest.mark.parametrize("scale", [0.3, None])
def test_fused_savings_gradients_match_explicit_attention(needs_grad, scale):
    """Output and the gradients of q, k, v and the bias equal autograd through softmax(QK^T*scale+bias)V."""
    query, key, value = qkv(requires_grad=False)
    bias = torch.randn(1, H, L, L)  # broadcast over the batch: its gradient is summed over it
    inputs = [t.clone().requires_grad_(flag) for t, flag in zip((query, key, value, bias), needs_grad, strict=True)]
    wanted = [t for t in inputs if t.requires_grad]
    reference = explicit_attention(*inputs, 0.3 if scale else 1 / D ** 0.5)
    upstream = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, wanted, upstream)
    output = _FusedAttentionSavings.apply(*inputs, False, scale)
    torch.testing.assert_close(output, reference)
    got = torch.autograd.grad(output, wanted, upstream)
    assert [g.shape for g in got] == [t.shape for t in wanted]
    for one, want in zip(got, expected, strict=True):
        torch.testing.assert_close(one, want)


def test_fused_savings_keep_no_probabilities_and_make_no_temporaries():
    query, key, value = qkv()
    bias = torch.randn(1, H, L, L, requires_grad=True)
    tracker = AllocationTracker("cpu")
    counter = SavedTensorCounter([])
    with tracker, counter.counting():
        before = tracker.allocated
        tracker.reset_peak()
        _FusedAttentionSavings.apply(query, key, value, bias, False, None)
        forward_peak = tracker.peak - before
    # The efficient kernel's log-sum-exp: L = 16 query rows padded to 32, fp32. The CPU kernel's
    # unpadded one (B H L x 4) lives until it is copied over: a transient CUDA does not have.
    output_bytes, logsumexp_bytes, unpadded = B * H * L * D * 4, B * H * 32 * 4, B * H * L * 4
    assert counter.total_bytes == 3 * (B * H * L * D * 4) + H * L * L * 4 + output_bytes + logsumexp_bytes
    assert forward_peak == allocator_bytes(output_bytes) + allocator_bytes(unpadded) + allocator_bytes(logsumexp_bytes)


FUSED_CASES = [  # (dtype, kv heads, dropout) -> the kernel CUDA picks, and what it keeps beside q, k, v
    (torch.float32, H, 0.0, "efficient"),
    (torch.bfloat16, H, 0.0, "flash"),
    (torch.bfloat16, 2, 0.1, "flash"),  # dropout from a Philox seed: no mask kept
]


@pytest.mark.parametrize(("dtype", "kv_heads", "dropout", "kernel"), FUSED_CASES)
def test_routed_attention_saves_what_the_fused_kernel_saves(dtype, kv_heads, dropout, kernel):
    query, key, value = qkv(dtype, kv_heads)
    assert cuda_attention_kernel(query, key, value, None, kv_heads != H) == kernel
    with CudaSemantics():
        saved, output = saved_and_output(lambda: F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, enable_gqa=kv_heads != H))
    size = dtype.itemsize
    inputs = B * H * L * D * size + 2 * B * kv_heads * L * D * size  # q, k, v as they came
    lse_rows = 32 if kernel == "efficient" else L  # efficient pads its query rows to a multiple of 32
    assert saved == inputs + B * H * L * D * size + B * H * lse_rows * 4  # + output + fp32 logsumexp, no S x S
    assert output.shape == (B, H, L, D) and output.dtype == dtype


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_routed_attention_saves_what_the_math_kernel_saves(dropout):
    """fp32 grouped-query attention: no fused kernel takes it, so CUDA runs math and keeps S x S probabilities."""
    query, key, value = qkv(torch.float32, kv_heads=2)
    assert cuda_attention_kernel(query, key, value, None, True) == "math"
    with CudaSemantics():
        saved, _ = saved_and_output(lambda: F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, enable_gqa=True))
    head_tensor, probabilities = B * H * L * D * 4, B * H * L * L
    # scaled q, scaled k and v with their heads repeated to H, fp32 softmax output; with dropout also
    # the bool mask and the dropped probabilities.
    expected = 3 * head_tensor + probabilities * 4 + (probabilities * (1 + 4) if dropout else 0)
    assert saved == expected


def test_autocast_casts_attention_inputs_as_cuda_does():
    """Under bf16 autocast, fp32 q/k/v reach the kernel as bf16: flash for a causal GQA decoder, no S x S kept."""
    query, key, value = qkv(kv_heads=2)
    with CudaSemantics(), torch.autocast("cpu", dtype=torch.bfloat16):
        saved, output = saved_and_output(lambda: F.scaled_dot_product_attention(
            query, key, value, is_causal=True, enable_gqa=True))
    assert output.dtype == torch.bfloat16
    casts = B * H * L * D * 2 + 2 * (B * 2 * L * D * 2)  # bf16 copies of q, k, v
    assert saved == casts + B * H * L * D * 2 + B * H * L * 4  # + output (bf16) + logsumexp (fp32)


def test_dropout_is_routed_and_checked():
    x = torch.randn(64, requires_grad=True)
    with CudaSemantics():
        saved, _ = saved_and_output(lambda: F.dropout(x, 0.5))
        with pytest.raises(ValueError, match="between 0 and 1"):
            F.dropout(x, 1.5)
    assert saved == 64  # one bool mask; the CPU path would keep 64 floats


def test_recompute_under_checkpoint_uses_the_swapped_functions():
    """Checkpointed blocks are recomputed in backward; the recompute must save what the forward saved."""
    x = torch.randn(8, 32, requires_grad=True)
    with CudaSemantics():
        y = checkpoint(lambda t: F.dropout(t * 2, 0.1), x, use_reentrant=False)
        y.sum().backward()  # a CheckpointError here means the recompute took the CPU path
    # d(sum(dropout(2x)))/dx = 2 / (1 - p) where the forward kept x, 0 where it dropped it: the
    # recompute drew the forward's mask again.
    kept = y != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(x.grad, kept.float() * (2 / 0.9))


def test_functions_are_restored_even_after_an_error():
    routed = lambda: (F.dropout, F.scaled_dot_product_attention, F.layer_norm, F.softmax)  # noqa: E731
    original = routed()
    semantics = CudaSemantics()
    with pytest.raises(KeyError):
        with semantics:
            assert all(now is not before for now, before in zip(routed(), original, strict=True))
            raise KeyError("boom")
    assert routed() == original
    with semantics:  # reusable after exit, but not re-entrant
        with pytest.raises(RuntimeError, match="already active"):
            semantics.__enter__()
    assert routed() == original


# -- (1) LayerNorm statistics: fp32 on CUDA for fp16/bf16 inputs --------------------------------------------
ROWS, WIDTH = 2 * 24, 32  # a (2, 24, 32) input: 48 rows normalised over 32


def layer_norm_case(dtype, parameter_dtype=None):
    torch.manual_seed(0)
    x = torch.randn(2, 24, WIDTH, dtype=dtype, requires_grad=True)
    weight = torch.randn(WIDTH, dtype=parameter_dtype or dtype, requires_grad=True)
    bias = torch.randn(WIDTH, dtype=parameter_dtype or dtype, requires_grad=True)
    return x, weight, bias


def saved_by_layer_norm(x, weight, bias, routed):
    counter = SavedTensorCounter([weight, bias])  # parameters are not activations
    with (CudaSemantics() if routed else torch.enable_grad()), counter.counting():
        output = F.layer_norm(x, [WIDTH], weight, bias)
    return counter.total_bytes, output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_layer_norm_keeps_fp32_statistics_with_the_cpu_kernels_numbers(dtype):
    x, weight, bias = layer_norm_case(dtype)
    routed_saved, routed = saved_by_layer_norm(x, weight, bias, True)
    plain_saved, plain = saved_by_layer_norm(x, weight, bias, False)
    # the input (48 x 32 x 2 B) and mean and rstd: 48 rows each, fp32 on CUDA, the input dtype on CPU
    assert routed_saved == ROWS * WIDTH * 2 + 2 * ROWS * 4
    assert plain_saved == ROWS * WIDTH * 2 + 2 * ROWS * 2
    assert routed.dtype == dtype
    # The statistics are the CPU kernel's rounded ones, widened: output and gradients are bit for bit the same.
    torch.testing.assert_close(routed, plain, rtol=0, atol=0)
    upstream = torch.randn_like(plain)
    for got, want in zip(torch.autograd.grad(routed, (x, weight, bias), upstream),
                         torch.autograd.grad(plain, (x, weight, bias), upstream), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_half_layer_norm_gradient_only_where_asked():
    x, weight, bias = layer_norm_case(torch.bfloat16)
    frozen_weight, frozen_bias = weight.detach(), bias.detach()
    with CudaSemantics():
        output = F.layer_norm(x, [WIDTH], frozen_weight, frozen_bias)
    (grad,) = torch.autograd.grad(output.float().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(
        F.layer_norm(x, [WIDTH], frozen_weight, frozen_bias).float().sum(), x)[0], rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "parameter_dtype"), [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_layer_norm_already_fp32_statistics_is_left_alone(dtype, parameter_dtype):
    """fp32 inputs, and half inputs with fp32 parameters (the CPU kernel's mixed case): fp32 statistics already."""
    x, weight, bias = layer_norm_case(dtype, parameter_dtype)
    assert saved_by_layer_norm(x, weight, bias, True)[0] == saved_by_layer_norm(x, weight, bias, False)[0] == (
        ROWS * WIDTH * dtype.itemsize + 2 * ROWS * 4)


def test_layer_norm_under_autocast_runs_in_fp32_as_on_cuda():
    """layer_norm is on CUDA autocast's fp32 list: a bf16 input is cast and normalised in fp32."""
    x, weight, bias = layer_norm_case(torch.bfloat16, torch.float32)
    counter = SavedTensorCounter([weight, bias])
    with CudaSemantics(), torch.autocast("cpu", dtype=torch.bfloat16), counter.counting():
        output = F.layer_norm(x, [WIDTH], weight, bias)
    assert output.dtype == torch.float32
    assert counter.total_bytes == ROWS * WIDTH * 4 + 2 * ROWS * 4  # the fp32 copy of the input, fp32 statistics


def test_layer_norm_statistics_under_recompute():
    x, weight, bias = layer_norm_case(torch.bfloat16)
    with CudaSemantics():
        output = checkpoint(lambda t: F.layer_norm(t, [WIDTH], weight, bias), x, use_reentrant=False)
        output.float().sum().backward()
    want = torch.autograd.grad(F.layer_norm(x, [WIDTH], weight, bias).float().sum(), x)[0]
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


# -- (2) softmax under bf16 autocast: fp32 on CUDA --------------------------------------------------------------
def test_autocast_softmax_saves_an_fp32_output_as_on_cuda():
    torch.manual_seed(0)
    scores = torch.randn(B, H, L, L, dtype=torch.bfloat16, requires_grad=True)
    with CudaSemantics(), torch.autocast("cpu", dtype=torch.bfloat16):
        saved, output = saved_and_output(lambda: F.softmax(scores, dim=-1))
    assert output.dtype == torch.float32
    assert saved == B * H * L * L * 4  # the softmax output, fp32 (bf16 under CPU autocast: half that)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_saved, plain = saved_and_output(lambda: F.softmax(scores, dim=-1))
    assert plain.dtype == torch.bfloat16 and plain_saved == B * H * L * L * 2
    # Numbers: CUDA's autocast runs softmax(x, dtype=float32); so does this, gradient included.
    reference = F.softmax(scores, dim=-1, dtype=torch.float32)
    torch.testing.assert_close(output, reference, rtol=0, atol=0)
    upstream = torch.randn_like(reference)
    torch.testing.assert_close(torch.autograd.grad(output, scores, upstream)[0],
                               torch.autograd.grad(reference, scores, upstream)[0], rtol=0, atol=0)
    torch.testing.assert_close(output, plain.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("autocast", [False, True])
def test_softmax_is_left_alone_outside_autocast_or_with_a_dtype(autocast):
    scores = torch.randn(4, 8, dtype=torch.bfloat16)
    with CudaSemantics(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert F.softmax(scores, -1).dtype == (torch.float32 if autocast else torch.bfloat16)
        assert F.softmax(scores, -1, dtype=torch.bfloat16).dtype == torch.bfloat16  # an explicit dtype wins


# -- (3) the efficient kernel's log-sum-exp: padded to a multiple of 32 query rows on CUDA ----------------------
@pytest.mark.parametrize(("rows", "padded"), [(20, 32), (32, 32), (33, 64)])
def test_efficient_attention_pads_its_logsumexp_and_keeps_the_numbers(rows, padded):
    torch.manual_seed(0)
    make = lambda: torch.randn(B, H, rows, D, requires_grad=True)  # noqa: E731
    query, key, value = make(), make(), make()
    mask = torch.randn(1, H, rows, rows)
    assert cuda_attention_kernel(query, key, value, mask, False) == "efficient"
    with CudaSemantics():
        saved, output = saved_and_output(lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask))
    head_tensor = B * H * rows * D * 4
    # q, k, v, the mask (H rows x rows fp32), the output, and B H padded-rows fp32 log-sum-exp
    assert saved == 3 * head_tensor + H * rows * rows * 4 + head_tensor + B * H * padded * 4
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # the plain CPU (math) path
    torch.testing.assert_close(output, reference)
    upstream = torch.randn_like(reference)
    for got, want in zip(torch.autograd.grad(output, (query, key, value), upstream),
                         torch.autograd.grad(reference, (query, key, value), upstream), strict=True):
        torch.testing.assert_close(got, want)
