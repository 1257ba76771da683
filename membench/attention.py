"""Which SDPA kernel CUDA runs: the one rule that both the simulation and the symbolic walk follow.

``F.scaled_dot_product_attention`` on CUDA (sm80+) picks flash, memory-efficient
or math by dtype, mask, head dimension, grouped-query attention and layout, by
the rules of torch's ``select_sdp_backend``. What it picks decides what autograd
keeps: flash and efficient keep output + logsumexp (O(S) per row); math keeps
the S x S probabilities (O(S^2)).
"""

from __future__ import annotations

FLASH_MAX_HEAD_DIM = 256


def sdpa_kernel(half_precision: bool, head_dim: int, has_mask: bool, grouped: bool,
                last_dim_strided: bool = False, fused_dtype: bool = True) -> str:
    """``flash``, ``efficient`` or ``math``: the kernel CUDA picks.

    Args:
        half_precision: Inputs are fp16 or bf16 (else fp32).
        head_dim: The last dimension of q, k and v.
        has_mask: An explicit ``attn_mask`` is passed (flash takes none).
        grouped: Fewer key/value heads than query heads with ``enable_gqa``: flash
            handles it natively, efficient does not.
        last_dim_strided: An input or the mask is not contiguous in its last
            dimension. Every fused CUDA kernel requires stride 1 there
            (``check_last_dim_stride_equals_1_dense``); the CPU ones do not.
        fused_dtype: The dtype is one a fused kernel takes (fp16, bf16, fp32; not fp64).
    """
    if last_dim_strided or not fused_dtype:
        return "math"
    if half_precision and not has_mask and head_dim <= FLASH_MAX_HEAD_DIM:
        return "flash"
    alignment = 8 if half_precision else 4
    if not grouped and head_dim % alignment == 0:
        return "efficient"
    return "math"
