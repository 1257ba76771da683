"""Models built from ``transformers`` configs with random weights: no downloads.

A model is (config, head). The config comes from ``conf/model/*.yaml``
(``model_type`` + ``hf_config`` keyword arguments) or from a local
``config.json``. The head follows the paper: sequence classification for
RoBERTa (GLUE), seq2seq LM for T5, causal LM for decoders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from membench.config import ModelConfig
from membench.errors import ConfigError

HEADS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "causal_lm": AutoModelForCausalLM,
}
#: transformers' head tables, in the order a task is inferred from a config's ``architectures``.
HEAD_NAMES = {
    "seq2seq_lm": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "sequence_classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
}
#: Layers LoRA can adapt: PEFT's "all-linear" set (transformers' Conv1D stores its weight transposed).
LINEAR_TYPES = (nn.Linear, Conv1D)
ALL_LINEAR = "all-linear"

# Never adapted by default: the classification head, which PEFT already trains in full.
# (Pinned for RoBERTa so its recorded defaults stay what they were; other families get
# the layers outside the blocks that a target name would also match, see all_linear_targets.)
FAMILY_EXCLUDES: dict[str, list[str]] = {"roberta": ["classifier.dense", "classifier.out_proj"]}

# Encoder-decoder models built from a bare T5Config cannot start decoding without these.
T5_REQUIRED = {"decoder_start_token_id": 0, "pad_token_id": 0}


def _config_from_file(model: ModelConfig) -> tuple[Optional[str], dict]:
    path = Path(model.config_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model.config_path={model.config_path!r} is not a readable config.json: {exc}") from exc
    model_type = model.model_type or raw.pop("model_type", None)
    raw.pop("architectures", None)
    return model_type, raw


def looks_like_path(model_id: str) -> bool:
    """A local folder rather than a Hub id: it exists, or is spelled as a path (./x, /x, ~/x, x/y/z)."""
    return (Path(model_id).expanduser().exists() or model_id.startswith((".", "/", "~"))
            or model_id.count("/") > 1)


def _config_from_hub(model: ModelConfig) -> PretrainedConfig:
    """``AutoConfig.from_pretrained``: the config only (never weights), from a folder or the Hub cache."""
    model_id = model.id
    if looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"model.id={model_id!r} is not a folder; give a folder holding config.json "
                              "or a Hub id such as Qwen/Qwen2.5-7B")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.id={model_id!r} has no config.json; membench reads only the config "
                              "(put the model's config.json in that folder, weights are not needed)")
        model_id = str(folder)
    try:
        return AutoConfig.from_pretrained(model_id, revision=model.revision,
                                          trust_remote_code=model.trust_remote_code, **model.hf_config)
    except OSError as exc:
        raise ConfigError(
            f"model.id={model.id!r}: no config.json in the Hugging Face cache and it cannot be fetched "
            f"({str(exc).splitlines()[0]}). Check the id (and model.revision={model.revision!r}), go online "
            "(unset HF_HUB_OFFLINE) or fetch only its config.json into the cache, or point model.id at a "
            "local folder holding config.json"
        ) from exc
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ConfigError(
                f"model.id={model.id!r} needs code from its repository (trust_remote_code); membench does not "
                "run it unless asked: read that code, then set model.trust_remote_code=true"
            ) from exc
        raise ConfigError(
            f"model.id={model.id!r} has a model_type this transformers ({transformers.__version__}) does not "
            f"know: {text.splitlines()[0]} Upgrade transformers, or set model.trust_remote_code=true if the "
            "repository ships its own code"
        ) from exc


def load_hf_config(model: ModelConfig) -> PretrainedConfig:
    """The ``transformers`` config for ``model``.

    Raises:
        ConfigError: unknown ``model_type``, unreadable ``config_path``, a Hub id that is
            neither cached nor fetchable, a folder without config.json, remote code needed.
    """
    if model.id is not None:
        config = _config_from_hub(model)
    else:
        overrides = dict(model.hf_config)
        model_type = model.model_type
        if model.config_path is not None:
            model_type, raw = _config_from_file(model)
            overrides = raw | overrides
        if model_type is None:
            raise ConfigError(
                f"model {model.name!r} needs model.model_type (e.g. llama, roberta, t5), "
                "model.config_path pointing at a local config.json, or model=hub model.id=<Hub id or folder>"
            )
        try:
            config = AutoConfig.for_model(model_type, **overrides)
        except ValueError as exc:
            raise ConfigError(f"model.model_type={model_type!r} is not a transformers model type: {exc}") from exc
    if config.model_type == "t5":
        for key, value in T5_REQUIRED.items():
            if getattr(config, key, None) is None:
                setattr(config, key, value)
    return config


def has_head(task: str, config: PretrainedConfig) -> bool:
    return type(config) in HEADS[task]._model_mapping


def infer_task(config: PretrainedConfig) -> tuple[str, str]:
    """(task, why) from the config's ``architectures``, else its ``model_type``.

    Raises:
        ConfigError: no head membench builds exists for this model type.
    """
    for architecture in getattr(config, "architectures", None) or []:
        for task, names in HEAD_NAMES.items():
            if architecture in names.values() and has_head(task, config):
                return task, f"architectures names {architecture}"
        if architecture.endswith(("ForMaskedLM", "ForPreTraining")) and has_head(
                "sequence_classification", config):
            return "sequence_classification", f"architectures names {architecture} (an encoder)"
    for task in HEAD_NAMES:
        if has_head(task, config):
            return task, f"model_type {config.model_type!r} has a {task} head"
    raise ConfigError(f"model_type {config.model_type!r} has none of the heads membench builds "
                      f"({', '.join(HEADS)}); pick another model")


def resolve_task(model: ModelConfig, config: PretrainedConfig) -> tuple[str, str]:
    """(task, why): ``model.task``, or for ``auto`` the one :func:`infer_task` finds.

    Raises:
        ConfigError: the architecture has no head for the task.
    """
    if model.task == "auto":
        return infer_task(config)
    if not has_head(model.task, config):
        heads = [task for task in HEADS if has_head(task, config)]
        raise ConfigError(
            f"model.task={model.task!r}: model_type {config.model_type!r} has no {model.task} head in transformers; "
            f"use model.task={' or '.join(heads) if heads else '<none available>'}"
        )
    return model.task, "model.task"


def model_class(task: str, config: PretrainedConfig) -> type:
    found = HEADS[task]._model_mapping[type(config)]
    return found[0] if isinstance(found, (list, tuple)) else found


def resolve_attention(model: ModelConfig, task: str, config: PretrainedConfig) -> tuple[str, str]:
    """(implementation, why): sdpa where the architecture supports it, else eager."""
    if model.attn_implementation == "sdpa" and not getattr(model_class(task, config), "_supports_sdpa", True):
        return "eager", (f"{model_class(task, config).__name__} does not support sdpa in transformers "
                         f"{transformers.__version__}; eager used")
    return model.attn_implementation, "model.attn_implementation"


def resolve_model(model: ModelConfig, config: PretrainedConfig) -> tuple[ModelConfig, dict[str, str]]:
    """``model`` with its task and attention resolved for this config, and why (for the result's env)."""
    task, task_why = resolve_task(model, config)
    attention, attention_why = resolve_attention(model, task, config)
    resolved = dataclasses.replace(model, task=task, attn_implementation=attention)
    return resolved, {"task": task, "task_reason": task_why,
                      "attn_implementation": attention, "attn_implementation_reason": attention_why}


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored in x out)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _in_blocks(name: str) -> bool:
    """Inside the repeated blocks: the module path goes through a numbered ModuleList entry."""
    return any(part.isdigit() for part in name.split(".")[:-1])


def all_linear_targets(meta_model: nn.Module) -> tuple[list[str], list[str]]:
    """PEFT's "all-linear" as (target suffixes, excludes): every Linear/Conv1D inside the blocks.

    The output head and any layer outside the blocks (classifier, pooler) are never adapted;
    where one shares a suffix with a block layer (RoBERTa's ``classifier.dense``) it is excluded
    by its last two name parts.
    """
    head = meta_model.get_output_embeddings() if hasattr(meta_model, "get_output_embeddings") else None
    linears = [(name, module) for name, module in meta_model.named_modules() if isinstance(module, LINEAR_TYPES)]
    targets: list[str] = []
    for name, module in linears:
        suffix = name.rsplit(".", 1)[-1]
        if module is not head and _in_blocks(name) and suffix not in targets:
            targets.append(suffix)
    excludes: list[str] = []
    for name, module in linears:
        if (module is head or not _in_blocks(name)) and name.rsplit(".", 1)[-1] in targets:
            key = ".".join(name.split(".")[-2:])
            excludes.append(key if key not in excludes else name)
    return targets, excludes


def default_targets(model: ModelConfig, config: PretrainedConfig, meta_model: Optional[nn.Module] = None) -> list[str]:
    """LoRA target module suffixes: the model file's, else every linear layer of the blocks."""
    if model.target_modules is not None:
        return list(model.target_modules)
    return all_linear_targets(meta_model if meta_model is not None else _meta(model, config))[0]


def default_excludes(model: ModelConfig, config: PretrainedConfig, meta_model: Optional[nn.Module] = None) -> list[str]:
    if model.exclude_modules is not None:
        return list(model.exclude_modules)
    if config.model_type in FAMILY_EXCLUDES:
        return FAMILY_EXCLUDES[config.model_type]
    return all_linear_targets(meta_model if meta_model is not None else _meta(model, config))[1]


def _meta(model: ModelConfig, config: PretrainedConfig) -> nn.Module:
    resolved, _ = resolve_model(model, config)
    return build_model(resolved, config, torch.float32, "meta")


def fused_expert_parameters(meta_model: nn.Module) -> list[str]:
    """Suffixes of MoE expert weights stored as fused >2-D parameters (no Linear for LoRA to wrap)."""
    found: list[str] = []
    for name, param in meta_model.named_parameters():
        if param.dim() > 2 and ".experts." in name:
            key = ".".join(name.split(".")[-2:])
            if key not in found:
                found.append(key)
    return found


def max_sequence_length(config: PretrainedConfig) -> Optional[int]:
    """Longest input the position embeddings allow; None for relative positions (T5)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if config.model_type == "roberta":
        # RoBERTa numbers positions from padding_idx + 1, so two slots are never used.
        return limit - (config.pad_token_id + 1)
    return limit


def build_model(
    model: ModelConfig, config: PretrainedConfig, dtype: torch.dtype, device: str | torch.device
) -> nn.Module:
    """Instantiate the model with its head on ``device`` (``meta`` allocates nothing).

    A classifier gets ``problem_type="single_label_classification"`` when its config names none:
    BERT and RoBERTa set exactly that on their first batch of integer labels, but DeBERTa-v2 keeps
    None and then selects the labelled rows with ``nonzero`` (a data-dependent shape fake tensors
    cannot give) and gathers them. membench's labels are all valid, so that path differs only by a
    few dozen bytes per sequence in the loss (a mask, indices, the gathered logits); not modelled.
    """
    if model.task == "sequence_classification" and getattr(config, "problem_type", None) is None:
        config.problem_type = "single_label_classification"
    with torch.device(device):
        kwargs = {"trust_remote_code": True} if model.trust_remote_code else {}
        return HEADS[model.task].from_config(config, dtype=dtype, attn_implementation=model.attn_implementation,
                                             **kwargs)
