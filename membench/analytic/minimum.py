"""LoRA-FA's physical minimum: the fewest bytes any implementation must keep, without recomputation."""

from __future__ import annotations

from membench.analytic.sizes import FP32, ITEMSIZE, LORA_FA_DEFAULT_RANK, _dims
from membench.config import RunConfig


def lora_fa_minimum(run: RunConfig, hf_config, adapted: list) -> int:
    """The fewest bytes LoRA-FA must keep from forward to backward, with no recomputation.

    Assumptions (a lower bound for any implementation, not what PEFT does):

    * Each adapted layer keeps ``XA`` (``n r`` elements in the adapter dtype): ``lora_B``'s
      weight gradient is ``(XA)^T dY`` and, with ``A`` frozen, nothing else is needed for it.
    * The frozen base network must still carry the gradient back to every earlier adapter.
      Linear maps and residual additions need no activations (only their weights). What the
      nonlinear parts need is counted once, in the model dtype ``p``:

      - attention: a fused (flash-style) kernel's ``q, k, v`` (``g`` key/value heads), output
        and fp32 log-sum-exp; no ``s x s`` probabilities; a T5 bias once per stack;
      - each norm after the first adapter: its input ``n h p`` and fp32 statistics
        (``n`` each: rstd, plus the mean for LayerNorm);
      - GELU/SiLU: the input ``n I p``; LLaMA's gated product both factors ``2 n I p``;
        ReLU: a sign mask ``n I`` bytes;
      - dropout masks: none (regenerated from the RNG seed, as fused attention already does);
      - the head: the loss's log-probabilities (fp32 where the loss upcasts, as causal LMs do)
        and RoBERTa's fully trained classifier head inputs.
    * The first block's input norm precedes every adapter, so it needs nothing.
    """
    d = _dims(run, hf_config)
    p = ITEMSIZE[run.train.precision]
    q = FP32 if (run.method.adapter_dtype == "fp32" or run.train.precision == "bf16-autocast") else p
    rank = run.method.rank or LORA_FA_DEFAULT_RANK
    b, h, a, g, hd, ffn = d.batch, d.hidden, d.heads, d.kv_heads, d.head_dim, d.ffn
    family = hf_config.model_type

    def tokens(name: str) -> int:
        """Rows of an adapted layer's input: T5's decoder runs on t tokens, its cross-attention k/v on s."""
        if family == "t5" and name.startswith("decoder"):
            cross_kv = ".EncDecAttention." in name and name.rsplit(".", 1)[-1] in ("k", "v")
            return b * (d.seq if cross_kv else d.target)
        return b * d.seq

    def attention(sq: int, skv: int, kv_heads: int) -> int:
        """Flash-style attention: q and output (sq rows), k and v (skv rows), fp32 log-sum-exp."""
        return b * (2 * sq * a * hd + 2 * skv * kv_heads * hd) * p + b * a * sq * FP32

    def norm(rows: int, stats: int) -> int:
        """A norm's input plus its fp32 per-row statistics."""
        return rows * h * p + stats * rows * FP32

    total = sum(tokens(layer.name) * rank * q for layer in adapted)  # XA, for lora_B's gradient
    if family == "roberta":
        n = b * d.seq
        total += d.layers * (attention(d.seq, d.seq, a) + 2 * norm(n, 2) + n * ffn * p)  # GELU input
        total += 3 * b * h * p + b * d.num_labels * p  # classifier head inputs, log-probabilities
    elif family == "t5":
        ne, nd = b * d.seq, b * d.target
        # ReLU needs only a sign mask; the first norm of each stack precedes every adapter.
        total += d.layers * (attention(d.seq, d.seq, a) + 2 * norm(ne, 1) + ne * ffn) - norm(ne, 1)
        total += a * d.seq * d.seq * p + norm(ne, 1)  # shared relative bias, final norm
        total += d.decoder_layers * (attention(d.target, d.target, a) + attention(d.target, d.seq, a)
                                     + 3 * norm(nd, 1) + nd * ffn) - norm(nd, 1)
        total += a * d.target * d.target * p + norm(nd, 1) + nd * d.vocab * p
    else:
        n = b * d.seq
        total += d.layers * (attention(d.seq, d.seq, g) + 2 * norm(n, 1) + 2 * n * ffn * p) - norm(n, 1)
        total += norm(n, 1) + 2 * d.seq * hd * p  # final norm, rotary tables
        total += n * d.vocab * FP32  # the causal-LM loss runs in fp32
    return total
