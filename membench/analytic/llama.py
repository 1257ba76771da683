"""LLaMA-style decoders (LLaMA, Mistral, Qwen2) walked op by op: RMSNorm, rotary, gated SiLU MLP, causal-LM loss."""

from __future__ import annotations

from membench.analytic.sizes import FP32, INT64
from membench.analytic.walk import _T, _Walk


def _llama(w: _Walk) -> None:
    d = w.d
    n = d.batch * d.seq
    h, a, g, hd = d.hidden, d.heads, d.kv_heads, d.head_dim
    if w.full:
        w.save("embeddings", _T(n, INT64, False, preexisting=True))
    x = w.new(n * h, w.p, w.full or w.recompute)
    # Rotary tables (1, s, d), in the embedding output's dtype, shared by every layer.
    cos, sin = w.new(d.seq * hd, w.p, False), w.new(d.seq * hd, w.p, False)
    for i in range(d.layers):
        if w.recompute:
            x = w.checkpointed_block(x)
            continue
        prefix = f"model.layers.{i}"
        normed = w.rms_norm(x, t5=False)
        q = w.linear(normed, f"{prefix}.self_attn.q_proj", h, a * hd)
        k = w.linear(normed, f"{prefix}.self_attn.k_proj", h, g * hd)
        v = w.linear(normed, f"{prefix}.self_attn.v_proj", h, g * hd)
        if q.grad or k.grad:
            w.save("position", cos, sin)  # q * cos and rotate_half(q) * sin keep the tables
        rope_size = FP32 if w.autocast else q.itemsize  # bf16 q times fp32 tables is fp32 under autocast
        q = w.new(q.numel, rope_size, q.grad)
        k = w.new(k.numel, rope_size, k.grad)
        if w.eager:
            if g != a:  # repeat_kv
                k = w.new(n * a * hd, k.itemsize, k.grad)
                v = w.new(n * a * hd, v.itemsize, v.grad)
            ctx = w.eager_attention(q, k, v, d.seq, d.seq, d.attention_dropout, probs_fp32=True, q_contiguous=True)
        else:
            ctx = w.sdpa(q, k, v, d.seq, d.seq, g, dropout=d.attention_dropout)
        y = w.linear(ctx, f"{prefix}.self_attn.o_proj", a * hd, h)
        x = w.add(y, x)
        normed = w.rms_norm(x, t5=False)
        gate = w.linear(normed, f"{prefix}.mlp.gate_proj", h, d.ffn)
        up = w.linear(normed, f"{prefix}.mlp.up_proj", h, d.ffn)
        if gate.grad:
            w.save("mlp", gate)  # SiLU keeps its input
        act = w.new(gate.numel, gate.itemsize, gate.grad)
        if up.grad:
            w.save("mlp", act)
        if act.grad:
            w.save("mlp", up)
        prod = w.new(up.numel, max(act.itemsize, up.itemsize), act.grad or up.grad)
        y = w.linear(prod, f"{prefix}.mlp.down_proj", d.ffn, h)
        x = w.add(y, x)
    if w.recompute:
        # Each checkpoint holds its arguments for the recomputation: the rotary tables and position ids.
        w.alive.extend([cos.nbytes, sin.nbytes, d.seq * INT64])
        if w.eager:  # eager attention gets a materialised (b, 1, s, s) causal mask, passed by keyword
            w.alive.append(d.batch * d.seq * d.seq * w.p)
    x = w.rms_norm(x, t5=False)
    logits = w.linear(x, "lm_head", h, d.vocab)
    # transformers' ForCausalLMLoss pads the labels by one column, then takes labels[..., 1:].contiguous().
    # For b > 1 that slice is strided, so contiguous() copies it: n int64. For b = 1 it is already
    # contiguous, so the loss keeps a view of the padded (1, s + 1) tensor: 8 bytes more.
    labels = w.new(n if d.batch > 1 else d.seq + 1, INT64, False)
    w.head_loss(n * d.vocab, logits.itemsize, True, labels)
