"""Activation bytes without running the model: a symbolic walk of the forward pass, and Korthikanti's formula.

Two models of the bytes autograd saves in one forward pass, side by side:

* The **symbolic walk** (:func:`estimate`; :mod:`~membench.analytic.walk` and one module per
  family) is not a closed form. It runs each family's forward pass on symbolic tensors (sizes,
  dtypes and requires-grad flags, no data), op by op as the model code calls them, and applies
  autograd's saving rule to each op: it counts the bytes of every tensor that op would save,
  once per storage. It predicts ``metrics["saved_tensor_bytes"]`` and
  ``metrics["activation_bytes"]`` to the byte, for the three model families, PEFT's LoRA and
  LoRA-FA adapters, every precision, both attention implementations and gradient
  checkpointing. It follows CUDA's kernels by default; ``kernels="cpu"`` gives what a CPU
  build of torch saves where three kernels differ (:mod:`~membench.analytic.walk` names them).
* **Korthikanti et al.'s closed form** (:func:`korthikanti_activation_bytes`, arXiv 2205.05198):
  ``s b h (34 + 5 a s / h)`` bytes per layer, with LoRA terms: the formula papers quote, from the
  architecture alone, and what it leaves out (:mod:`~membench.analytic.korthikanti`).

The per-layer terms below are the walk's, written as sums (Korthikanti's notation, extended);
the walk evaluates them, so the first layer (whose input needs no gradient under LoRA), shared
storages and partial ``target_modules`` come out right.

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

Every term is an integer.

Per-layer terms (a layer whose input needs a gradient):

* attention, fused kernel (``sdpa``: flash in fp16/bf16 without a mask, else the
  memory-efficient kernel): ``q, k, v`` and the output, ``4 n h p``, plus the
  log-sum-exp ``a n`` x 4 (the efficient kernel's padded to a multiple of 32 rows on CUDA);
  no ``s x s`` tensor. A T5 bias mask adds ``a s^2 p``
  per self-attention layer (the bias is made contiguous per layer) and
  ``a t s p`` once for the cross-attention's zero bias. CUDA's math kernel
  (fp32 with grouped-query attention, or a strided mask) keeps the scaled
  ``q`` and ``k``, the ``a s^2`` probabilities and ``v`` instead.
* attention, ``eager``: copies of ``q``, ``k``, ``v`` (``3 n h p``), the softmax
  output ``a s^2 p`` (fp32 for LLaMA, and for every family under CUDA's bf16 autocast), its dropout mask ``a s^2`` (bool) and the
  dropped probabilities ``a s^2 p``; with ``p_attn = 0`` (LLaMA) no mask and no
  second copy. This is Korthikanti's ``5 a s^2 b`` term.
* norms: LayerNorm keeps its input ``n h p`` and two ``n``-long statistics (fp32 on CUDA);
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
  Norms and the loss run in fp32; SDPA casts its inputs (and T5's bias) to bf16;
  softmax gives fp32 on CUDA (it stays bf16 under CPU autocast: ``kernels="cpu"``).

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
log-softmax output ``n V 4`` and shifted labels ``n`` x 8 (at batch 1 a view of the
labels padded by one column, ``(s + 1)`` x 8); T5 and RoBERTa keep
the log-softmax in ``p`` and the label tensor of the batch.

The physical minimum for LoRA-FA (:func:`lora_fa_minimum`) is a separate,
implementation-independent bound; its assumptions are in its docstring.

Not modelled: model families other than RoBERTa, T5 (original ReLU FFN) and
LLaMA-style decoders (LLaMA, Mistral, Qwen2); adapters on modules outside the
blocks (a warning names them); attention or padding masks (membench's batches
have none); cuDNN attention, flash's head-dim padding
and the fused kernels' 0-dim RNG seed and offset; allocator history and fragmentation.

Modules:

* :mod:`~membench.analytic.terms`: the named contributions (:data:`TERMS`) and :class:`ActivationEstimate`;
* :mod:`~membench.analytic.sizes`: item sizes and the architecture's dimensions read from a Hugging Face config;
* :mod:`~membench.analytic.walk`: the symbolic tensors and the op-by-op saving rules (:class:`_Walk`),
  and the three kernels whose saved bytes differ between CUDA and CPU;
* :mod:`~membench.analytic.roberta`, :mod:`~membench.analytic.llama`, :mod:`~membench.analytic.t5`:
  each family's layer sequence walked op by op;
* :mod:`~membench.analytic.minimum`: LoRA-FA's physical minimum (:func:`lora_fa_minimum`);
* :mod:`~membench.analytic.linear_stack`: the closed form of a stack of linears;
* :mod:`~membench.analytic.korthikanti`: Korthikanti et al.'s per-layer formula with LoRA terms;
* :mod:`~membench.analytic.estimator`: :func:`estimate` and :func:`estimate_config`, the walk's entry points,
  and :func:`measured_kernels` (whose kernels a result's figures follow).
"""

from membench.analytic.estimator import estimate, estimate_config, measured_kernels, run_from_config
from membench.analytic.korthikanti import korthikanti_activation_bytes, korthikanti_for_run
from membench.analytic.linear_stack import linear_stack_saved_bytes
from membench.analytic.minimum import lora_fa_minimum
from membench.analytic.terms import TERMS, ActivationEstimate
from membench.analytic.walk import KERNELS

__all__ = ["ActivationEstimate", "KERNELS", "TERMS", "estimate", "estimate_config", "korthikanti_activation_bytes",
           "korthikanti_for_run", "linear_stack_saved_bytes", "lora_fa_minimum", "measured_kernels",
           "run_from_config"]
