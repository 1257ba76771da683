"""RoBERTa (sequence classification) walked op by op: LayerNorm, GELU MLP, classifier head."""

from __future__ import annotations

from membench.analytic.sizes import BF16, INT64
from membench.analytic.walk import _T, _Walk


def _roberta(w: _Walk) -> None:
    d = w.d
    n = d.batch * d.seq
    h, inner = d.hidden, d.heads * d.head_dim
    embed_grad = w.full or w.recompute  # PEFT + checkpointing makes the embedding output require grad
    if w.full:
        ids = _T(n, INT64, False, preexisting=True)
        w.save("embeddings", ids, w.new(n, INT64, False), w.new(n, INT64, False))  # + token-type, position ids
    x = w.new(n * h, w.p, embed_grad)
    x = w.layer_norm(x, term="embeddings")
    x = w.dropout(x, d.hidden_dropout)
    for i in range(d.layers):
        if w.recompute:
            x = w.checkpointed_block(x)
            continue
        prefix = f"roberta.encoder.layer.{i}"
        q = w.linear(x, f"{prefix}.attention.self.query", h, inner)
        k = w.linear(x, f"{prefix}.attention.self.key", h, inner)
        v = w.linear(x, f"{prefix}.attention.self.value", h, inner)
        if w.eager:
            ctx = w.eager_attention(q, k, v, d.seq, d.seq, d.attention_dropout, probs_fp32=False, q_contiguous=False)
        else:
            ctx = w.sdpa(q, k, v, d.seq, d.seq, d.heads, dropout=d.attention_dropout)
        y = w.linear(ctx, f"{prefix}.attention.output.dense", inner, h)
        y = w.dropout(y, d.hidden_dropout)
        x = w.layer_norm(w.add(y, x))
        u = w.linear(x, f"{prefix}.intermediate.dense", h, d.ffn)
        if u.grad:
            w.save("mlp", u)  # GELU keeps its input
        u = w.new(u.numel, u.itemsize, u.grad)
        y = w.linear(u, f"{prefix}.output.dense", d.ffn, h)
        y = w.dropout(y, d.hidden_dropout)
        x = w.layer_norm(w.add(y, x))
    if w.recompute and not w.full:
        w.alive.append(x.nbytes)  # the last block's output stays referenced (see _Walk.alive)
    # Classification head (trained in full by PEFT's modules_to_save): features[:, 0] -> dropout -> dense
    # -> tanh -> dropout -> out_proj. With p = 0 the dense input is a view of the whole last hidden state.
    rows = d.batch * h
    c = x
    if d.hidden_dropout > 0:
        c = w.dropout(w.new(rows, x.itemsize, x.grad), d.hidden_dropout)
    c = w._matmul(c, "classifier.dense", h, h, True, "head")
    c = w.new(rows, c.itemsize, True)
    w.save("head", c)  # tanh keeps its output
    c2 = w.dropout(c, d.hidden_dropout)
    w._matmul(c2, "classifier.out_proj", h, d.num_labels, True, "head")
    labels = _T(d.batch, INT64, False, preexisting=True)
    w.head_loss(d.batch * d.num_labels, BF16 if w.autocast else w.p, False, labels)
