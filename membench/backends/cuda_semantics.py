"""Make CPU tensors save for backward what CUDA kernels save.

Memory, not numerics, is what differs between the CPU and CUDA code paths of
four functions that the models here call:

* ``F.dropout``: on CUDA it runs ``native_dropout`` and saves a **bool** mask
  (1 byte per element). The CPU path saves a **float** mask (4 bytes in fp32);
  on RoBERTa-large that made a CPU simulation 1.13 GiB too high
  against the H100. We call ``native_dropout`` instead.
* ``F.scaled_dot_product_attention``: CUDA picks flash, memory-efficient or
  math by dtype, mask, layout and grouped-query attention
  (:func:`cuda_attention_kernel`). The fused kernels draw their dropout mask
  from a Philox seed and save only output + logsumexp; the CPU flash kernel
  refuses dropout, so plain CPU falls back to the math path with its S x S
  probabilities and float mask. We call the CPU flash kernel with dropout 0
  where CUDA would run a fused kernel, and mirror the math kernel op for op
  (with a bool dropout mask) where CUDA would run math. The skipped attention
  dropout changes numbers in the loss, never the bytes. Where CUDA runs the
  memory-efficient kernel, the saved log-sum-exp has its query rows rounded up
  to a multiple of 32 (``kAlignLSE`` in ``_efficient_attention_forward``,
  aten/src/ATen/native/transformers/cuda/attention.cu; the meta kernel in
  torch/_meta_registrations.py does the same); flash's is not padded.
* ``F.layer_norm``: CUDA's ``layer_norm_cuda`` allocates ``mean`` and ``rstd``
  in the accumulate type, fp32 for fp16/bf16 inputs; the CPU kernel uses the
  parameters' dtype (torch/_refs/__init__.py's ``native_layer_norm`` converts
  them to the input dtype only on CPU). Half inputs with half parameters run
  :class:`_LayerNormFp32Statistics`, which keeps fp32 statistics. Under
  autocast, LayerNorm is on CUDA's fp32 list (not on CPU's): inputs are cast.
* ``F.softmax`` under autocast: CUDA runs it as ``fp32_set_opt_dtype``
  (aten/src/ATen/autocast_mode.cpp, ``AT_FORALL_FP32_SET_OPT_DTYPE``), so a
  bf16 input gives (and saves) an fp32 output; CPU autocast has no softmax
  entry. We pass ``dtype=torch.float32`` as CUDA's autocast does, which runs
  the same ops (a cast, then ``_softmax``).

Not modelled: cuDNN attention (preferred on H100 by some torch releases; it
saves about what flash saves), flash's padding of head dims to a multiple of 8,
and the padded mask copy the efficient kernel makes for a mask whose strides
are not multiples of 8. Transients CUDA does not make, freed within the op:
the half statistics the CPU LayerNorm kernel returns (forward) and the half
copies of the fp32 ones its backward needs (2 x rows x 2 bytes each time), and
the unpadded log-sum-exp the CPU flash kernel returns (B x H x S x 4 bytes).
"""

from __future__ import annotations

import contextlib
import math

import torch

from membench import compat
from membench.attention import sdpa_kernel
from membench.backends import attention_scratch

FLASH_DTYPES = (torch.float16, torch.bfloat16)


def cuda_attention_kernel(query, key, value, attn_mask, enable_gqa) -> str:
    """The SDPA kernel CUDA picks for these tensors (:func:`membench.attention.sdpa_kernel`)."""
    inputs_strided = any(t.stride(-1) != 1 and t.shape[-1] != 1 for t in (query, key, value))
    mask_strided = attn_mask is not None and attn_mask.stride(-1) != 1
    return sdpa_kernel(
        half_precision=query.dtype in FLASH_DTYPES,
        head_dim=query.shape[-1],
        has_mask=attn_mask is not None,
        grouped=enable_gqa and key.shape[-3] != query.shape[-3],
        last_dim_strided=inputs_strided or mask_strided,
        fused_dtype=query.dtype in (*FLASH_DTYPES, torch.float32),
    )


def _additive(attn_mask, dtype):
    """A bool mask as the additive float mask SDPA converts it to."""
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(~attn_mask, float("-inf"))


def _math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """CUDA's math kernel, op for op (``_scaled_dot_product_attention_math``), dropout as on CUDA.

    Same ops in the same order, so the same tensors are saved and the same
    temporaries made; only the dropout differs from the CPU build of that
    kernel: ``native_dropout`` keeps a bool mask.
    """
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: pass attn_mask or is_causal, not both")
    original_dtype = query.dtype
    attn_mask = _additive(attn_mask, original_dtype)  # SDPA converts a bool mask before the kernel
    upcast = original_dtype in FLASH_DTYPES and not compat.math_sdp_reduces_in_half_precision()
    if upcast:  # the kernel keeps q, k, v in fp32 for accuracy
        query, key, value = query.float(), key.float(), value.float()
    factor = math.sqrt(abs(scale) if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
    query = query * (-factor if scale is not None and scale < 0 else factor)
    if is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        attn_mask = _additive(causal, query.dtype)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scores = query @ (key.transpose(-2, -1) * factor)
    if attn_mask is not None:
        scores.add_(attn_mask)
    probabilities = compat.safe_softmax(scores, -1)
    if dropout_p > 0.0:
        probabilities = torch.ops.aten.native_dropout(probabilities, dropout_p, True)[0]
    output = (probabilities @ value).to(original_dtype)
    probabilities.to(original_dtype)  # the kernel's second output: made, then dropped by SDPA
    return output


LSE_ROW_ALIGNMENT = 32  # kAlignLSE: the efficient kernel's log-sum-exp has its query rows rounded up to this


def _padded_logsumexp(logsumexp: torch.Tensor) -> torch.Tensor:
    """The CPU flash kernel's (B, H, S) log-sum-exp in a storage as large as CUDA's efficient kernel allocates.

    CUDA's is (B, H, ceil(S / 32) * 32) fp32. This keeps the CPU kernel's layout and strides (its
    backward reads them) at the start of a storage of that size, so the bytes kept are CUDA's.
    """
    batch, heads, rows = logsumexp.shape
    padded_rows = -(-rows // LSE_ROW_ALIGNMENT) * LSE_ROW_ALIGNMENT
    if padded_rows == rows:
        return logsumexp
    storage = logsumexp.new_empty(batch * heads * padded_rows)
    view = storage.as_strided(logsumexp.shape, logsumexp.stride())
    return view.copy_(logsumexp)


class _FusedAttentionSavings(torch.autograd.Function):
    """CUDA's memory-efficient kernel: what it keeps for backward, on CPU tensors.

    Forward runs the CPU flash kernel (no S x S intermediates) and saves what the
    efficient kernel saves: q, k, v, bias, output and the log-sum-exp, padded as
    CUDA pads it (:func:`_padded_logsumexp`). Backward makes the kernel's
    outputs: dq, dk, dv from the CPU flash backward, and, when the bias needs one
    (T5 fine-tuned in full; the CPU flash kernel cannot differentiate its mask),
    the bias gradient, computed in place so that only one S x S temporary exists
    beside it.
    """

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale):
        output, logsumexp = compat.cpu_flash_attention(query, key, value, is_causal, attn_mask, scale)
        logsumexp = _padded_logsumexp(logsumexp)
        ctx.save_for_backward(query, key, value, attn_mask, output, logsumexp)
        ctx.is_causal, ctx.scale = is_causal, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, attn_mask, output, logsumexp = ctx.saved_tensors
        with attention_scratch.gradient_copy(grad_output):
            grad_query, grad_key, grad_value = compat.cpu_flash_attention_backward(
                grad_output, query, key, value, output, logsumexp, ctx.is_causal, attn_mask, ctx.scale)
            grad_mask = _bias_gradient(ctx, grad_output, query, key, value, attn_mask, output, logsumexp)
            attention_scratch.efficient_backward_scratch(query, key, value)
        return grad_query, grad_key, grad_value, grad_mask, None, None


def _bias_gradient(ctx, grad_output, query, key, value, attn_mask, output, logsumexp):
    """The efficient kernel's gradient of its additive bias (None when the bias needs none)."""
    grad_mask = None
    if ctx.needs_input_grad[3]:
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(query.shape[-1])
        # dS = P * (dP - rowsum(dO * O)), with P = exp(QK^T * scale + bias - logsumexp).
        probabilities = (query @ key.transpose(-2, -1)).mul_(scale).add_(attn_mask)
        probabilities.sub_(logsumexp.unsqueeze(-1).to(probabilities.dtype)).exp_()
        grad_scores = grad_output @ value.transpose(-2, -1)
        grad_scores.sub_((grad_output * output).sum(-1, keepdim=True)).mul_(probabilities)
        del probabilities
        grad_mask = grad_scores.sum_to_size(attn_mask.shape)
    return grad_mask


class _FlashAttention(torch.autograd.Function):
    """CUDA's flash kernel on CPU tensors: the CPU flash kernel, which saves what flash saves (q, k, v,
    output, log-sum-exp), and in backward the scratch ``mha_bwd`` allocates (:mod:`attention_scratch`)."""

    @staticmethod
    def forward(ctx, query, key, value, is_causal, scale):
        output, logsumexp = compat.cpu_flash_attention(query, key, value, is_causal, None, scale)
        ctx.save_for_backward(query, key, value, output, logsumexp)
        ctx.is_causal, ctx.scale = is_causal, scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, logsumexp = ctx.saved_tensors
        with attention_scratch.gradient_copy(grad_output):
            grads = compat.cpu_flash_attention_backward(
                grad_output, query, key, value, output, logsumexp, ctx.is_causal, None, ctx.scale)
            attention_scratch.flash_backward_scratch(query, key)
        return *grads, None, None


def _attention_as_on_cuda(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Attention that saves for backward what CUDA's chosen kernel saves."""
    kernel = cuda_attention_kernel(query, key, value, attn_mask, enable_gqa)
    if kernel == "math":
        return _math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    attn_mask = _additive(attn_mask, query.dtype)
    if kernel == "efficient" or (attn_mask is not None and attn_mask.requires_grad):
        return _FusedAttentionSavings.apply(query, key, value, attn_mask, is_causal, scale)
    # flash keeps output + logsumexp (and its inputs); the CPU flash kernel does the same, and like
    # CUDA's flash it takes fewer key/value heads as they are. Flash takes no mask.
    return _FlashAttention.apply(query, key, value, is_causal, scale)


def _under_autocast(query, key, value, attn_mask):
    """Cast as autocast casts SDPA's inputs (it is on the lower-precision list), or return them as they are."""
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return query, key, value, attn_mask
    dtype = torch.get_autocast_dtype(device)
    cast = lambda t: t.to(dtype) if t is not None and t.is_floating_point() else t  # noqa: E731
    return cast(query), cast(key), cast(value), cast(attn_mask)


def _cuda_dropout(original_dropout):
    """``F.dropout`` keeping a bool mask on CPU tensors, as CUDA's ``native_dropout`` does."""

    def dropout(input, p=0.5, training=True, inplace=False):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        if not training or p in (0.0, 1.0) or inplace or input.device.type != "cpu":
            return original_dropout(input, p, training, inplace)  # as on CUDA: no fused kernel here
        output, _mask = torch.ops.aten.native_dropout(input, p, True)
        return output

    return dropout


def _cuda_sdpa(original_sdpa):
    """``F.scaled_dot_product_attention`` saving, on CPU tensors, what CUDA's chosen kernel saves."""

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if query.device.type != "cpu":
            return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                 is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        query, key, value, attn_mask = _under_autocast(query, key, value, attn_mask)
        with torch.autocast(query.device.type, enabled=False):
            return _attention_as_on_cuda(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    return scaled_dot_product_attention


class _LayerNormFp32Statistics(torch.autograd.Function):
    """LayerNorm of a half input with half parameters, keeping fp32 ``mean`` and ``rstd`` as CUDA does.

    The CPU kernel computes the statistics in fp32 and returns them rounded to the
    input dtype; this keeps fp32 copies of those rounded values and hands the
    backward kernel half copies again, so output and gradients are the CPU
    kernel's, bit for bit. Saved: input, weight, bias, mean, rstd, what
    ``native_layer_norm``'s own backward keeps.
    """

    @staticmethod
    def forward(ctx, input, normalized_shape, weight, bias, eps):
        output, mean, rstd = compat.layer_norm_forward(input, normalized_shape, weight, bias, eps)
        mean, rstd = mean.float(), rstd.float()
        ctx.save_for_backward(input, weight, bias, mean, rstd)
        ctx.normalized_shape = normalized_shape
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias, mean, rstd = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_input, grad_weight, grad_bias = compat.layer_norm_backward(
            grad_output, input, ctx.normalized_shape, mean.to(input.dtype), rstd.to(input.dtype), weight, bias,
            wanted)
        return grad_input, None, grad_weight, grad_bias, None


def _autocast_fp32(tensor):
    """CUDA autocast's fp32 policy for one argument: floating tensors below fp32 are cast up."""
    eligible = tensor is not None and tensor.is_floating_point() and tensor.dtype not in (torch.float32,
                                                                                         torch.float64)
    return tensor.float() if eligible else tensor


def _cuda_layer_norm(original_layer_norm):
    """``F.layer_norm`` keeping, on CPU tensors, fp32 statistics for half inputs as CUDA's kernel does."""

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        if input.device.type != "cpu":
            return original_layer_norm(input, normalized_shape, weight, bias, eps)
        if torch.is_autocast_enabled("cpu"):  # layer_norm is on CUDA autocast's fp32 list (not on CPU's)
            input, weight, bias = _autocast_fp32(input), _autocast_fp32(weight), _autocast_fp32(bias)
        half_parameters = all(t is None or t.dtype == input.dtype for t in (weight, bias))
        if input.dtype not in FLASH_DTYPES or not half_parameters:
            # fp32 statistics already: fp32 inputs, or half inputs with fp32 parameters (the mixed kernel)
            return original_layer_norm(input, normalized_shape, weight, bias, eps)
        return _LayerNormFp32Statistics.apply(input, list(normalized_shape), weight, bias, eps)

    return layer_norm


def _cuda_softmax(original_softmax):
    """``F.softmax`` under CPU autocast run as CUDA autocast runs it: in fp32 unless a dtype is given."""

    def softmax(input, dim=None, _stacklevel=3, dtype=None):
        if (dtype is None and input.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and input.is_floating_point() and input.dtype != torch.float64):
            dtype = torch.float32  # fp32_set_opt_dtype
        return original_softmax(input, dim, _stacklevel, dtype)

    return softmax


class CudaSemantics:
    """Context manager: ``F.dropout``, ``F.scaled_dot_product_attention``, ``F.layer_norm`` and
    ``F.softmax`` save CUDA's bytes on CPU; with ``quantized``, bitsandbytes' 4-bit matmul
    allocates CUDA's temporaries (:mod:`membench.backends.quantized_kernels`).

    The swaps themselves, and why they are swaps, are
    :func:`membench.compat.route_dropout_and_sdpa_like_cuda` and
    :func:`membench.compat.route_layer_norm_and_softmax_like_cuda`; they are process-wide,
    so one measurement per process at a time, and this object is not re-entrant.
    """

    def __init__(self, quantized: bool = False) -> None:
        self._routes = None
        self._quantized = quantized  # bitsandbytes layers: their 4-bit matmul's CUDA temporaries too

    def __enter__(self) -> "CudaSemantics":
        if self._routes is not None:
            raise RuntimeError("CudaSemantics is already active")
        stack = contextlib.ExitStack()
        with stack:
            stack.enter_context(compat.route_dropout_and_sdpa_like_cuda(_cuda_dropout, _cuda_sdpa))
            stack.enter_context(compat.route_layer_norm_and_softmax_like_cuda(_cuda_layer_norm, _cuda_softmax))
            if self._quantized:
                from membench.backends.quantized_kernels import Gemm4bitAsOnCuda

                stack.enter_context(Gemm4bitAsOnCuda())
            self._routes = stack.pop_all()
        return self

    def __exit__(self, *exc_info) -> None:
        routes, self._routes = self._routes, None
        routes.__exit__(*exc_info)
