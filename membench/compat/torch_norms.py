"""torch: the LayerNorm and softmax routing, and the LayerNorm kernels the CUDA emulation calls.

Used by :mod:`membench.backends.cuda_semantics`, which holds the emulation itself.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from membench.compat._checks import require, require_op


LAYER_NORM_PARAMETERS = ["input", "normalized_shape", "weight", "bias", "eps"]
SOFTMAX_PARAMETERS = ["input", "dim", "_stacklevel", "dtype"]
_ROUTING_NEED = ("to make CPU tensors save for backward what CUDA's LayerNorm and autocast softmax save "
                 "(cuda_semantics)")
_LAYER_NORM_OPS = {
    "native_layer_norm": ["input", "normalized_shape", "weight", "bias", "eps"],
    "native_layer_norm_backward": ["grad_out", "input", "normalized_shape", "mean", "rstd", "weight", "bias",
                                   "output_mask"],
}


def check_layer_norm_and_softmax_routing() -> None:
    """The functions :func:`route_layer_norm_and_softmax_like_cuda` swaps, and the kernels the emulation calls."""
    # The replacements take exactly these parameters: a new one upstream would be refused by them.
    require("torch", F, "torch.nn.functional.layer_norm", LAYER_NORM_PARAMETERS, _ROUTING_NEED)
    require("torch", F, "torch.nn.functional.softmax", SOFTMAX_PARAMETERS, _ROUTING_NEED)
    for name, arguments in _LAYER_NORM_OPS.items():
        require_op(name, arguments, _ROUTING_NEED)


@contextlib.contextmanager
def route_layer_norm_and_softmax_like_cuda(layer_norm: Callable[[Callable], Callable],
                                           softmax: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace ``F.layer_norm`` and ``F.softmax`` while active; restore them on exit.

    ``layer_norm(original)`` and ``softmax(original)`` make the replacements, which get the
    originals to fall back on. ``nn.LayerNorm`` and transformers' eager attention (RoBERTa, T5)
    look both up in ``torch.nn.functional`` at call time. Swapped, not intercepted with a
    ``TorchFunctionMode``, for the reason :func:`route_dropout_and_sdpa_like_cuda` gives
    (function modes are off inside backward, where checkpointing recomputes); the same cost:
    process-wide, one measurement per process at a time. ``torch.softmax`` and
    ``Tensor.softmax`` are not routed (none of the modelled families calls them).
    """
    check_layer_norm_and_softmax_routing()
    original = (F.layer_norm, F.softmax)
    F.layer_norm, F.softmax = layer_norm(original[0]), softmax(original[1])
    try:
        yield
    finally:
        F.layer_norm, F.softmax = original


def layer_norm_forward(input, normalized_shape, weight, bias, eps: float):
    """``aten.native_layer_norm``: (output, mean, rstd), the statistics shaped (..., 1)."""
    return torch.ops.aten.native_layer_norm.default(input, normalized_shape, weight, bias, eps)


def layer_norm_backward(grad_output, input, normalized_shape, mean, rstd, weight, bias,
                        output_mask: list[bool]):
    """``aten.native_layer_norm_backward``: (grad_input, grad_weight, grad_bias), None where not asked for."""
    return torch.ops.aten.native_layer_norm_backward.default(grad_output, input, normalized_shape, mean, rstd,
                                                             weight, bias, output_mask)
