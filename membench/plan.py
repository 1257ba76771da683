"""Validate a run before anything is allocated: the config against the model's real shapes, on ``meta``.

Every check that can fail on bad input runs here (after the config dataclasses'
own checks), so a bad rank or a target that matches nothing fails in a second,
never after a model has been materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from membench.backends import resolve_name
from membench.config import RunConfig
from membench.errors import ConfigError
from membench.methods import weight_dtype
from membench.models import build_model, default_excludes, default_targets, load_hf_config
from membench.preflight import AdaptedLayer, adapted_layers, check_rank, check_sequence_length


@dataclass
class Plan:
    """A validated run: what will be built, before anything is allocated.

    ``meta_model`` is the model without its method, on ``meta``; it is used for
    validation only, so a plan can be executed any number of times.
    """

    run: RunConfig
    hf_config: PretrainedConfig
    meta_model: nn.Module
    targets: list[str]
    excludes: list[str]
    adapted: list[AdaptedLayer]


def plan(run: RunConfig) -> Plan:
    """Validate ``run`` against the model's shape, on a meta model (no memory).

    Raises:
        ConfigError: unknown model type, sequence too long, target matching
            nothing, rank too large, a backend option the backend lacks.
    """
    resolve_name(run.backend)  # e.g. memory_snapshot on a backend=auto that resolves to simulate
    hf_config = load_hf_config(run.model)
    check_sequence_length(run, hf_config)
    try:
        meta_model = build_model(run.model, hf_config, weight_dtype(run.train), "meta")
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(
            f"model {run.model.name!r} cannot be built from its config (model.hf_config / model.config_path): {error}"
        ) from error
    targets, excludes, adapted = [], [], []
    if run.method.uses_adapters:
        targets = run.method.target_modules or default_targets(run.model, hf_config)
        excludes = default_excludes(run.model, hf_config)
        adapted = adapted_layers(meta_model, targets, excludes)
        check_rank(run.method.rank, adapted)
    return Plan(run, hf_config, meta_model, list(targets), list(excludes), adapted)
