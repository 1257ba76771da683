"""Validate a run before anything is allocated: the config against the model's real shapes, on ``meta``.

Every check that can fail on bad input runs here (after the config dataclasses'
own checks), so a bad rank or a target that matches nothing fails in a second,
never after a model has been materialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers import PretrainedConfig

from membench.backends import resolve_name
from membench.config import ModelConfig, RunConfig
from membench.errors import ConfigError
from membench.methods import weight_dtype
from membench.models import (
    ALL_LINEAR,
    all_linear_targets,
    build_model,
    default_excludes,
    default_targets,
    fused_expert_parameters,
    load_hf_config,
    resolve_model,
)
from membench.parallel.checks import check_parallel
from membench.quantization import check_trainable_heads_unquantised
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
    #: ``run.model`` with ``task`` and ``attn_implementation`` resolved for this config (``task=auto``,
    #: sdpa on an architecture that refuses it); build with this, identify the run by ``run``.
    model: ModelConfig = None  # type: ignore[assignment]
    #: What was resolved and why, for the result's env.
    resolution: dict = field(default_factory=dict)
    #: Weights the method would adapt but cannot (MoE experts stored as fused parameters, where the
    #: installed PEFT has no ``target_parameters`` or ``method.target_parameters=[]``).
    not_adapted: list[str] = field(default_factory=list)
    #: Parameters adapted through PEFT's ``target_parameters`` (fused MoE experts).
    target_parameters: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = self.run.model

    def env(self) -> dict:
        """What the defaults resolved to, for a result's ``env`` (so a row stays exact if the family defaults change)."""
        return {"target_modules": self.targets, "exclude_modules": self.excludes, "adapted_layers": len(self.adapted),
                # The task and attention actually built, and why (model.task=auto, sdpa refused).
                **{f"resolved_{key}" if key in ("task", "attn_implementation") else key: value
                   for key, value in self.resolution.items()},
                **({"not_adapted": self.not_adapted} if self.not_adapted else {}),
                **({"target_parameters": self.target_parameters} if self.target_parameters else {})}


def resolve_target_parameters(run: RunConfig, meta_model: nn.Module) -> tuple[list[str], list[str]]:
    """(parameters PEFT adapts via ``target_parameters``, fused expert weights left unadapted).

    Raises:
        ConfigError: a ``method.target_parameters`` entry names no parameter, or PEFT lacks the feature.
    """
    from membench.methods import supports_target_parameters

    fused = fused_expert_parameters(meta_model)
    wanted = fused if run.method.target_parameters is None else run.method.target_parameters
    names = [name for name, _ in meta_model.named_parameters()]
    for key in wanted:
        if not any(name == key or name.endswith("." + key) for name in names):
            raise ConfigError(f"method.target_parameters entry {key!r} names no parameter of this model; "
                              f"fused expert weights here: {', '.join(fused) or 'none'}")
    if wanted and not supports_target_parameters():
        if run.method.target_parameters:
            raise ConfigError(f"method.target_parameters={wanted} needs PEFT >= 0.17 (LoraConfig.target_parameters); "
                              "upgrade PEFT or drop it")
        return [], fused
    return list(wanted), [key for key in fused if key not in wanted]


def check_dora_layers(run: RunConfig, model: ModelConfig, hf_config: PretrainedConfig, targets: list[str],
                      excludes: list[str], target_parameters: list[str] = ()) -> None:
    """Ask PEFT itself, on a throwaway meta model, whether its DoRA supports every layer the targets select.

    Raises:
        ConfigError: PEFT refuses DoRA for one of them (its message names the layer type).
    """
    from membench.methods import build_for_method

    try:  # the same build as the run's (membench.runner.build), on meta
        build_for_method(run, model, hf_config, targets, excludes, target_parameters, "meta")
    except ValueError as error:
        raise ConfigError(
            f"method.dora=true: PEFT's DoRA does not support a layer method.target_modules={targets} selects "
            f"({error}); DoRA supports Linear (and transformers' Conv1D), bitsandbytes' 4-bit and 8-bit Linear, "
            "Embedding and Conv layers, not parameters adapted through target_parameters (fused MoE experts: "
            "method.target_parameters=[] leaves them out): pick other targets or method.dora=false"
        ) from error


def plan(run: RunConfig) -> Plan:
    """Validate ``run`` against the model's shape, on a meta model (no memory).

    Raises:
        ConfigError: unknown model type, sequence too long, target matching
            nothing, rank too large, a backend option the backend lacks.
    """
    backend_name = resolve_name(run.backend)  # e.g. memory_snapshot on a backend=auto that resolves to simulate
    hf_config = load_hf_config(run.model)
    model, resolution = resolve_model(run.model, hf_config)
    if model.task != "seq2seq_lm" and run.workload.target_len is not None:
        raise ConfigError(f"workload.target_len={run.workload.target_len} only applies to seq2seq models; "
                          f"model {run.model.name!r} is {model.task}")
    check_sequence_length(run, hf_config)
    try:
        meta_model = build_model(model, hf_config, weight_dtype(run.train), "meta")
    except (ValueError, TypeError, AttributeError) as error:
        raise ConfigError(
            f"model {run.model.name!r} cannot be built from its config (model.hf_config / model.config_path / "
            f"model.id): {error}"
        ) from error
    check_parallel(run, backend_name, meta_model)
    targets, excludes, adapted, not_adapted, target_parameters = [], [], [], [], []
    if run.method.uses_adapters:
        targets = run.method.target_modules or default_targets(run.model, hf_config, meta_model)
        excludes = default_excludes(run.model, hf_config, meta_model)
        if list(targets) == [ALL_LINEAR]:  # PEFT's spelling, resolved here so the result names the layers
            targets, excludes = all_linear_targets(meta_model)
        adapted = adapted_layers(meta_model, targets, excludes)
        check_rank(run.method.rank, adapted)
        if run.model.quantization != "none" and model.task == "sequence_classification":
            check_trainable_heads_unquantised(run.model, meta_model)
        target_parameters, not_adapted = resolve_target_parameters(run, meta_model)
        if run.method.dora:
            check_dora_layers(run, model, hf_config, targets, excludes, target_parameters)
    return Plan(run, hf_config, meta_model, list(targets), list(excludes), adapted, model, resolution, not_adapted,
                target_parameters)
