"""Quantised bases (QLoRA): bitsandbytes' own layers, built as transformers' loader builds them.

``model.quantization=nf4|fp4`` replaces every linear layer except the output head (and tied or
last modules, and the model's ``_keep_in_fp32_modules``: :func:`modules_not_quantized`) with ``bnb.nn.Linear4bit`` through
``transformers.integrations.bitsandbytes.replace_with_bnb_linear``, then quantises each weight
the way ``Bnb4bitQuantize.convert`` does: ``Params4bit(weight, **old.__dict__).to(device)``.
``int8`` does the same with ``Linear8bitLt`` and ``Int8Params`` (LLM.int8()).

On ``meta`` (simulation) the quantisation runs bitsandbytes' fake kernels, so the packed weight
and every statistic get their real shapes and dtypes without a byte of data; the simulate
backend then turns them into fake tensors (:func:`membench.compat.fake_quantized_parameter`).
On a real device (the ``cpu`` backend) bitsandbytes quantises for real.

What a 4-bit layer keeps, per ``[N, K]`` weight with block size 64:

* the packed weight, ``N*K/2`` bytes;
* ``absmax``: one fp32 per block (``N*K/64 * 4`` bytes), or with double quantisation one uint8
  per block plus the second level's fp32 absmax (one per 256 blocks), its 256-entry fp32 code
  table and an fp32 offset;
* the 16-entry fp32 code table of the 4-bit type.

All of it is allocated memory; :func:`state_tensors` lists the tensors that are not parameters,
so the weight bytes count them.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from membench.compat.bitsandbytes_params import quantization_maps_off_meta
from membench.config import ModelConfig
from membench.errors import ConfigError

#: The compute dtype each precision implies: a 4-bit layer's matmuls run in the activations' dtype.
PRECISION_COMPUTE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "bf16-autocast": "bf16"}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "uint8": torch.uint8}


def compute_dtype(model: ModelConfig, precision: str) -> str:
    """``model.compute_dtype``, or the dtype ``precision`` computes in."""
    return model.compute_dtype or PRECISION_COMPUTE[precision]


def check_compute_dtype(model: ModelConfig, precision: str) -> None:
    """A 4-bit compute dtype must be the dtype the activations have under ``precision``.

    Raises:
        ConfigError: e.g. ``model.compute_dtype=fp16`` with ``train.precision=bf16``: every
            quantised layer would cast its input to fp16 and back, which no training script does.
    """
    implied = PRECISION_COMPUTE[precision]
    if model.compute_dtype is not None and model.compute_dtype != implied:
        raise ConfigError(
            f"model.compute_dtype={model.compute_dtype} contradicts train.precision={precision}, whose "
            f"activations are {implied}; use model.compute_dtype={implied} or null (= follow the precision)"
        )


def bnb_config(model: ModelConfig, precision: str):
    """transformers' ``BitsAndBytesConfig`` for ``model``'s quantisation knobs."""
    from transformers import BitsAndBytesConfig

    if model.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model.quantization,
        bnb_4bit_use_double_quant=model.double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute_dtype(model, precision)],
        bnb_4bit_quant_storage=TORCH_DTYPES[model.quant_storage],
    )


def quantize_base(model: nn.Module, settings: ModelConfig, precision: str, device: torch.device) -> nn.Module:
    """Replace ``model``'s linear layers with bitsandbytes' and quantise their weights on ``device``, in place.

    ``model`` is built on ``device`` already (random weights, or ``meta``); each weight is
    quantised from the layer it replaces, as transformers quantises a loaded checkpoint.
    """
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.pytorch_utils import Conv1D

    config = bnb_config(settings, precision)
    if device.type == "meta":
        quantization_maps_off_meta()
    originals = dict(model.named_modules())
    replace_with_bnb_linear(model, modules_not_quantized(model, settings.quantization_skip_modules), config)
    four_bit = settings.quantization in ("nf4", "fp4")
    for name, layer in model.named_modules():
        if not isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        old = originals[name]
        weight = old.weight.T if isinstance(old, Conv1D) else old.weight  # Conv1D stores in x out
        if four_bit:
            quantized = bnb.nn.Params4bit(weight.detach(), requires_grad=False, **layer.weight.__dict__)
        else:
            quantized = bnb.nn.Int8Params(weight.detach(), requires_grad=False, has_fp16_weights=False)
        # .to() quantises on a real device; on meta it would only move, so quantise there directly
        # (bitsandbytes' fake kernels give the packed weight and statistics their shapes).
        layer.weight = quantized._quantize(device) if device.type == "meta" else quantized.to(device)
        if old.bias is not None:
            layer.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
    model.is_loaded_in_4bit = four_bit  # PEFT picks its 4-bit / 8-bit LoRA layers from these
    model.is_loaded_in_8bit = not four_bit
    return model


def modules_not_quantized(model: nn.Module, skip_modules: Optional[list[str]] = None) -> list[str]:
    """What transformers' bitsandbytes loader leaves unquantised (``_process_model_before_weight_loading``).

    ``skip_modules`` (``llm_int8_skip_modules``), or when None its defaults
    (``get_keys_to_not_convert``: the output head, tied and last modules); in both cases plus the
    model's ``_keep_in_fp32_modules``: T5's feed-forward output ``wo``, whose forward casts its
    input to the weight's dtype (a 4-bit weight's would be uint8).
    """
    from transformers.quantizers.base import HfQuantizer

    return HfQuantizer.get_modules_to_not_convert(model, skip_modules, getattr(model, "_keep_in_fp32_modules", None))


def quantized_linear_names(model: nn.Module, skip_modules: Optional[list[str]] = None) -> list[str]:
    """The names of ``model``'s linear layers (``nn.Linear``, transformers' ``Conv1D``) a quantised base replaces."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = modules_not_quantized(model, skip_modules)
    return [name for name, module in model.named_modules()  # replace_with_bnb_linear's own test
            if (isinstance(module, Conv1D) or type(module) is nn.Linear) and should_convert_module(name, keep)]


#: The modules PEFT trains in full for sequence classification, by name suffix
#: (``PeftModelForSequenceClassification``: ``classifier_module_names``, added to ``modules_to_save``).
PEFT_CLASSIFIER_NAMES = ("classifier", "score")


def check_trainable_heads_unquantised(settings: ModelConfig, meta_model: nn.Module) -> None:
    """A classifier head PEFT trains in full must not be quantised: a 4-bit or 8-bit weight takes no gradient.

    transformers' loader quantises RoBERTa's ``classifier`` (its defaults skip only the head's last
    bias), and PEFT then fails to make it trainable; so does membench, before building anything.

    Raises:
        ConfigError: naming the quantised head layers and the ``model.quantization_skip_modules`` that fixes it.
    """
    heads: dict[str, list[str]] = {}
    for name in quantized_linear_names(meta_model, settings.quantization_skip_modules):
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            prefix = ".".join(parts[:end])
            if prefix.endswith(PEFT_CLASSIFIER_NAMES):
                heads.setdefault(prefix, []).append(name)
                break
    if heads:
        layers = ", ".join(name for names in heads.values() for name in names)
        raise ConfigError(
            f"model.quantization={settings.quantization} quantises {layers}, in the classification head that PEFT "
            f"trains in full (modules_to_save), and a quantised weight cannot take gradients (transformers' loader "
            f"does the same); leave the head unquantised: model.quantization_skip_modules=[{','.join(heads)}]")


def is_quantized(param: torch.Tensor) -> bool:
    """A bitsandbytes quantised weight (4-bit packed, or int8 with its row scales)."""
    return hasattr(param, "quant_state") or hasattr(param, "SCB")


def logical_numel(param: torch.Tensor) -> int:
    """Parameters a weight stands for: a packed 4-bit weight holds two per byte."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def _quant_state_tensors(state) -> Iterator[torch.Tensor]:
    if state is None:
        return
    for tensor in (state.absmax, state.code, state.offset):
        if isinstance(tensor, torch.Tensor):
            yield tensor
    yield from _quant_state_tensors(state.state2)


def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors quantised layers keep that are neither parameters nor buffers: absmax, code tables, row scales."""
    found: list[torch.Tensor] = []
    for param in model.parameters():
        found.extend(_quant_state_tensors(getattr(param, "quant_state", None)))
        scales = getattr(param, "SCB", None)
        if isinstance(scales, torch.Tensor):
            found.append(scales)
    for module in model.modules():
        state = getattr(module, "state", None)  # Linear8bitLt keeps CB/SCB on its MatmulLtState after forward
        for key in ("CB", "SCB"):
            tensor = getattr(state, key, None)
            if isinstance(tensor, torch.Tensor):
                found.append(tensor)
    return found


def model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Everything a built model holds in device memory: parameters, buffers and quantisation state."""
    return [*model.parameters(), *model.buffers(), *state_tensors(model)]


def prepare_for_kbit_training(model: nn.Module) -> nn.Module:
    """PEFT's ``prepare_model_for_kbit_training``: every non-quantised fp16/bf16 parameter cast to fp32,
    and non-reentrant gradient checkpointing (what transformers 5 turns on by default; the reentrant
    variant would also need PEFT's input-requires-grad hook)."""
    from peft import prepare_model_for_kbit_training

    from membench.compat import enable_activation_checkpointing

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    enable_activation_checkpointing(model)
    return model
