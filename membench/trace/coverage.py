"""Which runs a trace answers exactly, in one place; every other run is simulated directly.

Covered means tested (tests/test_trace.py: a grid of batch sizes, sequence lengths and LoRA ranks
evaluated from one trace equals direct simulation byte for byte). A structure outside these sets may well
trace correctly, but nothing has checked it, so it falls back with a one-line reason.
"""

from __future__ import annotations

from typing import Optional

from membench.config import TRACE_SYMBOLS, RunConfig

#: The sizes a trace keeps symbolic, in the order it stores them: batch size, sequence length, decoder
#: length, LoRA rank (the letters of :data:`membench.config.TRACE_SYMBOLS`).
DIMS = tuple(TRACE_SYMBOLS)
#: The smallest size a symbol can stand for: torch specialises sizes 0 and 1, so a run with one is
#: simulated directly (B, S, T) or gets a trace of its own rank (R).
MIN_SYMBOLIC = 2


def workload_dims(run: RunConfig) -> tuple[int, int, int, int]:
    """(B, S, T, R) of ``run``: T is the decoder length of a seq2seq model, else S; R the LoRA rank, 0 without adapters."""
    workload = run.workload
    target = (workload.target_len or workload.seq_len) if run.model.task == "seq2seq_lm" else workload.seq_len
    rank = run.method.rank if run.method.uses_adapters else 0
    return workload.batch_size, workload.seq_len, target, rank

#: Model families (transformers ``model_type``) and the task each is covered with.
FAMILIES = {"roberta": "sequence_classification", "t5": "seq2seq_lm", "llama": "causal_lm",
            # current decoders (tests/test_trace.py::test_trace_covers_current_decoders)
            "qwen2": "causal_lm", "qwen3": "causal_lm", "mistral": "causal_lm", "phi3": "causal_lm",
            "gpt2": "causal_lm",
            # split by residue class and size range, or not split at all
            # (tests/test_trace.py::test_trace_covers_split_families); the MoE models in bf16 (their
            # grouped_mm experts take every token x top-k: sizes do not depend on the routing)
            "gemma2": "causal_lm", "gemma3_text": "causal_lm", "bert": "sequence_classification",
            "deberta-v2": "sequence_classification",
            "mixtral": "causal_lm", "qwen3_moe": "causal_lm"}
METHOD_KINDS = ("full", "lora", "lora_fa")  # each with and without gradient checkpointing and adapter dropout, any rank (R)
#: Also DoRA (method.dora) on every family. bitsandbytes 4-bit base weights (QLoRA, QDoRA) on causal LMs:
#: the fused 4-bit kernel's row limit splits their traces at B*S = 1536 (tests/test_trace.py::test_trace_covers_dora_and_4bit);
#: 8-bit ones too, with what the 8-bit matmul keeps on ctx (test_trace_covers_8bit_base_weights_and_what_their_matmul_keeps_on_ctx).
QUANTIZATION = ("none", "nf4", "fp4", "int8")
PRECISIONS = ("fp32", "bf16", "fp16", "bf16-autocast")
ATTENTION = ("sdpa", "eager")
OPTIMIZER_IMPLS = ("foreach", "fused", "for_loop")
#: tests/test_optimizers.py::test_trace_covers_optimizers.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd")


def covered(run: RunConfig) -> Optional[str]:
    """None when a trace answers ``run`` exactly; else the one-line reason it is simulated directly.

    A recorded trace may still be narrower (a guard on one size gives it a validity range, see
    :meth:`membench.trace.record.Trace.contains`): that is checked against the trace itself.
    """
    from membench.backends import resolve_name
    from membench.trace.key import fake_device

    backend = run.backend
    if getattr(backend, "trace", "auto") == "off":
        return "backend.trace=off"
    name = resolve_name(backend)
    if name != "simulate":
        return f"backend {name} measures, it does not simulate"
    if backend.memory_snapshot:
        return "memory snapshots come from a direct run"
    if run.parallel.enabled:
        return f"parallel.strategy={run.parallel.strategy} is simulated directly (traces are recorded on one GPU)"
    if fake_device(run) != "cpu":
        return "fake CUDA tensors are not covered yet (only fake CPU tensors with cuda_semantics)"
    if not backend.cuda_semantics:
        return "backend.cuda_semantics=false is not covered"
    workload = run.workload
    if workload.batch_size == 1:
        return "batch size 1 takes other code paths (no label copy, no clone in eager matmul)"
    if workload.seq_len == 1:
        return "sequence length 1 takes other code paths (mm instead of bmm)"
    if workload.target_len == 1:
        return "target length 1 takes other code paths (mm instead of bmm)"
    if workload.measured_steps != 1:
        return f"workload.measured_steps={workload.measured_steps} is not covered (1 is)"
    model_type = _model_type(run)
    if model_type not in FAMILIES:
        return f"model family {model_type!r} is not covered ({', '.join(FAMILIES)} are)"
    if run.model.task not in (FAMILIES[model_type], "auto"):
        return f"{model_type} with task {run.model.task} is not covered"
    if run.model.attn_implementation not in ATTENTION:
        return f"attention {run.model.attn_implementation!r} is not covered"
    if run.model.quantization not in QUANTIZATION:
        return f"model.quantization={run.model.quantization} is not covered ({', '.join(QUANTIZATION)} are)"
    if run.model.quantization != "none" and FAMILIES[model_type] != "causal_lm":
        return f"model.quantization={run.model.quantization} is covered on causal LMs only, not {model_type}"
    if run.method.kind not in METHOD_KINDS:
        return f"method.kind={run.method.kind} is not covered"
    if run.train.precision not in PRECISIONS:
        return f"train.precision={run.train.precision} is not covered"
    if run.train.optimizer not in OPTIMIZERS:
        return f"train.optimizer={run.train.optimizer} is not covered ({', '.join(OPTIMIZERS)} are)"
    if run.train.optimizer_impl not in OPTIMIZER_IMPLS:
        return f"train.optimizer_impl={run.train.optimizer_impl} is not covered"
    return None


def trace_group(run: RunConfig) -> str:
    """The runs one recorded trace answers, as a name: the trace key, and the rank where it cannot be symbolic.

    A LoRA rank below 2 is specialised like any size 1, so such a run's trace holds for its own
    rank only (:attr:`membench.trace.record.Trace.validity`); every other rank shares one trace.
    """
    from membench.trace.key import trace_key

    key = trace_key(run)
    if run.method.uses_adapters and run.method.rank < MIN_SYMBOLIC:
        return f"{key}--rank{run.method.rank}"
    return key


def _model_type(run: RunConfig) -> Optional[str]:
    if run.model.model_type:
        return run.model.model_type
    try:
        from membench.models import load_hf_config

        return load_hf_config(run.model).model_type
    except Exception:  # noqa: BLE001 - an unloadable config is the direct run's error to report
        return None
