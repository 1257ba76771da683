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
from torch.overrides import TorchFunctionMode


def _fused_attention_cpu(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
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


class CudaSemantics(TorchFunctionMode):
    """Routes dropout and attention on CPU tensors to their CUDA-equivalent ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            return self._dropout(func, types, args, kwargs)
        if func is F.scaled_dot_product_attention and args[0].device.type == "cpu":
            needs_mask_grad = isinstance(kwargs.get("attn_mask"), torch.Tensor) and kwargs["attn_mask"].requires_grad
            if not needs_mask_grad:  # the CPU flash kernel has no gradient for the mask
                return _fused_attention_cpu(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _dropout(func, types, args, kwargs):
        names = ("input", "p", "training", "inplace")
        bound = dict(zip(names, args)) | kwargs
        x, p = bound["input"], bound.get("p", 0.5)
        training, inplace = bound.get("training", True), bound.get("inplace", False)
        if not training or p == 0.0 or x.device.type != "cpu" or inplace:
            return func(*args, **kwargs)
        output, _mask = torch.ops.aten.native_dropout(x, p, True)
        return output
