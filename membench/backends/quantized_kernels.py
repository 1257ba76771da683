"""bitsandbytes' 4-bit matmul as CUDA runs it, for CPU tensors standing in for CUDA ones.

``bitsandbytes::gemm_4bit`` is one op to a dispatch mode, so the allocator model sees only its
output. On CUDA (bitsandbytes/backends/cuda/ops.py, the ``gemm_4bit`` kernel registered for
"cuda"), an input with more than ``_gemm_4bit_custom_max_m = 1536`` rows (tokens), or an inner
dimension that is not a multiple of the block size, takes ``_dequant_linear_fallback``:

* with double quantisation, the per-block absmax dequantised into an fp32 buffer (one float
  per 64 weights), then a second one for ``absmax + offset``;
* the whole weight dequantised into an ``[N, K]`` buffer in the input's dtype;
* ``F.linear`` into the output; the buffers are freed when the op returns.

:class:`Gemm4bitAsOnCuda` runs exactly that sequence through bitsandbytes' own ops
(``dequantize_blockwise``, ``dequantize_4bit``) and ``aten.linear``, which is bitsandbytes'
"default" implementation of ``gemm_4bit``, so the tracker below sees CUDA's temporaries. Fewer
rows run the fused ``cgemm_4bit`` kernel, which allocates only the output: the fake kernel's bytes.

Not modelled: for 5 to 1536 rows bitsandbytes also picks the fallback by a per-architecture
table (``_gemm_4bit_use_custom_cuda``: SM count, compute capability, N and K); membench
assumes the fused kernel there. Training steps have batch x sequence rows, above 1536 in
every configuration of the qlora experiment.
"""

from __future__ import annotations

import torch

from membench.compat import TorchDispatchMode

#: ``_gemm_4bit_custom_max_m`` for CUDA in bitsandbytes/backends/cuda/ops.py (0.50): more rows take the fallback.
CUDA_FUSED_MAX_ROWS = 1536


def _takes_fallback(A: torch.Tensor, blocksize: int) -> bool:
    inner = A.shape[-1]
    return A.numel() // inner > CUDA_FUSED_MAX_ROWS or inner % blocksize != 0


class Gemm4bitAsOnCuda(TorchDispatchMode):
    """While active, ``bitsandbytes::gemm_4bit`` allocates what CUDA's kernel allocates (module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.bitsandbytes.gemm_4bit.default:
            named = {argument.name: value for argument, value in zip(func._schema.arguments, args)} | kwargs
            A, blocksize = named["A"], named["blocksize"]
            if _takes_fallback(A, blocksize):
                absmax = named["absmax"]
                if named.get("absmax_8bit") is not None:
                    dequantized = torch.ops.bitsandbytes.dequantize_blockwise.default(
                        named["absmax_8bit"], absmax, named["absmax_code"], 256, torch.float32)
                    absmax = dequantized + named["absmax_offset"]
                weight = torch.ops.bitsandbytes.dequantize_4bit.default(
                    named["B"], absmax, blocksize, named["quant_type"], named["shapeB"], A.dtype)
                return torch.nn.functional.linear(A, weight, named.get("bias"))
        return func(*args, **kwargs)
