"""torch: the dropout and SDPA routing, and the private kernels the CUDA emulation calls.

Used by :mod:`membench.backends.cuda_semantics`, which holds the emulation itself.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from membench.compat._checks import require, require_op


DROPOUT_PARAMETERS = ["input", "p", "training", "inplace"]
SDPA_PARAMETERS = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
_ROUTING_NEED = "to make CPU tensors save for backward what CUDA's kernels save (cuda_semantics)"
_EMULATION_OPS = {
    "_safe_softmax": ["self", "dim", "dtype"],
    "_scaled_dot_product_flash_attention_for_cpu": ["query", "key", "value", "dropout_p", "is_causal", "attn_mask",
                                                    "scale"],
    "_scaled_dot_product_flash_attention_for_cpu_backward": ["grad_out", "query", "key", "value", "out", "logsumexp",
                                                             "dropout_p", "is_causal", "attn_mask", "scale"],
    "native_dropout": ["input", "p", "train"],
}


def check_dropout_and_sdpa_routing() -> None:
    """The functions :func:`route_dropout_and_sdpa_like_cuda` swaps, and the kernels the emulation calls."""
    # The replacements take exactly these parameters: a new one upstream would be refused by them.
    require("torch", F, "torch.nn.functional.dropout", DROPOUT_PARAMETERS, _ROUTING_NEED)
    require("torch", F, "torch.nn.functional.scaled_dot_product_attention", SDPA_PARAMETERS, _ROUTING_NEED)
    for name, arguments in _EMULATION_OPS.items():
        require_op(name, arguments, _ROUTING_NEED)
    require("torch", torch.backends.cuda, "torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed", [],
            "to know whether CUDA's math attention upcasts fp16/bf16 inputs")


@contextlib.contextmanager
def route_dropout_and_sdpa_like_cuda(dropout: Callable[[Callable], Callable],
                                     sdpa: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace ``F.dropout`` and ``F.scaled_dot_product_attention`` while active; restore them on exit.

    ``dropout(original)`` and ``sdpa(original)`` make the replacements, which
    get the originals to fall back on. Swapped in ``torch.nn.functional``, not
    intercepted with a ``TorchFunctionMode``: function modes are off inside
    backward, where activation checkpointing recomputes the forward. Cost: the
    swap is process-wide, so one measurement per process at a time.
    """
    check_dropout_and_sdpa_routing()
    original = (F.dropout, F.scaled_dot_product_attention)
    F.dropout, F.scaled_dot_product_attention = dropout(original[0]), sdpa(original[1])
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = original


def safe_softmax(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """``aten._safe_softmax``: the softmax CUDA's math attention runs (a fully masked row gives zeros)."""
    return torch.ops.aten._safe_softmax.default(scores, dim)


def cpu_flash_attention(query, key, value, is_causal: bool, attn_mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten._scaled_dot_product_flash_attention_for_cpu`` without dropout: (output, logsumexp), no S x S kept."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


def cpu_flash_attention_backward(grad_output, query, key, value, output, logsumexp, is_causal: bool, attn_mask,
                                 scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`cpu_flash_attention`: (grad_query, grad_key, grad_value)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_output, query, key, value, output, logsumexp, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


def math_sdp_reduces_in_half_precision() -> bool:
    """Whether CUDA's math attention keeps fp16/bf16 inputs as they are (else it upcasts them to fp32)."""
    return torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
