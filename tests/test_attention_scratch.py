"""The scratch CUDA's fused attention backward allocates inside the op: sizes by hand, order, and peaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from membench.backends.attention_scratch import efficient_kernel, efficient_workspace_bytes
from membench.backends.cuda_semantics import CudaSemantics
from membench.backends.tracker import AllocationTracker
from membench.events import ALLOC, FREE, PHASE

B, H, S = 2, 4, 40  # 40 query rows: flash rounds them to 128


def backward_events(dtype, head_dim, kv_heads=H, mask=None, transposed_grad=False):
    """The allocation log of one attention backward under CudaSemantics: [(ALLOC, nbytes) | (FREE, nbytes)]."""
    torch.manual_seed(0)
    query = torch.randn(B, H, S, head_dim, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(B, kv_heads, S, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
    tracker = AllocationTracker("cpu")
    events = tracker.record()
    with CudaSemantics(), tracker:
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=kv_heads != H)
        # An upstream gradient laid out (B, S, H, D), as after LLaMA's transpose + reshape, or (B, H, S, D).
        grad = torch.ones(B, S, H, head_dim, dtype=dtype).transpose(1, 2)
        grad = grad.contiguous() if transposed_grad else grad
        events.append((PHASE, "backward", ""))
        torch.autograd.grad(output, (query, key, value), grad)
    start = next(i for i, e in enumerate(events) if e[0] == PHASE)
    sizes, log = {}, []
    for event in events[start + 1:]:
        if event[0] == ALLOC:
            sizes[event[1]] = event[2]
            log.append((ALLOC, event[2]))
        elif event[0] == FREE and event[1] in sizes:
            log.append((FREE, sizes.pop(event[1])))
    return log


def A(size):  # noqa: N802 - reads like the log
    return (ALLOC, size)


def F_(size):  # noqa: N802
    return (FREE, size)


def test_flash_scratch_after_the_outputs_then_freed_in_reverse():
    grad, softmax_d, dq_accum = B * H * S * 64 * 2, B * H * 128 * 4, B * 128 * H * 64 * 4
    # dq, dk, dv; softmax_d and dq_accum (rows rounded to 128); mha_bwd's locals die; the caller drops softmax_d.
    # The upstream gradient is laid out (B, S, H, D) already: no copy. Last: the test drops the gradients.
    assert backward_events(torch.bfloat16, 64) == [A(grad)] * 3 + [A(softmax_d), A(dq_accum), F_(dq_accum),
                                                                   F_(softmax_d)] + [F_(grad)] * 3


@pytest.mark.parametrize(("head_dim", "rounded"), [(72, 96), (160, 192)])
def test_flash_dq_accum_rounds_the_head_dim_as_mha_bwd(head_dim, rounded):
    assert A(B * 128 * H * rounded * 4) in backward_events(torch.float16, head_dim)


def test_flash_grouped_query_attention_expands_dk_and_dv():
    grad_q, grad_kv, expanded = B * H * S * 64 * 2, B * 2 * S * 64 * 2, B * S * H * 64 * 2
    softmax_d, dq_accum = B * H * 128 * 4, B * 128 * H * 64 * 4
    assert backward_events(torch.bfloat16, 64, kv_heads=2)[:11] == [
        A(grad_q), A(grad_kv), A(grad_kv), A(softmax_d), A(dq_accum), A(expanded), A(expanded),
        F_(expanded), F_(expanded), F_(dq_accum), F_(softmax_d)]


def test_a_gradient_not_laid_out_as_the_kernel_wants_is_copied_first():
    grad, softmax_d, dq_accum = B * H * S * 64 * 2, B * H * 128 * 4, B * 128 * H * 64 * 4
    assert backward_events(torch.bfloat16, 64, transposed_grad=True)[:8] == [
        A(grad)] + [A(grad)] * 3 + [A(softmax_d), A(dq_accum), F_(dq_accum), F_(softmax_d)]
    assert backward_events(torch.bfloat16, 64, transposed_grad=True)[8] == F_(grad)  # held until the op returns


def test_efficient_fp32_delta_temporaries_and_workspace():
    grad = B * H * S * 16 * 4
    product, summed, delta = B * S * H * 16 * 4, B * S * H * 4, B * H * S * 4
    workspace = B * H * (64 * 64 + 4) * 4  # 64x64 kernel (kMaxK 32): ceil(40/64) * ceil(16/64) tiles of 64*64 + 4 floats
    assert backward_events(torch.float32, 16)[:11] == [A(grad)] * 3 + [
        A(product), A(summed), A(delta), F_(summed), F_(product), A(workspace), F_(delta), F_(workspace)]


def test_efficient_half_inputs_keep_one_fp32_delta():
    mask = torch.zeros(1, 1, S, S, dtype=torch.bfloat16)  # a mask rules flash out
    grad, delta, workspace = B * H * S * 32 * 2, B * H * S * 4, B * H * (64 * 64 + 4) * 4
    assert backward_events(torch.bfloat16, 32, mask=mask)[:7] == [A(grad)] * 3 + [
        A(delta), A(workspace), F_(delta), F_(workspace)]


def test_efficient_workspace_by_hand():
    # bf16, head dim 64: the 64x64 kernel; 16 query tiles of 64 rows, one head-dim tile: 16 * 4100 floats.
    assert efficient_kernel(torch.bfloat16, 64, 64) == (64, 64, 64)
    assert efficient_workspace_bytes(8, 16, 1024, 1024, 64, 64, torch.bfloat16) == 8 * 16 * 16 * 4100 * 4
    # fp32 head dim 128: the 128x64 kernel; fp32 never accumulates dK/dV in the workspace.
    assert efficient_kernel(torch.float32, 128, 128) == (128, 64, 128)
    assert efficient_workspace_bytes(1, 1, 256, 256, 128, 128, torch.float32) == 2 * 2 * (128 * 64 + 4) * 4
    # half head dim 256: kMaxK 65536 > kBlockSizeI, so dK and dV accumulate in fp32 per key split.
    assert efficient_kernel(torch.float16, 256, 256) == (128, 64, 65536)
    splits = min(4, 200 // 2)  # ceil(256 / 64) key splits, at most 200 / (B * H)
    expected = 2 * (2 * 4 * (128 * 64 + 4) + splits * 64 * (256 + 256)) * 4
    assert efficient_workspace_bytes(2, 1, 256, 256, 256, 256, torch.float16) == expected
