"""Item sizes and the architecture's dimensions, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass

from membench.config import RunConfig

ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "bf16-autocast": 4}
FP32, BF16, BOOL, INT64 = 4, 2, 1, 8
LORA_FA_DEFAULT_RANK = 8  # conf/method/lora_fa.yaml: the rank a full run's LoRA-FA minimum assumes


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
