"""The entry points: a run's saved-tensor and activation bytes, counted by the symbolic walk of its forward pass."""

from __future__ import annotations

import warnings

from membench.analytic.llama import _llama
from membench.analytic.minimum import lora_fa_minimum
from membench.analytic.roberta import _roberta
from membench.analytic.sizes import _dims
from membench.analytic.t5 import _t5
from membench.analytic.terms import ActivationEstimate
from membench.analytic.walk import _Walk
from membench.config import RunConfig

FAMILIES = {"roberta": _roberta, "llama": _llama, "mistral": _llama, "qwen2": _llama, "t5": _t5}


def estimate(run: RunConfig, kernels: str = "cuda", the_plan=None) -> ActivationEstimate:
    """``saved_tensor_bytes`` and ``activation_bytes`` of ``run``, by a symbolic walk of its forward pass.

    Builds only a ``meta`` model (through :func:`membench.plan.plan`) to learn the adapted layers.
    ``kernels``: ``cuda`` (what a GPU saves) or ``cpu`` (what a CPU build of torch saves, where three
    kernels differ; see :mod:`membench.analytic.walk`). ``the_plan``: ``plan(run)``, when the caller has it.

    Raises:
        ConfigError: the configuration is invalid (as ``membench`` would reject it).
        NotImplementedError: a model family with no analytic walk here.
    """
    from membench.plan import plan  # imports torch/transformers/peft; keep this module light

    the_plan = the_plan or plan(run)
    config = the_plan.hf_config
    family = config.model_type
    if family not in FAMILIES:
        raise NotImplementedError(f"no analytic activation model for model_type={family!r} "
                                  f"(have: {', '.join(FAMILIES)})")
    walk = _Walk(run, config, _dims(run, config), {layer.name for layer in the_plan.adapted}, kernels)
    FAMILIES[family](walk)
    if not walk.recompute and walk.adapted - walk.visited:
        warnings.warn(f"analytic model: adapters outside the transformer blocks are not modelled: "
                      f"{sorted(walk.adapted - walk.visited)}", stacklevel=2)
    return walk.estimate(lora_fa_minimum(run, config, _lora_fa_layers(run, the_plan)))


def _lora_fa_layers(run: RunConfig, the_plan) -> list:
    """The layers LoRA-FA would adapt: the run's own, or the family default for a full run."""
    if the_plan.adapted:
        return the_plan.adapted
    from membench.models import default_excludes, default_targets
    from membench.preflight import adapted_layers

    targets = default_targets(run.model, the_plan.hf_config)
    excludes = default_excludes(run.model, the_plan.hf_config)
    return adapted_layers(the_plan.meta_model, targets, excludes)


def run_from_config(config: dict) -> RunConfig:
    """The RunConfig of the ``config`` dict stored in a result JSON (``result["config"]``).

    Keys the result leaves out (``results_dir``, ``force``, backend knobs that did
    not apply) take the schema's defaults.
    """
    from omegaconf import OmegaConf

    sections = ("model", "method", "workload", "train", "backend")
    cleaned = {key: value for key, value in config.items() if key in sections}
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cleaned)
    return OmegaConf.to_object(merged)


def estimate_config(config: dict, kernels: str = "cuda") -> ActivationEstimate:
    """:func:`estimate` for the ``config`` dict stored in a result JSON (``result["config"]``)."""
    return estimate(run_from_config(config), kernels)


def measured_kernels(env: dict) -> str:
    """Whose kernels a result's figures follow. ``env`` is ``result["env"]``.

    Its ``kernels`` entry where the backend wrote one (``cuda`` on CPU tensors under CudaSemantics,
    which saves what CUDA's LayerNorm, autocast softmax and efficient attention save). Results from
    before that entry: ``cpu`` for CPU tensors (the cpu backend, or simulate on fake CPU tensors in a
    CPU build of torch), else ``cuda``."""
    if env.get("kernels") in ("cuda", "cpu"):
        return env["kernels"]
    on_cpu = env.get("backend") == "cpu" or (env.get("backend") == "simulate" and env.get("fake_device") == "cpu")
    return "cpu" if on_cpu else "cuda"
