"""Make CPU tensors save for backward what CUDA kernels save.

Memory, not numerics, is what differs between the CPU and CUDA code paths of
two functions that every model here calls:

* ``F.dropout``: on CUDA it runs ``native_dropout`` and saves a **bool** mask
  (1 byte per element). The CPU path saves a **float** mask (4 bytes in fp32);
  on RoBERTa-large that made a CPU simulation 1.13 GiB too high
  (against the H100). We call ``native_dropout`` instead.
* ``F.scaled_dot_product_attention`` with dropout: CUDA's fused kernels
  (flash, memory-efficient) draw the dropout mask from a Philox seed and save
  only output + logsumexp. The CPU flash kernel refuses dropout, so CPU falls
  back to the math path, which saves the S x S probabilities and a float mask.
  We call the CPU flash kernel with dropout 0: the saved bytes match CUDA's
  fused kernels, while the attention dropout itself is not applied. That
  changes numbers in the loss, never the bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fused_attention_cpu(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """Attention through the CPU flash kernel: saves output + logsumexp, like CUDA's fused kernels."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        # What SDPA itself does for grouped-query attention outside flash:
        # materialise K and V at the query's head count.
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
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
            return _fused_attention_cpu(query, key, value, attn_mask, is_causal, scale, enable_gqa)

        F.dropout, F.scaled_dot_product_attention = dropout, scaled_dot_product_attention
        return self

    def __exit__(self, *exc_info) -> None:
        F.dropout, F.scaled_dot_product_attention = self._original
