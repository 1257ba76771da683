"""Fine-tuning methods: which weights train, in which dtype, and whether blocks recompute.

LoRA and LoRA-FA both come from PEFT. LoRA-FA is LoRA with ``lora_A`` frozen:
autograd saves a matmul's input only when the weight needs a gradient, so
freezing A is all it takes for the full-width input X of each adapted layer
to stop being kept for backward. (On an H100, an explicit autograd Function
that saves only XA gave identical bytes.)
"""

from __future__ import annotations

import torch
from peft import LoraConfig, TaskType, get_peft_model
from torch import nn

from membench.compat import enable_activation_checkpointing
from membench.config import MethodConfig, ModelConfig, RunConfig, TrainConfig
from membench.models import build_model
from membench.quantization import prepare_for_kbit_training, quantize_base

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16-autocast": torch.float32}
PEFT_TASKS = {
    "sequence_classification": TaskType.SEQ_CLS,
    "seq2seq_lm": TaskType.SEQ_2_SEQ_LM,
    "causal_lm": TaskType.CAUSAL_LM,
}


def weight_dtype(train: TrainConfig) -> torch.dtype:
    """Storage dtype of the base weights (fp32 under autocast: only matmuls run in bf16)."""
    return DTYPES[train.precision]


def autocast_dtype(train: TrainConfig) -> torch.dtype | None:
    return torch.bfloat16 if train.precision == "bf16-autocast" else None


def supports_target_parameters() -> bool:
    """Whether the installed PEFT adapts parameters as well as modules (``LoraConfig.target_parameters``, 0.17+)."""
    import dataclasses

    return "target_parameters" in {f.name for f in dataclasses.fields(LoraConfig)}


def apply_method(
    model: nn.Module, method: MethodConfig, task: str, targets: list[str], excludes: list[str], base_dtype: torch.dtype,
    target_parameters: tuple[str, ...] | list[str] = (),
) -> nn.Module:
    """Return ``model`` set up for ``method``: PEFT-wrapped for LoRA kinds, all trainable for full.

    Gradient checkpointing uses the non-reentrant implementation: it keeps the
    inputs of each block and recomputes the rest, and needs no input that
    requires grad (the reentrant one would, for frozen embeddings).
    """
    if method.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if method.kind == "full":
        model.requires_grad_(True)
        return model
    lora = LoraConfig(
        r=method.rank,
        lora_alpha=method.alpha,
        lora_dropout=method.lora_dropout,
        target_modules=targets,
        exclude_modules=excludes or None,
        task_type=PEFT_TASKS[task],
        use_dora=method.dora,
        # MoE experts stored as fused 3-D parameters (no Linear to wrap): PEFT's ParamWrapper adapts them.
        **({"target_parameters": list(target_parameters)} if target_parameters else {}),
    )
    # autocast_adapter_dtype=True is PEFT's default: fp32 adapters on a bf16/fp16 base.
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=method.adapter_dtype == "fp32")
    if method.adapter_dtype == "base":
        # PEFT moves new adapters to the base weight's dtype only off ``meta``; make it explicit
        # so a simulated (meta-built) model gets the same adapter bytes as a real one.
        for name, param in peft_model.named_parameters():
            if ".lora_" in name and param.dtype != base_dtype:
                param.data = param.data.to(base_dtype)
    if method.kind == "lora_fa":
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return peft_model


def build_for_method(run: RunConfig, model: ModelConfig, hf_config, targets: list[str], excludes: list[str],
                     target_parameters: list[str], device: str | torch.device) -> nn.Module:
    """``run``'s model on ``device``, ready to train: built from ``hf_config`` (``model`` is ``run.model`` with
    task and attention resolved), its base quantised as ``run.model`` asks, then ``run.method`` applied.

    A fresh model every call (on meta it costs milliseconds): PEFT wraps in place.
    """
    dtype = weight_dtype(run.train)
    built = build_model(model, hf_config, dtype, device)
    if run.model.quantization != "none":
        built = quantize_base(built, run.model, run.train.precision, torch.device(device))
        if run.model.prepare_kbit_training:
            built = prepare_for_kbit_training(built)
    with torch.device(device):  # PEFT creates adapters on the default device, then moves them
        return apply_method(built, run.method, model.task, targets, excludes, dtype, target_parameters)
