"""T5 (original ReLU FFN) walked op by op: encoder, decoder, relative-position bias, fp16 clamps."""

from __future__ import annotations

from membench.analytic.sizes import BOOL, INT64
from membench.analytic.walk import _T, _Walk


def _t5_attention(w: _Walk, x_q: _T, x_kv: _T, prefix: str, sq: int, skv: int, mask: _T, cross: bool) -> _T:
    d = w.d
    inner = d.heads * d.head_dim
    q = w.linear(x_q, f"{prefix}.q", d.hidden, inner)
    k = w.linear(x_kv, f"{prefix}.k", d.hidden, inner)
    v = w.linear(x_kv, f"{prefix}.v", d.hidden, inner)
    if w.eager:
        # Under autocast the fp32 relative bias promotes the bf16 scores (self-attention only: the
        # cross-attention's zero bias is not added in eager mode), so softmax runs and keeps fp32.
        ctx = w.eager_attention(q, k, v, sq, skv, d.attention_dropout, probs_fp32=w.autocast and not cross,
                                q_contiguous=False)
    else:
        ctx = w.sdpa(q, k, v, sq, skv, d.heads, mask=mask, dropout=d.attention_dropout)
    return w.linear(ctx, f"{prefix}.o", inner, d.hidden)


def _t5_ffn(w: _Walk, x: _T, prefix: str) -> _T:
    d = w.d
    normed = w.rms_norm(x, t5=True)
    u = w.linear(normed, f"{prefix}.DenseReluDense.wi", d.hidden, d.ffn)
    u = w.new(u.numel, u.itemsize, u.grad)
    if u.grad:
        w.save("mlp", u)  # ReLU keeps its output
    u = w.dropout(u, d.hidden_dropout)
    y = w.linear(u, f"{prefix}.DenseReluDense.wo", d.ffn, d.hidden)
    return w.add(w.dropout(y, d.hidden_dropout), x)


def _t5_bias(w: _Walk, sq: int, skv: int) -> _T:
    """The relative-position bias (a, sq, skv), from the bias embedding (trainable in full fine-tuning)."""
    if w.full:
        w.save("position", w.new(sq * skv, INT64, False))  # the bucket indices the embedding keeps
    return w.new(w.d.heads * sq * skv, w.p, w.full)


def _t5(w: _Walk) -> None:
    d = w.d
    s, t = d.seq, d.target
    n_enc, n_dec = d.batch * s, d.batch * t
    h = d.hidden
    embed_grad = w.full or w.recompute
    # Encoder.
    if w.full:
        w.save("embeddings", _T(n_enc, INT64, False, preexisting=True))
    x = w.dropout(w.new(n_enc * h, w.p, embed_grad), d.hidden_dropout)
    bias = None
    for i in range(d.layers):
        prefix = f"encoder.block.{i}"
        if i == 0 and not w.recompute:
            bias = _t5_bias(w, s, s)
        if w.recompute:
            if i == 0:
                bias = w.new(d.heads * s * s, w.p, w.full)
                x = w.checkpointed_block(x)
            else:
                x = w.checkpointed_block(x, bias)
            continue
        normed = w.rms_norm(x, t5=True)
        mask = w.new(bias.numel, bias.itemsize, bias.grad)  # made contiguous per layer
        y = _t5_attention(w, normed, normed, f"{prefix}.layer.0.SelfAttention", s, s, mask, False)
        x = w.fp16_clamp(w.add(w.dropout(y, d.hidden_dropout), x))
        x = w.fp16_clamp(_t5_ffn(w, x, f"{prefix}.layer.1"))
    if w.recompute and not w.full:
        w.alive.append(x.nbytes)  # the last block's output stays referenced (see _Walk.alive)
    x = w.rms_norm(x, t5=True)
    enc = w.dropout(x, d.hidden_dropout)
    # Decoder: its input ids are the shifted labels (a new tensor).
    if w.full:
        w.save("embeddings", w.new(n_dec, INT64, False))
    y = w.dropout(w.new(n_dec * h, w.p, embed_grad), d.hidden_dropout)
    self_bias = cross_bias = None
    for i in range(d.decoder_layers):
        prefix = f"decoder.block.{i}"
        if w.recompute:
            if i == 0:
                self_bias = w.new(d.heads * t * t, w.p, w.full)
                cross_bias = w.new(d.heads * t * s, w.out_size, True)
                if w.eager:  # eager attention gets a materialised (b, 1, t, t) causal mask argument
                    w.checkpoint(w.new(d.batch * t * t, w.p, False))
                y = w.checkpointed_block(y, enc)
            else:
                y = w.checkpointed_block(y, self_bias, cross_bias)
            continue
        if i == 0:
            self_bias = _t5_bias(w, t, t)
            # Cross-attention has no relative bias: a zero tensor in the query's dtype that requires grad.
            cross_bias = w.new(d.heads * t * s, w.out_size, True)
        normed = w.rms_norm(y, t5=True)
        if self_bias.grad and not w.eager:
            w.save("position", w.new(t * t, BOOL, False))  # torch.where(causal, bias, min) keeps the condition
        mask = w.new(self_bias.numel, self_bias.itemsize, self_bias.grad)
        z = _t5_attention(w, normed, normed, f"{prefix}.layer.0.SelfAttention", t, t, mask, False)
        y = w.fp16_clamp(w.add(w.dropout(z, d.hidden_dropout), y))
        normed = w.rms_norm(y, t5=True)
        z = _t5_attention(w, normed, enc, f"{prefix}.layer.1.EncDecAttention", t, s, cross_bias, True)
        y = w.fp16_clamp(w.add(w.dropout(z, d.hidden_dropout), y))
        y = w.fp16_clamp(_t5_ffn(w, y, f"{prefix}.layer.2"))
    if w.recompute and not w.full:
        w.alive.append(y.nbytes)
    y = w.rms_norm(y, t5=True)
    y = w.dropout(y, d.hidden_dropout)
    if d.tied:
        y = w.new(y.numel, y.itemsize, y.grad)  # scaled by d_model ** -0.5 before the tied head
    logits = w.linear(y, "lm_head", h, d.vocab)
    labels = _T(n_dec, INT64, False, preexisting=True)
    w.head_loss(n_dec * d.vocab, logits.itemsize, False, labels)
