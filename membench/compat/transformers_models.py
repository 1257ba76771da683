"""transformers: the packed-sequence check, and the renamed activation-checkpointing method."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
from torch import nn

from membench.compat._checks import incompatible, parameter_names, require


# --- transformers' packed-sequence check (membench.backends.simulate) ---------------------------

_PACKED_NEED = ("to answer the packed-sequence check for fake tensors (they have no values to inspect, so "
                "transformers would assume packing and build a mask real execution skips)")


def checked_masking_utils():
    try:
        from transformers import masking_utils
    except ImportError as error:
        raise incompatible("transformers", "has no masking_utils module", _PACKED_NEED) from error
    require("transformers", masking_utils, "masking_utils.find_packed_sequence_indices", ["position_ids"],
            _PACKED_NEED)
    # Replacing the module attribute only works while transformers calls it by that global name.
    callers = [name for name, value in vars(masking_utils).items()
               if inspect.isfunction(value) and "find_packed_sequence_indices" in value.__code__.co_names]
    if not callers:
        raise incompatible("transformers", "no longer calls masking_utils.find_packed_sequence_indices by that name",
                           _PACKED_NEED)
    return masking_utils


def _no_packing(position_ids: torch.Tensor) -> None:
    return None


@contextlib.contextmanager
def no_packed_sequences() -> Iterator[None]:
    """Make transformers' ``masking_utils.find_packed_sequence_indices`` answer "not packed" while active.

    Without a KV cache (e.g. in training) transformers reads ``position_ids``
    to detect packed sequences. On fake tensors it cannot, assumes packing and
    materialises a [batch, 1, seq, seq] mask that real execution skips, which
    changes the attention kernel. membench's batches are never packed (see
    membench.workload), so "none" is the real answer. Cost: process-wide.
    """
    masking_utils = checked_masking_utils()
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = _no_packing
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


# --- activation checkpointing (membench.methods) ------------------------------------------------

_CHECKPOINTING_NEED = "to turn on non-reentrant activation checkpointing (method.gradient_checkpointing)"


def _checkpointing_method(model_class: type) -> tuple[str, str]:
    """(method name, its kwargs parameter): the current name, or the one before transformers 5.2x."""
    for method, kwargs in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                           ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        if kwargs in (parameter_names(getattr(model_class, method, None) or (lambda: None)) or []):
            return method, kwargs
    raise incompatible("transformers",
                       f"has no {model_class.__name__}.activation_checkpointing_enable(activation_checkpointing_kwargs)"
                       " nor gradient_checkpointing_enable(gradient_checkpointing_kwargs)", _CHECKPOINTING_NEED)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Checkpoint every block of ``model`` without reentrancy (the old name warns where the new exists)."""
    method, kwargs = _checkpointing_method(type(model))
    getattr(model, method)(**{kwargs: {"use_reentrant": False}})


def check_activation_checkpointing() -> None:
    from transformers import PreTrainedModel

    _checkpointing_method(PreTrainedModel)
