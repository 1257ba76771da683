"""Make CPU tensors save for backward what CUDA kernels save.

Memory, not numerics, is what differs between the CPU and CUDA code paths of
two functions that every model here calls:

* ``F.dropout``: on CUDA it runs ``native_dropout`` and saves a **bool** mask
  (1 byte per element). The CPU path saves a **float** mask (4 bytes in fp32);
  on RoBERTa-large that made a CPU simulation 1.13 GiB too high
  against the H100. We call ``native_dropout`` instead.
* ``F.scaled_dot_product_attention``: CUDA picks flash, memory-efficient or
  math by dtype, mask and grouped-query attention (:func:`cuda_attention_kernel`).
  The fused kernels draw their dropout mask from a Philox seed and save only
  output + logsumexp; the CPU flash kernel refuses dropout, so plain CPU falls
  back to the math path with its S x S probabilities and float mask. We call
  the CPU flash kernel with dropout 0 where CUDA would run a fused kernel, and
  the math kernel with a bool mask where CUDA would run math. The skipped
  attention dropout changes numbers in the loss, never the bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def cuda_attention_kernel(query, key, attn_mask, enable_gqa) -> str:
    """The SDPA kernel CUDA picks (sm80+), by the rules of torch's ``select_sdp_backend``.

    flash: fp16/bf16, no mask, head dim <= 256; handles grouped-query attention natively.
    efficient: any float dtype, masks allowed, but no grouped-query attention.
    math: everything else; materialises the S x S probabilities. That includes any
    input or mask whose last dimension is not contiguous: every fused CUDA kernel
    requires stride 1 there (``check_last_dim_stride_equals_1_dense``), the CPU ones do not.
    """
    strided = [t for t in (query, key, attn_mask) if t is not None and t.stride(-1) != 1 and t.shape[-1] != 1]
    if strided:
        return "math"
    grouped = enable_gqa and key.shape[-3] != query.shape[-3]
    if query.dtype in FLASH_DTYPES and attn_mask is None and query.shape[-1] <= FLASH_MAX_HEAD_DIM:
        return "flash"
    if not grouped:
        return "efficient"
    return "math"


def _math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """CUDA's math kernel, op for op (``_scaled_dot_product_attention_math``), dropout as on CUDA.

    Same ops in the same order, so the same tensors are saved; only the dropout
    differs from the CPU build of that kernel: ``native_dropout`` keeps a bool mask.
    """
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    factor = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
    if is_causal:
        attn_mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(~attn_mask, float("-inf"))
    scores = (query * factor) @ (key.transpose(-2, -1) * factor)
    if attn_mask is not None:
        scores.add_(attn_mask)
    probabilities = torch.ops.aten._safe_softmax.default(scores, -1)
    if dropout_p > 0.0:
        probabilities = torch.ops.aten.native_dropout(probabilities, dropout_p, True)[0]
    return probabilities @ value


class _FusedAttentionSavings(torch.autograd.Function):
    """What a fused kernel keeps for backward (inputs, output, logsumexp), for a mask that needs a gradient.

    CUDA's memory-efficient kernel differentiates its bias; the CPU flash kernel
    cannot. This runs the math in forward without saving its S x S
    intermediates, saves what the fused kernel saves, and recomputes in backward.
    """

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale):
        with torch.no_grad():
            output = _math_attention(query, key, value, attn_mask, 0.0, is_causal, scale, False)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, attn_mask, output, logsumexp)
        ctx.is_causal, ctx.scale = is_causal, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, attn_mask, _output, _logsumexp = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value, attn_mask)]
        with torch.enable_grad():
            output = _math_attention(*inputs, 0.0, ctx.is_causal, ctx.scale, False)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, grad_output))
        return (*[next(grads) if t.requires_grad else None for t in inputs], None, None)


def _attention_as_on_cuda(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Attention that saves for backward what CUDA's chosen kernel saves."""
    kernel = cuda_attention_kernel(query, key, attn_mask, enable_gqa)
    if kernel == "math":
        return _math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask is not None and attn_mask.requires_grad:
        return _FusedAttentionSavings.apply(query, key, value, attn_mask, is_causal, scale)
    # flash and efficient keep output + logsumexp (and their inputs); the CPU flash kernel does
    # the same, and like CUDA's flash it takes fewer key/value heads as they are.
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(~attn_mask, float("-inf"))
    output, _logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale
    )
    return output


class CudaSemantics:
    """Context manager: ``F.dropout`` and ``F.scaled_dot_product_attention`` save CUDA's bytes on CPU.

    The two functions are swapped in ``torch.nn.functional`` for the duration,
    not intercepted with a ``TorchFunctionMode``: function modes are not active
    inside backward, where activation checkpointing recomputes the forward, and
    a recompute that took the other path would save different tensors.
    """

    def __enter__(self) -> "CudaSemantics":
        self._original = (F.dropout, F.scaled_dot_product_attention)
        original_dropout, original_sdpa = self._original

        def dropout(input, p=0.5, training=True, inplace=False):
            if not training or p == 0.0 or inplace or input.device.type != "cpu":
                return original_dropout(input, p, training, inplace)
            output, _mask = torch.ops.aten.native_dropout(input, p, True)
            return output

        def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                         scale=None, enable_gqa=False):
            if query.device.type != "cpu":
                return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                     is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            return _attention_as_on_cuda(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

        F.dropout, F.scaled_dot_product_attention = dropout, scaled_dot_product_attention
        return self

    def __exit__(self, *exc_info) -> None:
        F.dropout, F.scaled_dot_product_attention = self._original
