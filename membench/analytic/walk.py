"""The symbolic walk of the forward pass: tensors as sizes, and autograd's saving rule applied op by op.

Every op keeps what its backward needs (see :mod:`membench.analytic` for the rules), on
symbolic tensors that carry only their storage size and whether they require grad. The walk
follows CUDA's kernels (``kernels="cuda"``, the default). Three kernels save different bytes on
CPU tensors, and a CPU build of torch (the ``cpu`` backend, and ``simulate`` on fake CPU
tensors) keeps the CPU figure; ``kernels="cpu"`` reproduces it, so that such a measurement can
be checked to the byte and the difference to CUDA stated:

* LayerNorm statistics. CUDA's ``layer_norm_cuda`` (aten/src/ATen/native/cuda/layer_norm_kernel.cu)
  allocates ``mean`` and ``rstd`` in the accumulate type, fp32 for fp16/bf16 inputs; the CPU kernel
  (aten/src/ATen/native/layer_norm.cpp) uses the parameter dtype, bf16/fp16 here. torch's own
  reference ``native_layer_norm`` (torch/_refs/__init__.py) encodes the same split: it converts
  the statistics to the input dtype only when ``input.device.type`` is ``cpu``.
* Softmax under bf16 autocast. CUDA's autocast runs ``softmax`` as ``fp32_set_opt_dtype``
  (aten/src/ATen/autocast_mode.cpp; "CUDA Ops that can autocast to float32" in torch's amp docs):
  a bf16 input gives an fp32 output, which is what softmax saves. CPU autocast has no softmax
  entry, so the output stays bf16.
* The memory-efficient SDPA kernel's log-sum-exp. ``_efficient_attention_forward``
  (aten/src/ATen/native/transformers/cuda/attention.cu) allocates it with its last dimension
  rounded up to a multiple of 32 query rows (torch/_meta_registrations.py, the meta kernel a fake
  CUDA tensor runs, does the same); the CPU flash kernel's is ``sq`` long. Equal for ``s`` a
  multiple of 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from membench.allocator import allocator_bytes
from membench.attention import sdpa_kernel
from membench.analytic.sizes import BF16, BOOL, FP32, ITEMSIZE, _Dims
from membench.analytic.terms import TERMS, ActivationEstimate
from membench.config import RunConfig


KERNELS = ("cuda", "cpu")  # whose kernels' saved dtypes and sizes the walk follows (see the module docstring)
LSE_ROW_ALIGNMENT = 32  # CUDA's efficient kernel pads its log-sum-exp to this many query rows (kAlignLSE)


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


class _Walk:
    """Symbolic forward pass: every op applies autograd's saving rule to sizes, not data."""

    def __init__(self, run: RunConfig, hf_config, dims: _Dims, adapted: set[str], kernels: str = "cuda") -> None:
        if kernels not in KERNELS:
            raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(KERNELS)}")
        self.cuda = kernels == "cuda"
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
        """``nn.LayerNorm``: input, mean and rstd (fp32 statistics on CUDA, the input dtype on CPU)."""
        grad = x.grad or self.full
        xs = self.cast(x, FP32) if self.autocast else x  # layer_norm runs in fp32 under autocast
        stats = FP32 if self.cuda else xs.itemsize  # CUDA: the accumulate type (module docstring)
        if grad:
            rows = x.numel // self.d.hidden
            self.save(term, xs, self.new(rows, stats, True), self.new(rows, stats, True))
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
        """CUDA's SDPA kernel choice for this head dimension (:func:`membench.attention.sdpa_kernel`)."""
        return sdpa_kernel(half_precision=dtype_size == BF16, head_dim=self.d.head_dim, has_mask=mask,
                           grouped=grouped)

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
            lse_rows = sq
            if kernel == "efficient" and self.cuda:  # padded to 32 rows on CUDA (module docstring)
                lse_rows = -(-sq // LSE_ROW_ALIGNMENT) * LSE_ROW_ALIGNMENT
            if grad:
                self.save("attention", q, k, v, mask, out, self.new(b * a * lse_rows, FP32, True))
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
        # CUDA's autocast runs softmax with an fp32 output; CPU autocast leaves it in bf16 (module docstring).
        softmax_size = FP32 if (probs_fp32 or (self.autocast and self.cuda)) else cs
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

    def checkpointed_block(self, x: _T, *arguments: _T) -> _T:
        """A block under recompute: keeps only its tensor arguments; its output (shaped like ``x``) requires grad."""
        self.checkpoint(x, *arguments)
        return self.new(x.numel, self.p, True)
