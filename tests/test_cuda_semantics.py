"""CPU tensors that save what CUDA kernels save: kernel choice, the math mirror, fused savings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from membench.backends.cuda_semantics import (
    CudaSemantics,
    _FusedAttentionSavings,
    _math_attention,
    cuda_attention_kernel,
)
from membench.saved_tensors import SavedTensorCounter


def qkv(dtype=torch.float32, kv_heads=4, requires_grad=True):
    torch.manual_seed(0)
    make = lambda heads: torch.randn(2, heads, 16, 8, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(4), make(kv_heads), make(kv_heads)


@pytest.mark.parametrize(
    ("dtype", "mask", "kv_heads", "expected"),
    [
        (torch.bfloat16, None, 4, "flash"),
        (torch.bfloat16, None, 2, "flash"),  # flash handles grouped-query attention natively
        (torch.bfloat16, "dense", 4, "efficient"),  # any mask rules flash out
        (torch.float32, None, 4, "efficient"),  # flash is fp16/bf16 only
        (torch.float32, None, 2, "math"),  # efficient has no grouped-query attention
        (torch.float32, "strided", 4, "math"),  # fused kernels need a contiguous last dim
    ],
)
def test_kernel_choice_follows_torch_rules(dtype, mask, kv_heads, expected):
    query, key, _ = qkv(dtype, kv_heads)
    attn_mask = {"dense": torch.zeros(1, 4, 16, 16), "strided": torch.zeros(16, 16, 4).permute(2, 0, 1)[None],
                 None: None}[mask]
    assert cuda_attention_kernel(query, key, attn_mask, enable_gqa=kv_heads != 4) == expected


@pytest.mark.parametrize(("causal", "with_mask", "kv_heads"), [(False, True, 4), (True, False, 4), (False, False, 2)])
def test_math_mirror_saves_what_the_math_kernel_saves(causal, with_mask, kv_heads):
    query, key, value = qkv(kv_heads=kv_heads)
    mask = torch.randn(1, 4, 16, 16) if with_mask else None
    gqa = kv_heads != 4
    counted = []
    for attention in ("aten", "mirror"):
        counter = SavedTensorCounter([query, key, value])
        with counter.counting():
            if attention == "aten":
                out = torch.ops.aten._scaled_dot_product_attention_math(query, key, value, mask, 0.0, causal, None,
                                                                        enable_gqa=gqa)[0]
            else:
                out = _math_attention(query, key, value, mask, 0.0, causal, None, gqa)
        counted.append((counter.total_bytes, out))
    assert counted[0][0] == counted[1][0]
    torch.testing.assert_close(counted[0][1], counted[1][1])


def test_math_mirror_dropout_keeps_a_bool_mask():
    query, key, value = qkv()
    counter = SavedTensorCounter([query, key, value])
    with counter.counting():
        _math_attention(query, key, value, None, 0.1, False, None, False)
    probabilities = 2 * 4 * 16 * 16
    # scaled q and k, softmax output, bool mask, dropped probabilities: the float mask would add 3 B each.
    assert counter.total_bytes == 2 * (2 * 4 * 16 * 8 * 4) + probabilities * (4 + 1 + 4)


def test_fused_savings_gradients_are_exact():
    query, key, value = qkv()
    bias = torch.randn(1, 4, 16, 16, requires_grad=True)
    reference = _math_attention(query, key, value, bias, 0.0, False, None, False)
    expected = torch.autograd.grad(reference.sum(), (query, key, value, bias))
    output = _FusedAttentionSavings.apply(query, key, value, bias, False, None)
    torch.testing.assert_close(output, reference)
    for got, want in zip(torch.autograd.grad(output.sum(), (query, key, value, bias)), expected):
        torch.testing.assert_close(got, want)


def test_fused_savings_keep_no_probabilities():
    query, key, value = qkv()
    bias = torch.randn(1, 4, 16, 16, requires_grad=True)
    counter = SavedTensorCounter([])
    with counter.counting():
        _FusedAttentionSavings.apply(query, key, value, bias, False, None)
    inputs = 3 * (2 * 4 * 16 * 8 * 4) + 4 * 16 * 16 * 4
    output_and_logsumexp = 2 * 4 * 16 * 8 * 4 + 2 * 4 * 16 * 4
    assert counter.total_bytes == inputs + output_and_logsumexp


def test_functions_are_restored_and_recompute_sees_the_swap():
    original = (F.dropout, F.scaled_dot_product_attention)
    with CudaSemantics():
        assert F.dropout is not original[0]
    assert (F.dropout, F.scaled_dot_product_attention) == original
