"""Korthikanti et al.'s closed form for a transformer's activations, with LoRA terms.

Unlike the symbolic walk (:mod:`membench.analytic.walk`), this is a formula from the
architecture alone: the one papers quote. Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models" (arXiv 2205.05198, section 4.1), count the
activations one transformer layer keeps, with 2-byte activations and 1-byte dropout masks,
no sequence or tensor parallelism, as

    s b h (34 + 5 a s / h)  bytes,

from (in elements of ``s b h`` unless noted, ``x 2`` bytes, masks ``x 1``):

* attention, ``11 s b h + 5 a s^2 b`` bytes: the QKV input (1), Q and K (2), the softmax output
  (``a s^2 b``), its dropout mask (``a s^2 b``, 1 byte), the dropped probabilities
  (``a s^2 b``), V (1), the output projection's input (1), the dropout mask after it (1 byte);
* MLP, ``19 s b h`` bytes: the first linear's input (1), GeLU's input (4, the FFN is ``4h``),
  the second linear's input (4), a dropout mask (1 byte);
* two LayerNorm inputs, ``4 s b h`` bytes.

With ``p`` bytes per activation (4 in fp32) the same count is
``s b h (16 p + 2) + a s^2 b (2 p + 1)``, which is ``34 s b h + 5 a s^2 b`` at ``p = 2``.

LoRA terms (per adapted linear with input width ``k`` on ``n`` tokens, adapter item size ``q``):
LoRA keeps ``X A`` for ``lora_B``'s gradient (``n r q``) and ``X`` for ``lora_A``'s, a new copy
(``n k q``) when PEFT casts it to an adapter dtype other than ``p`` (else ``X`` is the linear
input the formula already counts). LoRA-FA (``A`` frozen) keeps none of those copies, only
``X A``. The formula's linear inputs stay: it counts them whether or not the base weight trains.
Recompute (full checkpointing of each layer): only each layer's input, ``s b h p``.

What the formula leaves out, by construction (the symbolic walk counts all of it):

* everything outside the layers: embeddings, final norm, head, the loss's log-probabilities
  (``n V 4`` for a causal LM: often the largest single tensor);
* LayerNorm's fp32 statistics, RMSNorm's fp32 input copies (LLaMA, T5), dtype casts under
  autocast and PEFT's bf16 weight copies;
* an FFN other than ``4h`` GeLU (LLaMA's gated SiLU MLP of width ``I``, T5's ReLU);
  grouped-query attention (K and V narrower than Q); T5's decoder cross-attention and
  relative-position bias; rotary tables;
* fused attention (SDPA's flash or memory-efficient kernel keep no ``s x s`` tensor, so the
  ``5 a s^2 b`` term is not there), and models without dropout (no masks);
* the allocator: bytes here are exact tensor sizes, not 512-byte blocks.
"""

from __future__ import annotations

from typing import Iterable

from membench.analytic.sizes import BOOL

METHOD_KINDS = ("full", "lora", "lora_fa")


def korthikanti_activation_bytes(seq: int, batch: int, hidden: int, heads: int, layers: int, *, itemsize: int = 2,
                                 kind: str = "full", recompute: bool = False, rank: int = 0,
                                 adapters: Iterable[tuple[int, int]] = (), adapter_itemsize: int | None = None) -> int:
    """Activation bytes of ``layers`` transformer layers by Korthikanti et al.'s formula (see the module docstring).

    Args:
        seq, batch, hidden, heads, layers: ``s``, ``b``, ``h``, ``a`` and ``L``.
        itemsize: bytes per activation ``p`` (2 in the paper, 4 in fp32); masks stay 1 byte.
        kind: ``full``, ``lora`` or ``lora_fa``.
        recompute: every layer checkpointed: only its input is kept.
        rank: the LoRA rank ``r``.
        adapters: ``(tokens, input width)`` of every adapted linear, over all ``layers``.
        adapter_itemsize: the adapters' item size ``q`` (default ``itemsize``).
    """
    if kind not in METHOD_KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(METHOD_KINDS)}")
    p = itemsize
    s, b, h, a = seq, batch, hidden, heads
    if recompute:
        return layers * s * b * h * p  # each checkpointed layer keeps its input
    # 16 activation elements of s b h and 2 one-byte masks; the softmax output and its dropped copy
    # (a s^2 b each, p bytes) and their mask (1 byte). At p = 2: s b h (34 + 5 a s / h).
    per_layer = s * b * h * (16 * p + 2 * BOOL) + a * s * s * b * (2 * p + BOOL)
    total = layers * per_layer
    if kind == "full":
        return total
    q = adapter_itemsize or p
    for tokens, width in adapters:
        total += tokens * rank * q  # X A, for lora_B's gradient
        if kind == "lora" and q != p:
            total += tokens * width * q  # PEFT's cast copy of X, for lora_A's gradient
    return total


def korthikanti_for_run(run, the_plan=None) -> int:
    """:func:`korthikanti_activation_bytes` for a membench RunConfig, summed over its layer stacks.

    T5's encoder counts with ``s`` tokens and its decoder with ``t`` (the formula has no
    cross-attention); every other family is one stack of ``L`` layers. Dimensions come from the
    Hugging Face config; the adapted layers from :func:`membench.plan.plan` (a ``meta`` model).
    ``p`` is the model's item size (4 under bf16-autocast, whose weights and residual stream are fp32).
    """
    from membench.analytic.sizes import FP32, ITEMSIZE, _dims
    from membench.plan import plan

    the_plan = the_plan or plan(run)
    config = the_plan.hf_config
    d = _dims(run, config)
    p = ITEMSIZE[run.train.precision]
    q = FP32 if (run.method.adapter_dtype == "fp32" or run.train.precision == "bf16-autocast") else p
    method = run.method
    stacks = [(d.seq, d.layers, "")]
    if config.model_type == "t5":
        stacks = [(d.seq, d.layers, "encoder."), (d.target, d.decoder_layers, "decoder.")]
    total = 0
    for seq, layers, prefix in stacks:
        adapters = []
        for layer in the_plan.adapted:
            if not layer.name.startswith(prefix):
                continue
            cross_kv = ".EncDecAttention." in layer.name and layer.name.rsplit(".", 1)[-1] in ("k", "v")
            adapters.append((d.batch * (d.seq if cross_kv else seq), layer.in_features))
        total += korthikanti_activation_bytes(seq, d.batch, d.hidden, d.heads, layers, itemsize=p, kind=method.kind,
                                              recompute=method.gradient_checkpointing, rank=method.rank or 0,
                                              adapters=adapters, adapter_itemsize=q)
    return total
