"""Models built from ``transformers`` configs with random weights: no downloads.

A model is (config, head). The config comes from ``conf/model/*.yaml``
(``model_type`` + ``hf_config`` keyword arguments) or from a local
``config.json``. The head follows the paper: sequence classification for
RoBERTa (GLUE), seq2seq LM for T5, causal LM for decoders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

from membench.config import ModelConfig
from membench.errors import ConfigError

HEADS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "seq2seq_lm": AutoModelForSeq2SeqLM,
    "causal_lm": AutoModelForCausalLM,
}

DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# LoRA targets when neither the model nor the method names any: every linear
# layer of the transformer blocks, as in the paper and the H100 reference runs.
FAMILY_TARGETS: dict[str, list[str]] = {
    "roberta": ["query", "key", "value", "dense"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],  # original T5 FFN; v1.1 configs use wi_0, wi_1
    "llama": DECODER_LINEARS,
    "mistral": DECODER_LINEARS,
    "qwen2": DECODER_LINEARS,
}
# Never adapted by default: the classification head, which PEFT already trains in full.
FAMILY_EXCLUDES: dict[str, list[str]] = {"roberta": ["classifier.dense", "classifier.out_proj"]}

# Encoder-decoder models built from a bare T5Config cannot start decoding without these.
T5_REQUIRED = {"decoder_start_token_id": 0, "pad_token_id": 0}


def load_hf_config(model: ModelConfig) -> PretrainedConfig:
    """The ``transformers`` config for ``model``.

    Raises:
        ConfigError: unknown ``model_type`` or unreadable ``config_path``.
    """
    overrides = dict(model.hf_config)
    if model.config_path is not None:
        path = Path(model.config_path).expanduser()
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"model.config_path={model.config_path!r} is not a readable config.json: {exc}") from exc
        model_type = model.model_type or raw.pop("model_type", None)
        raw.pop("architectures", None)
        overrides = raw | overrides
    else:
        model_type = model.model_type
    if model_type is None:
        raise ConfigError(
            f"model {model.name!r} needs model.model_type (e.g. llama, roberta, t5) "
            "or model.config_path pointing at a local config.json"
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


def default_targets(model: ModelConfig, config: PretrainedConfig) -> list[str]:
    """LoRA target module suffixes: the model file's, else the family default."""
    if model.target_modules is not None:
        return list(model.target_modules)
    try:
        return FAMILY_TARGETS[config.model_type]
    except KeyError:
        raise ConfigError(
            f"no default LoRA targets for model_type={config.model_type!r}; set method.target_modules "
            f"(families with defaults: {', '.join(FAMILY_TARGETS)})"
        ) from None


def default_excludes(model: ModelConfig, config: PretrainedConfig) -> list[str]:
    if model.exclude_modules is not None:
        return list(model.exclude_modules)
    return FAMILY_EXCLUDES.get(config.model_type, [])


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
    """Instantiate the model with its head on ``device`` (``meta`` allocates nothing)."""
    with torch.device(device):
        return HEADS[model.task].from_config(config, dtype=dtype, attn_implementation=model.attn_implementation)
