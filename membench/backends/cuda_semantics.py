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

import torch
import torch.nn.functional as F


FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def cuda_attention_kernel(query, key, attn_mask, enable_gqa) -> str:
    """The SDPA kernel CUDA picks (sm80+), by the rules of torch's ``select_sdp_backend``.

    flash: fp16/bf16, no mask, head dim <= 256; handles grouped-query attention natively.
    efficient: any float dtype, masks allowed, but no grouped-query attention.
    math: everything else; materialises the S x S probabilities.
    """
    grouped = enable_gqa and key.shape[-3] != query.shape[-3]
    if query.dtype in FLASH_DTYPES and attn_mask is None and query.shape[-1] <= FLASH_MAX_HEAD_DIM:
        return "flash"
    if not grouped:
        return "efficient"
    return "math"


def _attention_as_on_cuda(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Attention that saves for backward what CUDA's chosen kernel saves."""
    kernel = cuda_attention_kernel(query, key, attn_mask, enable_gqa)
    if kernel == "math":
        # CUDA's math path drops out with native_dropout: a bool mask, not the CPU's float one.
        dropout_mask = None
        if dropout_p > 0.0:
            shape = (*query.shape[:-1], key.shape[-2])
            dropout_mask = torch.rand(shape, device=query.device) >= dropout_p
        output, _probabilities = torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, dropout_mask, scale=scale, enable_gqa=enable_gqa
        )
        return output
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
            mask_needs_grad = isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad
            if query.device.type != "cpu" or mask_needs_grad:  # the CPU flash kernel has no mask gradient
                return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                     is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
            return _attention_as_on_cuda(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

        F.dropout, F.scaled_dot_product_attention = dropout, scaled_dot_product_attention
        return self

    def __exit__(self, *exc_info) -> None:
        F.dropout, F.scaled_dot_product_attention = self._original
