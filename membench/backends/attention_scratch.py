"""The scratch buffers CUDA's fused attention backward allocates inside the op, in the order it does.

A ``TorchDispatchMode`` sees the outputs of ``aten._scaled_dot_product_{flash,efficient}_attention_backward``,
not the ``at::empty`` calls inside the kernels' C++ (and fake tensors run no C++ at all). Those buffers go
through the caching allocator, so they raise ``max_memory_allocated`` while the op runs and can open
segments. :class:`membench.backends.cuda_semantics.CudaSemantics` calls these functions in the backward of
its fused-attention emulation, so ``cpu`` and ``simulate`` allocate (and free) real or fake tensors of the
same sizes at the same moments. Every size below is read from PyTorch's source (2.5 to 2.13, main):

**Flash** (``flash_attn/flash_api.cpp``, ``mha_bwd``; caller ``_flash_attention_backward`` in
``transformers/cuda/attention_backward.cu``), q of shape (B, H, Sq, D), k and v (B, Hk, Sk, D):

1. ``grad_out.contiguous()`` in the caller: a copy of the output gradient unless it is contiguous
   in (B, Sq, H, D) order (freed when the caller returns; ``out.contiguous()`` never copies, the flash
   forward's output is contiguous in that order);
2. dq, dk, dv: the op's outputs (made here by the CPU kernel);
3. ``softmax_d``: fp32 (B, H, round_up(Sq, 128));
4. ``dq_accum``: fp32 (B, round_up(Sq, 128), H, round_up(D, 32 if D <= 128 else 64));
5. grouped-query attention (Hk < H) only: ``dk_expanded`` and ``dv_expanded``, (B, Sk, H, D) in q's dtype,
   summed into dk and dv after the kernel;
6. freed as ``mha_bwd``'s locals die (dv_expanded, dk_expanded, dq_accum), then ``softmax_d`` (returned
   to the caller, which drops it), then the gradient copy.

Not modelled: deterministic mode (``dq_accum`` gains a leading split dimension of
``ceil(SMs / (B * H))``), the fp32 ``dq_accum`` rounded for head dims above 128 on older flash versions.

**Memory-efficient** (``_efficient_attention_backward`` in ``attention_backward.cu``; workspace from
``Params::workspace_size`` in ``mem_eff_attention/kernel_backward.h``; kernels from ``kernels/cutlassB.h``),
q of shape (B, H, M, K), k (B, H, N, K), v (B, H, N, Kv):

1. the gradient copy, as for flash (contiguous in (B, M, H, Kv) order);
2. grad q, k, v (and the bias gradient): the op's outputs;
3. ``delta``: fp16/bf16 inputs, fp32 (B, H, M) (``kKernelComputesDelta`` on sm80+); fp32 inputs, the
   expression ``(grad_out.to(kFloat) * out.to(kFloat)).sum(-1).transpose(-2, -1).contiguous()``: the fp32
   product (B, M, H, Kv), its sum (B, M, H) and the contiguous (B, H, M), the two temporaries freed at the
   end of the statement (sum, then product);
4. ``workspace``: ``B * H * align_up(gk + gv + gq, 4) * 4`` bytes, with
   ``gq = ceil(M / kBlockSizeI) * ceil(K / kBlockSizeJ) * (kBlockSizeI * kBlockSizeJ + 4)`` floats (a
   ``GradQTempStorage``: lock, counter, 2 pad words and one fp32 tile, ``GmemTile::kElementsStored`` =
   threads x fragment elements = one kBlockSizeI x kBlockSizeJ tile; derived from the templates, not read
   as a number) and ``gk``, ``gv`` nonzero only where the kernel accumulates dK and dV in fp32
   (``kNeedsAccumGradK``: half inputs whose ``kMaxK`` exceeds ``kBlockSizeI``);
5. freed: ``delta`` when the launch lambda returns, then the workspace, then the gradient copy.

The kernel is the first of ``cutlassB.h``'s sm80 list (used for compute capability 8.0 to 9.x) whose
``kMaxK`` covers max(K, Kv); assumed: it fits the card's shared memory (true of the data-center parts;
on sm86/sm89 the 128 x 128 kernel may not, and a smaller tile is chosen), and the dropout variants share
the tile sizes. Pre-sm80 cards run other lists (and no flash); the scratch follows sm80 regardless.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

FLASH_SEQ_ROUNDING = 128  # seqlen_q_rounded = round_multiple(seqlen_q, 128)
HALF = (torch.float16, torch.bfloat16)

#: cutlassB.h's sm80 dispatch order without dropout: (kBlockSizeI, kBlockSizeJ, kMaxK).
EFFICIENT_BACKWARD_KERNELS = {
    "half": ((64, 64, 32), (64, 64, 64), (128, 128, 128), (64, 64, 128), (128, 64, 65536), (64, 64, 65536)),
    "float": ((64, 64, 32), (64, 64, 64), (128, 64, 128), (64, 64, 128), (128, 64, 65536), (64, 64, 65536)),
}


def _round_up(value, multiple: int):
    return (value + multiple - 1) // multiple * multiple


def _ceil_div(value, divisor: int):
    return (value + divisor - 1) // divisor


@contextlib.contextmanager
def gradient_copy(grad_output: torch.Tensor) -> Iterator[None]:
    """``grad_out.contiguous()`` in (B, S, H, D) order, held while the backward runs (both kernels)."""
    copy = None
    if not grad_output.transpose(1, 2).is_contiguous():
        copy = torch.empty(grad_output.shape, dtype=grad_output.dtype, device=grad_output.device)
    try:
        yield
    finally:
        del copy


def flash_backward_scratch(query: torch.Tensor, key: torch.Tensor) -> None:
    """Allocate and free ``mha_bwd``'s scratch, after the outputs (see the module docstring)."""
    batch, heads, seq_q, head_dim = query.shape
    seq_k, kv_heads = key.shape[-2], key.shape[-3]
    device = query.device
    rows = _round_up(seq_q, FLASH_SEQ_ROUNDING)
    softmax_d = torch.empty((batch, heads, rows), dtype=torch.float32, device=device)
    dq_accum = torch.empty((batch, rows, heads, _round_up(head_dim, 32 if head_dim <= 128 else 64)),
                           dtype=torch.float32, device=device)
    if kv_heads != heads:
        dk_expanded = torch.empty((batch, seq_k, heads, head_dim), dtype=query.dtype, device=device)
        dv_expanded = torch.empty((batch, seq_k, heads, head_dim), dtype=query.dtype, device=device)
        del dv_expanded, dk_expanded
    del dq_accum, softmax_d


def efficient_kernel(dtype: torch.dtype, head_dim: int, value_dim: int) -> tuple[int, int, int]:
    """(kBlockSizeI, kBlockSizeJ, kMaxK) of the backward kernel CUDA dispatches to on sm80 to sm9x."""
    kernels = EFFICIENT_BACKWARD_KERNELS["half" if dtype in HALF else "float"]
    return next(kernel for kernel in kernels if kernel[2] >= max(head_dim, value_dim))


def efficient_workspace_bytes(batch, heads: int, seq_q, seq_k, head_dim: int, value_dim: int,
                              dtype: torch.dtype):
    """``Params::workspace_size()`` of the kernel :func:`efficient_kernel` picks, in bytes."""
    block_i, block_j, max_k = efficient_kernel(dtype, head_dim, value_dim)
    grad_q = _ceil_div(seq_q, block_i) * _ceil_div(head_dim, block_j) * (block_i * block_j + 4)
    grad_kv = 0
    if dtype in HALF and max_k > block_i:  # kNeedsAccumGradK/V: the outputs are not kept in registers
        splits = _ceil_div(seq_k, block_j)
        if batch * heads >= 256 and seq_k <= 2 * block_j:
            splits = 1
        splits = max(1, min(splits, 200 // (batch * heads)))
        grad_kv = splits * block_j * (_round_up(head_dim, block_i) + _round_up(value_dim, block_i))
    return batch * heads * _round_up(grad_q + grad_kv, 4) * 4


def efficient_backward_scratch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Allocate and free ``_efficient_attention_backward``'s delta and workspace, after the outputs."""
    batch, heads, seq_q, head_dim = query.shape
    seq_k, value_dim = key.shape[-2], value.shape[-1]
    device = query.device
    if query.dtype in HALF:
        delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=device)
    else:
        product = torch.empty((batch, seq_q, heads, value_dim), dtype=torch.float32, device=device)
        summed = torch.empty((batch, seq_q, heads), dtype=torch.float32, device=device)
        delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=device) if heads > 1 else summed
        del summed, product
    workspace = torch.empty((efficient_workspace_bytes(batch, heads, seq_q, seq_k, head_dim, value_dim,
                                                       query.dtype),), dtype=torch.uint8, device=device)
    del delta, workspace
