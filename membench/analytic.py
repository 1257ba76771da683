"""Closed-form activation model: the bytes autograd saves in one forward pass, predicted from the architecture.

This is the analytic counterpart of ``metrics["saved_tensor_bytes"]`` and
``metrics["activation_bytes"]``. It follows Korthikanti et al. (arXiv
2205.05198, "Reducing Activation Recomputation in Large Transformer Models"),
who count a transformer layer's saved activations as ``sbh(34 + 5as/h)`` bytes
in fp16 with dropout, and extends their count to what membench measures: the
three model families, PEFT's LoRA and LoRA-FA adapters, several precisions,
both attention implementations and gradient checkpointing.

Notation (all counts in elements; bytes are elements x item size):

* ``b`` batch size, ``s`` encoder/decoder tokens per sequence (T5: ``s`` for the
  encoder, ``t`` for the decoder), ``n = b s`` tokens,
* ``h`` hidden size, ``a`` attention heads, ``g`` key/value heads, ``d`` head
  dimension, ``I`` FFN width, ``V`` vocabulary, ``r`` LoRA rank, ``L`` layers,
* ``p`` the model's item size (4 fp32, 2 bf16/fp16; bf16-autocast keeps fp32
  weights, so ``p = 4`` there, with matmul outputs of 2 bytes), ``q`` the
  adapter item size (4 with ``method.adapter_dtype=fp32``, PEFT's default, else ``p``).

Rules every term below follows (they are autograd's, applied op by op):

* A tensor is saved at most once: the count is of unique storages, so the
  LayerNorm output that ``q``, ``k`` and ``v`` all keep counts once.
* An op saves an input only if the backward of some *other* input or of a
  trainable weight needs it: ``y = x W`` keeps ``x`` only when ``W`` trains,
  and keeps nothing of ``W`` (a parameter, never counted) when only ``x`` needs
  a gradient. Ops before the first tensor that requires grad save nothing.
* Parameters are never counted; buffers and the batch are (they are not
  parameters), but they existed before the forward pass, so they are not in
  ``activation_bytes``.

How it is evaluated: a symbolic forward pass (:class:`_Walk`) runs each family's
layer sequence on sizes instead of data and applies these rules op by op, so
the first layer (whose input needs no gradient under LoRA), shared storages
and partial ``target_modules`` come out right. Summed over layers it is the
closed form below; every term is an integer.

Per-layer terms (a layer whose input needs a gradient):

* attention, fused kernel (``sdpa``: flash in fp16/bf16 without a mask, else the
  memory-efficient kernel): ``q, k, v`` and the output, ``4 n h p``, plus the
  log-sum-exp ``a n`` x 4; no ``s x s`` tensor. A T5 bias mask adds ``a s^2 p``
  per self-attention layer (the bias is made contiguous per layer) and
  ``a t s p`` once for the cross-attention's zero bias. CUDA's math kernel
  (fp32 with grouped-query attention, or a strided mask) keeps the scaled
  ``q`` and ``k``, the ``a s^2`` probabilities and ``v`` instead.
* attention, ``eager``: copies of ``q``, ``k``, ``v`` (``3 n h p``), the softmax
  output ``a s^2 p`` (LLaMA: fp32), its dropout mask ``a s^2`` (bool) and the
  dropped probabilities ``a s^2 p``; with ``p_attn = 0`` (LLaMA) no mask and no
  second copy. This is Korthikanti's ``5 a s^2 b`` term.
* norms: LayerNorm keeps its input ``n h p`` and two ``n``-long statistics;
  RMSNorm (LLaMA, T5) keeps the fp32 input ``n h 4`` (a copy when ``p != 4``)
  and ``rsqrt`` (``n`` x 4); T5 also keeps the ``p``-typed input for the
  multiply; a trainable norm weight adds the normalised output ``n h p``.
* MLP: GELU/SiLU keep their input ``n I p``; ReLU its output; LLaMA's gate
  product keeps both factors ``2 n I p``; dropout inside T5's FFN adds a mask ``n I``.
* hidden dropout masks: ``n h`` bytes (bool, CUDA's ``native_dropout``) after each
  residual branch and after the embeddings; ``p = 0`` is the identity and saves nothing.
* T5 in fp16 clamps the residual stream after every sub-layer: each clamp keeps
  its input ``n h 2`` and two 0-dim fp32 bounds (``fp16_clamps``).
* linear inputs (full fine-tuning): every linear keeps its input, ``n h p`` once
  for q/k/v (shared), ``n h p`` for the output projection (unless it is the
  fused kernel's own output, which is already counted), ``n h p`` for the first
  FFN matrix and ``n I p`` for the second.

Adapter terms, per adapted linear with input width ``k`` (PEFT's ``lora.Linear``):

* LoRA keeps ``X`` for ``lora_A``'s weight gradient: ``n k p``, shared with any
  other saver of the same ``X`` (q/k/v share one). With fp32 adapters on a
  bf16/fp16 model PEFT first casts ``X`` to fp32, a new copy per adapted layer:
  ``n k 4`` each, ``adapter_fp32_copies``, and the bf16 ``X`` is no longer kept.
* LoRA and LoRA-FA keep ``XA`` for ``lora_B``'s weight gradient: ``n r q``.
* LoRA-FA (``lora_A`` frozen) keeps no ``X``: that is the whole saving.
* ``lora_dropout > 0`` adds a mask ``n k`` and keeps the dropped copy ``n k q``
  instead of ``X``.
* bf16-autocast: each linear call casts its input to bf16 (a new ``n k 2`` copy
  per call) and its weight to bf16; the weight copy is saved whenever the input
  needs a gradient, even for a frozen base weight (``autocast_weight_copies``).
  Norms and the loss run in fp32; SDPA casts its inputs (and T5's bias) to bf16.
  Softmax follows the CPU autocast policy the simulate backend runs (it stays in
  the input dtype; CUDA's autocast would run it in fp32).

Recompute (non-reentrant gradient checkpointing): the outer hooks see only
what each checkpointed block keeps for its recomputation (its tensor
arguments: the hidden state ``n h p``, plus T5's position bias and encoder
output), and what lies outside the blocks (embeddings, which PEFT makes
require grad, final norm, head, loss). During backward one block's worth is
rebuilt at a time; that is a peak effect, not part of these figures.
``activation_bytes`` also counts what the checkpointed calls keep referenced
without packing it (LLaMA: rotary tables, position ids and eager's causal mask;
RoBERTa/T5 with adapters: each stack's last block output, as measured with
torch 2.13's non-reentrant checkpoint).

Head and loss: the causal-LM loss upcasts logits to fp32 and keeps the
log-softmax output ``n V 4`` and shifted labels ``n`` x 8; T5 and RoBERTa keep
the log-softmax in ``p`` and the label tensor of the batch.

The physical minimum for LoRA-FA (:func:`lora_fa_minimum`) is a separate,
implementation-independent bound; its assumptions are in its docstring.

Not modelled: model families other than RoBERTa, T5 (original ReLU FFN) and
LLaMA-style decoders (LLaMA, Mistral, Qwen2); adapters on modules outside the
blocks (a warning names them); attention or padding masks (membench's batches
have none); cuDNN attention, flash's head-dim padding and the efficient
kernel's log-sum-exp padded to 32 rows on CUDA; CUDA's fp32 LayerNorm
statistics for bf16 inputs (the CPU/simulate figure keeps them in the input
dtype; a few bytes per token); allocator history and fragmentation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

from membench.allocator import allocator_bytes
from membench.config import RunConfig

ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "bf16-autocast": 4}
FP32, BF16, BOOL, INT64 = 4, 2, 1, 8
FLASH_MAX_HEAD_DIM = 256
LORA_FA_DEFAULT_RANK = 8  # conf/method/lora_fa.yaml: the rank a full run's LoRA-FA minimum assumes

TERMS = (
    "embeddings", "norms", "attention", "position", "mlp", "dropout_masks", "linear_inputs",
    "adapter_inputs", "adapter_fp32_copies", "adapter_rank_intermediates", "autocast_weight_copies",
    "fp16_clamps", "checkpoint_inputs", "head", "loss",
)


@dataclass
class ActivationEstimate:
    """Predicted activation figures of one configuration.

    Attributes:
        saved_bytes: predicted ``metrics["saved_tensor_bytes"]``: unique storages
            autograd saves in the forward pass, parameters excluded, exact sizes.
        activation_bytes: predicted ``metrics["activation_bytes"]``: allocated after
            forward minus before. Every saved storage created during the forward,
            rounded up to the allocator's 512 B, plus the loss and whatever a
            checkpoint keeps alive for recomputation; minus saved tensors that
            existed before (the batch, buffers).
        terms: bytes per named contribution (see :data:`TERMS`); they sum to ``saved_bytes``.
        lora_fa_minimum_bytes: the physical minimum LoRA-FA must keep for this
            configuration (see :func:`lora_fa_minimum`), whatever the method run.
    """

    saved_bytes: int
    activation_bytes: int
    terms: dict[str, int]
    lora_fa_minimum_bytes: int


@dataclass(eq=False)
class _T:
    """A symbolic tensor: its storage's size, and whether it requires grad."""

    numel: int
    itemsize: int
    grad: bool
    preexisting: bool = False

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class _Dims:
    batch: int
    seq: int
    target: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    layers: int
    decoder_layers: int
    hidden_dropout: float
    attention_dropout: float
    num_labels: int = 2
    tied: bool = False


class _Walk:
    """Symbolic forward pass: every op applies autograd's saving rule to sizes, not data."""

    def __init__(self, run: RunConfig, hf_config, dims: _Dims, adapted: set[str]) -> None:
        self.run = run
        self.d = dims
        self.cfg = hf_config
        self.adapted = adapted
        self.precision = run.train.precision
        self.p = ITEMSIZE[self.precision]
        self.autocast = self.precision == "bf16-autocast"
        self.out_size = BF16 if self.autocast else self.p  # item size of matmul outputs
        method = run.method
        self.full = method.kind == "full"
        self.kind = method.kind
        self.recompute = method.gradient_checkpointing
        self.rank = method.rank or 0
        self.lora_dropout = method.lora_dropout
        self.adapter_size = FP32 if (method.adapter_dtype == "fp32" or self.autocast) else self.p
        self.eager = run.model.attn_implementation == "eager"
        self.saved: dict[int, tuple[str, _T]] = {}
        # Bytes alive after forward that autograd did not pack: the loss, and under recompute what
        # the checkpointed calls still reference for their recomputation (LLaMA: the rotary tables,
        # position ids and an eager causal mask, passed by keyword; RoBERTa/T5 with adapters: each
        # stack's last block output, as measured with torch 2.13's non-reentrant checkpoint).
        self.alive: list[int] = []
        self._autocast_cache: set[str] = set()
        self.visited: set[str] = set()  # block linears the walk went through

    # -- bookkeeping ---------------------------------------------------------------------------
    def new(self, numel: int, itemsize: int, grad: bool) -> _T:
        return _T(numel, itemsize, grad)

    def save(self, term: str, *tensors: Optional[_T]) -> None:
        for tensor in tensors:
            if tensor is not None and id(tensor) not in self.saved:
                self.saved[id(tensor)] = (term, tensor)

    def estimate(self, minimum: int) -> ActivationEstimate:
        terms = {name: 0 for name in TERMS}
        activation = 0
        for term, tensor in self.saved.values():
            terms[term] = terms.get(term, 0) + tensor.nbytes
            if not tensor.preexisting:
                activation += allocator_bytes(tensor.nbytes)
        activation += sum(allocator_bytes(n) for n in self.alive)
        return ActivationEstimate(sum(terms.values()), activation, terms, minimum)

    # -- ops ----------------------------------------------------------------------------------
    def dropout(self, x: _T, p: float) -> _T:
        """CUDA's ``native_dropout``: a bool mask, kept when ``x`` needs a gradient; p = 0 is the identity."""
        if p <= 0.0:
            return x
        if x.grad:
            self.save("dropout_masks", self.new(x.numel, BOOL, True))
        return self.new(x.numel, x.itemsize, x.grad)

    def add(self, a: _T, b: _T) -> _T:
        return self.new(a.numel, max(a.itemsize, b.itemsize), a.grad or b.grad)

    def cast(self, x: _T, itemsize: int) -> _T:
        return x if x.itemsize == itemsize else self.new(x.numel, itemsize, x.grad)

    def _autocast_weight(self, name: str, numel: int, trainable: bool, input_grad: bool) -> None:
        """bf16 copy of a weight, saved for the input's gradient (cached once per step for trainable leaves)."""
        if not input_grad or name in self._autocast_cache:
            return
        if trainable:
            self._autocast_cache.add(name)
        self.save("autocast_weight_copies", self.new(numel, BF16, False))

    def _matmul(self, x: _T, name: str, k: int, m: int, trainable: bool, term: str) -> _T:
        """``x @ W^T`` for a (k -> m) weight; keeps ``x`` if W trains (under autocast a bf16 copy)."""
        tokens = x.numel // k
        if self.autocast:
            xc = self.cast(x, BF16)
            if trainable:
                self.save(term, xc)
            self._autocast_weight(name, k * m, trainable, x.grad)
            return self.new(tokens * m, BF16, x.grad or trainable)
        if trainable:
            self.save(term, x)
        return self.new(tokens * m, x.itemsize, x.grad or trainable)

    def linear(self, x: _T, name: str, k: int, m: int) -> _T:
        """A block linear: trainable in full fine-tuning, frozen otherwise, plus PEFT's adapter if targeted."""
        out = self._matmul(x, name, k, m, self.full, "linear_inputs")
        self.visited.add(name)
        if name not in self.adapted:
            return out
        tokens = x.numel // k
        # PEFT casts X to the adapter dtype first (a new copy per adapted layer when it differs).
        xa_in = self.cast(x, self.adapter_size)
        copy = xa_in is not x
        if self.lora_dropout > 0:
            xa_in, copy = self.dropout(xa_in, self.lora_dropout), True
        a_trains = self.kind == "lora"
        if self.autocast:
            xc = self.new(x.numel, BF16, x.grad)  # autocast's per-call cast of the (fp32) adapter input
            if a_trains:
                self.save("adapter_inputs", xc)
            self._autocast_weight(name + ".lora_A", self.rank * k, a_trains, x.grad)
            xa = self.new(tokens * self.rank, BF16, x.grad or a_trains)
            self.save("adapter_rank_intermediates", xa)
            self._autocast_weight(name + ".lora_B", self.rank * m, True, xa.grad)
        else:
            if a_trains:
                self.save("adapter_fp32_copies" if copy and self.adapter_size == FP32 and self.p != FP32
                          else "adapter_inputs", xa_in)
            xa = self.new(tokens * self.rank, self.adapter_size, xa_in.grad or a_trains)
            self.save("adapter_rank_intermediates", xa)
        return self.new(tokens * m, out.itemsize, True)

    def layer_norm(self, x: _T, term: str = "norms") -> _T:
        """``nn.LayerNorm``: input, mean and rstd (statistics in the input dtype on CPU tensors)."""
        grad = x.grad or self.full
        xs = self.cast(x, FP32) if self.autocast else x  # layer_norm runs in fp32 under autocast
        if grad:
            self.save(term, xs, self.new(x.numel // self.d.hidden, xs.itemsize, True),
                      self.new(x.numel // self.d.hidden, xs.itemsize, True))
        return self.new(x.numel, xs.itemsize, grad)

    def rms_norm(self, x: _T, t5: bool) -> _T:
        """LlamaRMSNorm / T5LayerNorm: fp32 ``pow`` input, ``rsqrt``; T5 multiplies the original input."""
        grad = x.grad or self.full
        x32 = self.cast(x, FP32)
        rows = x.numel // self.d.hidden
        normed = self.new(x.numel, FP32, grad)
        if x.grad:
            self.save("norms", x32, self.new(rows, FP32, True))
            if t5:
                self.save("norms", x)
        weight_size = self.p  # the norm weight's dtype (fp32 under autocast)
        normed = self.cast(normed, weight_size)
        if self.full:
            self.save("norms", normed)
        return self.new(x.numel, weight_size, grad)

    # -- attention ----------------------------------------------------------------------------
    def kernel(self, dtype_size: int, mask: bool, grouped: bool) -> str:
        """CUDA's SDPA kernel choice (see membench.backends.cuda_semantics.cuda_attention_kernel)."""
        d = self.d.head_dim
        if dtype_size == BF16 and not mask and d <= FLASH_MAX_HEAD_DIM:
            return "flash"
        alignment = 4 if dtype_size == FP32 else 8
        if not grouped and d % alignment == 0:
            return "efficient"
        return "math"

    def sdpa(self, q: _T, k: _T, v: _T, sq: int, skv: int, kv_heads: int, mask: Optional[_T] = None,
             dropout: float = 0.0) -> _T:
        """``F.scaled_dot_product_attention`` as CUDA runs it; returns the context (b, sq, a*d) storage."""
        b, a, d = self.d.batch, self.d.heads, self.d.head_dim
        if self.autocast:  # SDPA is on autocast's bf16 list: fp32 inputs are cast
            q, k, v = self.cast(q, BF16), self.cast(k, BF16), self.cast(v, BF16)
            if mask is not None:
                mask = self.cast(mask, BF16)
        size = q.itemsize
        grouped = kv_heads != a
        kernel = self.kernel(size, mask is not None, grouped)
        grad = q.grad or k.grad or v.grad or (mask is not None and mask.grad)
        if kernel != "math":
            out = self.new(b * sq * a * d, size, grad)
            if grad:
                self.save("attention", q, k, v, mask, out, self.new(b * a * sq, FP32, True))
            return out  # laid out (b, sq, a, d): the transpose to (b, sq, h) is free
        return self._math(q, k, v, sq, skv, grouped, dropout)

    def _math(self, q: _T, k: _T, v: _T, sq: int, skv: int, grouped: bool, dropout: float) -> _T:
        b, a, d = self.d.batch, self.d.heads, self.d.head_dim
        size = q.itemsize
        cs = FP32 if size == BF16 else size  # the math kernel upcasts half inputs
        qs = self.new(b * a * sq * d, cs, q.grad)
        ks = self.new(b * a * skv * d, cs, k.grad)
        vr = self.new(b * a * skv * d, cs, v.grad) if (grouped or cs != size) else v
        if ks.grad:
            self.save("attention", qs)
        if qs.grad:
            self.save("attention", ks)
        grad = q.grad or k.grad
        probs = self.new(b * a * sq * skv, cs, grad)
        if grad:
            self.save("attention", probs)
        probs = self.dropout(probs, dropout)
        if vr.grad:
            self.save("attention", probs)
        if probs.grad:
            self.save("attention", vr)
        return self.new(b * sq * a * d, size, grad or v.grad)  # transposed copy of the output

    def eager_attention(self, q: _T, k: _T, v: _T, sq: int, skv: int, dropout: float, probs_fp32: bool,
              q_contiguous: bool) -> _T:
        """transformers' eager attention: two matmuls around softmax and dropout."""
        b, a, d = self.d.batch, self.d.heads, self.d.head_dim
        cs = BF16 if self.autocast else self.p
        # matmul folds (b, a) into one batch dimension: a transposed view is copied first.
        qc = q if (q_contiguous and q.itemsize == cs) else self.new(b * a * sq * d, cs, q.grad)
        kc = self.new(b * a * skv * d, cs, k.grad)
        if kc.grad:
            self.save("attention", qc)
        if qc.grad:
            self.save("attention", kc)
        grad = q.grad or k.grad
        softmax_size = FP32 if probs_fp32 else cs  # CPU autocast leaves softmax in bf16
        probs = self.new(b * a * sq * skv, softmax_size, grad)
        if grad:
            self.save("attention", probs)
        probs = self.dropout(probs, dropout)
        probs = self.cast(probs, cs)
        vc = self.new(b * a * skv * d, cs, v.grad)
        if vc.grad:
            self.save("attention", probs)
        if probs.grad:
            self.save("attention", vc)
        return self.new(b * sq * a * d, cs, grad or v.grad)

    # -- model pieces -------------------------------------------------------------------------
    def head_loss(self, logits_numel: int, logits_size: int, upcast: bool, labels: _T) -> None:
        """Cross-entropy: the log-softmax output, the target and the scalar total weight."""
        size = FP32 if (upcast or self.autocast) else logits_size  # cross-entropy is on autocast's fp32 list
        self.save("loss", self.new(logits_numel, size, True), labels, self.new(1, size, True))
        self.alive.append(size)  # the loss itself

    def fp16_clamp(self, x: _T) -> _T:
        """T5's fp16 guard ``clamp(x, -c, c)`` with a 0-dim fp32 tensor ``c``: keeps x, -c and c."""
        if x.itemsize != 2 or self.precision != "fp16":
            return x
        if x.grad:
            self.save("fp16_clamps", x, self.new(1, FP32, False), self.new(1, FP32, False))
        return self.new(x.numel, x.itemsize, x.grad)

    def checkpoint(self, *tensors: _T) -> None:
        self.save("checkpoint_inputs", *tensors)


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _dims(run: RunConfig, config) -> _Dims:
    workload = run.workload
    family = config.model_type
    hidden = _first(config, "hidden_size", "d_model")
    heads = _first(config, "num_attention_heads", "num_heads")
    if family == "t5":
        head_dim = config.d_kv
    else:
        head_dim = _first(config, "head_dim", default=None) or hidden // heads
    layers = _first(config, "num_hidden_layers", "num_layers")
    return _Dims(
        batch=workload.batch_size,
        seq=workload.seq_len,
        target=(workload.target_len or workload.seq_len),
        hidden=hidden,
        heads=heads,
        kv_heads=_first(config, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        ffn=_first(config, "intermediate_size", "d_ff"),
        vocab=config.vocab_size,
        layers=layers,
        decoder_layers=_first(config, "num_decoder_layers", default=layers),
        hidden_dropout=float(_first(config, "hidden_dropout_prob", "dropout_rate", default=0.0)),
        attention_dropout=float(_first(config, "attention_probs_dropout_prob", "attention_dropout", "dropout_rate",
                                       default=0.0)),
        num_labels=getattr(config, "num_labels", 2),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


# -- families --------------------------------------------------------------------------------------
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
        prefix = f"roberta.encoder.layer.{i}"
        if w.recompute:
            w.checkpoint(x)
            x = w.new(n * h, w.p, True)
            continue
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
        prefix = f"model.layers.{i}"
        if w.recompute:
            w.checkpoint(x)
            x = w.new(n * h, w.p, True)
            continue
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
    labels = w.new(n, INT64, False)  # the shifted labels are a new tensor
    w.head_loss(n * d.vocab, logits.itemsize, True, labels)


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
                w.checkpoint(x)
            else:
                w.checkpoint(x, bias)
            x = w.new(n_enc * h, w.p, True)
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
                w.checkpoint(y, enc)
                if w.eager:  # eager attention gets a materialised (b, 1, t, t) causal mask argument
                    w.checkpoint(w.new(d.batch * t * t, w.p, False))
            else:
                w.checkpoint(y, self_bias, cross_bias)
            y = w.new(n_dec * h, w.p, True)
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


FAMILIES = {"roberta": _roberta, "llama": _llama, "mistral": _llama, "qwen2": _llama, "t5": _t5}


# -- the physical minimum ----------------------------------------------------------------------------
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


def linear_stack_saved_bytes(widths: list[int], tokens: int, kind: str, rank: int = 0, itemsize: int = FP32,
                             adapter_itemsize: Optional[int] = None) -> int:
    """Saved bytes of a stack of bias-free or biased ``nn.Linear`` layers ``widths[0] -> widths[1] -> ...``.

    The smallest closed form, and the base of every term above. The input is
    ``tokens x widths[0]`` and needs no gradient; every layer is adapted for the
    adapter kinds. With ``q`` the adapter item size:

    * ``full``: each layer keeps its input for its weight gradient:
      ``sum_i tokens * widths[i] * itemsize``;
    * ``lora``: each ``lora_A`` keeps its input (cast to the adapter dtype, a copy
      when it differs) and each ``lora_B`` keeps ``XA``:
      ``sum_i tokens * (widths[i] + rank) * q``;
    * ``lora_fa``: only ``XA``: ``layers * tokens * rank * q``.
    """
    q = adapter_itemsize or itemsize
    inputs = widths[:-1]
    if kind == "full":
        return sum(tokens * width * itemsize for width in inputs)
    if kind == "lora":
        return sum(tokens * (width + rank) * q for width in inputs)
    if kind == "lora_fa":
        return len(inputs) * tokens * rank * q
    raise ValueError(f"kind={kind!r}: choose full, lora or lora_fa")


# -- public API ------------------------------------------------------------------------------------
def estimate(run: RunConfig) -> ActivationEstimate:
    """Predict ``saved_tensor_bytes`` and ``activation_bytes`` of ``run`` from its architecture.

    Builds only a ``meta`` model (through :func:`membench.runner.plan`) to learn the adapted layers.

    Raises:
        ConfigError: the configuration is invalid (as ``membench`` would reject it).
        NotImplementedError: a model family with no analytic walk here.
    """
    from membench.runner import plan  # the runner imports torch/transformers/peft; keep this module light

    the_plan = plan(run)
    config = the_plan.hf_config
    family = config.model_type
    if family not in FAMILIES:
        raise NotImplementedError(f"no analytic activation model for model_type={family!r} "
                                  f"(have: {', '.join(FAMILIES)})")
    walk = _Walk(run, config, _dims(run, config), {layer.name for layer in the_plan.adapted})
    FAMILIES[family](walk)
    if not walk.recompute and walk.adapted - walk.visited:
        warnings.warn(f"analytic model: adapters outside the transformer blocks are not modelled: "
                      f"{sorted(walk.adapted - walk.visited)}", stacklevel=2)
    return walk.estimate(lora_fa_minimum(run, config, _lora_fa_layers(run, the_plan)))


def _lora_fa_layers(run: RunConfig, the_plan) -> list:
    """The layers LoRA-FA would adapt: the run's own, or the family default for a full run."""
    if the_plan.adapted:
        return the_plan.adapted
    from membench.models import default_excludes, default_targets
    from membench.preflight import adapted_layers

    targets = default_targets(run.model, the_plan.hf_config)
    excludes = default_excludes(run.model, the_plan.hf_config)
    return adapted_layers(the_plan.meta_model, targets, excludes)


def estimate_config(config: dict) -> ActivationEstimate:
    """:func:`estimate` for the ``config`` dict stored in a result JSON (``result["config"]``).

    Keys the result leaves out (``results_dir``, ``force``, backend knobs that did
    not apply) take the schema's defaults.
    """
    from omegaconf import OmegaConf

    cleaned = {key: value for key, value in config.items() if key in ("model", "method", "workload", "train", "backend")}
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cleaned)
    return estimate(OmegaConf.to_object(merged))


__all__ = ["ActivationEstimate", "TERMS", "estimate", "estimate_config", "linear_stack_saved_bytes", "lora_fa_minimum"]
