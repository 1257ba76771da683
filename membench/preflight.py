"""Checks that need the model's shape, run on a ``meta`` model before anything is allocated.

:mod:`membench.config` checks each value on its own; these check values
against the model: a sequence longer than its position table, a target module
name that matches no linear layer, a rank at or above a layer's smaller side.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from membench.config import RunConfig
from membench.errors import ConfigError
from membench.models import LINEAR_TYPES, linear_shape, max_sequence_length


@dataclass(frozen=True)
class AdaptedLayer:
    """One linear layer LoRA will wrap (``nn.Linear``, or transformers' ``Conv1D`` read as in -> out)."""

    name: str
    in_features: int
    out_features: int


def matches(module_name: str, key: str) -> bool:
    """PEFT's rule for a target given as a name: the whole name or a dotted suffix."""
    return module_name == key or module_name.endswith("." + key)


def check_sequence_length(run: RunConfig, config: PretrainedConfig) -> None:
    limit = max_sequence_length(config)
    lengths = {"workload.seq_len": run.workload.seq_len}
    if config.model_type != "t5":
        lengths["workload.target_len"] = run.workload.target_len
    for key, length in lengths.items():
        if length is not None and limit is not None and length > limit:
            raise ConfigError(
                f"{key}={length} exceeds the {limit} positions of model {run.model.name!r}; "
                f"use a length between 1 and {limit}"
            )


def adapted_layers(model: nn.Module, targets: list[str], excludes: list[str]) -> list[AdaptedLayer]:
    """The linear layers ``targets`` select, minus ``excludes``.

    Raises:
        ConfigError: a target that matches no linear layer (the message lists the valid names).
    """
    linears = {name: module for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)}
    for key in targets:
        if not any(matches(name, key) for name in linears):
            suffixes = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ConfigError(
                f"method.target_modules entry {key!r} matches no linear layer of this model; "
                f"linear layer names are: {', '.join(suffixes)}"
            )
    adapted = [
        AdaptedLayer(name, *linear_shape(module))
        for name, module in linears.items()
        if any(matches(name, key) for key in targets) and not any(matches(name, key) for key in excludes)
    ]
    if not adapted:
        raise ConfigError(
            f"method.target_modules={targets} selects only excluded layers (model.exclude_modules={excludes}); "
            "nothing would be adapted"
        )
    return adapted


def narrowest_layer(layers: list[AdaptedLayer]) -> AdaptedLayer:
    """The adapted layer with the smallest smaller dimension: the one that bounds LoRA's rank."""
    return min(layers, key=lambda layer: min(layer.in_features, layer.out_features))


def check_rank(rank: int, layers: list[AdaptedLayer]) -> None:
    """LoRA's rank must be below each adapted layer's smaller dimension, or it is not low-rank."""
    narrowest = narrowest_layer(layers)
    limit = min(narrowest.in_features, narrowest.out_features)
    if rank >= limit:
        raise ConfigError(
            f"method.rank={rank} is not below the smaller dimension of target {narrowest.name!r} "
            f"({narrowest.in_features} -> {narrowest.out_features}); use a rank between 1 and {limit - 1}"
        )
