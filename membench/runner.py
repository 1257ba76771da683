"""One configuration, end to end: validate -> build model + method -> measured loop -> Result.

Every check that can fail on bad input runs before any real allocation: the
config dataclasses, then :func:`plan` on a ``meta`` model. Failures after that
(a CUDA OOM, a crash inside the model) become a Result with status ``oom`` or
``error``; they never lose the run.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import PretrainedConfig

from membench.backends import Backend, create_backend, resolve_name
from membench.config import RunConfig
from membench.measure import MeasuredLoop, Metrics
from membench.methods import apply_method, autocast_dtype, weight_dtype
from membench.models import build_model, default_excludes, default_targets, load_hf_config
from membench.optim import build_optimizer
from membench.preflight import AdaptedLayer, adapted_layers, check_rank, check_sequence_length
from membench.results import Result, Status, provenance, run_id
from membench.workload import make_batch


@dataclass
class Plan:
    """A validated run: what will be built, before anything is allocated."""

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
            nothing, rank too large.
    """
    hf_config = load_hf_config(run.model)
    check_sequence_length(run, hf_config)
    meta_model = build_model(run.model, hf_config, weight_dtype(run.train), "meta")
    targets, excludes, adapted = [], [], []
    if run.method.uses_adapters:
        targets = run.method.target_modules or default_targets(run.model, hf_config)
        excludes = default_excludes(run.model, hf_config)
        adapted = adapted_layers(meta_model, targets, excludes)
        check_rank(run.method.rank, adapted)
    return Plan(run, hf_config, meta_model, list(targets), list(excludes), adapted)


def recorded_config(run: RunConfig, backend_name: str) -> dict:
    """The config as stored in the result: resolved backend, no output-only fields."""
    config = dataclasses.asdict(run)
    config["backend"]["name"] = backend_name
    for key in ("results_dir", "force"):
        config.pop(key)
    return config


def backend_label(run: RunConfig, backend_name: str) -> str:
    return f"simulate-{run.backend.device}" if backend_name == "simulate" else backend_name


def result_id(run: RunConfig) -> str:
    """The run id (file stem) this config's result will have."""
    name = resolve_name(run.backend)
    return run_id(recorded_config(run, name), backend_label(run, name))


def tokens_per_step(run: RunConfig) -> int:
    workload = run.workload
    decoder = (workload.target_len or workload.seq_len) if run.model.task == "seq2seq_lm" else 0
    return workload.batch_size * (workload.seq_len + decoder)


def build(the_plan: Plan, backend: Backend) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model (method applied, in train mode) and one synthetic batch, on ``backend``'s device."""
    run = the_plan.run

    def factory(device: torch.device) -> nn.Module:
        model = the_plan.meta_model if device.type == "meta" else build_model(
            run.model, the_plan.hf_config, weight_dtype(run.train), device)
        with torch.device(device):  # PEFT creates adapters on the default device, then moves them
            return apply_method(model, run.method, run.model.task, the_plan.targets, the_plan.excludes,
                                weight_dtype(run.train))

    torch.manual_seed(run.workload.seed)
    model = backend.build(factory)
    model.train()
    batch = make_batch(run.model, the_plan.hf_config, run.workload)
    return model, {key: backend.to_device(value) for key, value in batch.items()}


def _measure(the_plan: Plan, backend: Backend, loop_holder: list) -> Metrics:
    run = the_plan.run
    model, batch = build(the_plan, backend)
    with backend.session(model):
        optimizer = build_optimizer(model, run.method, run.train)
        loop = MeasuredLoop(backend, model, optimizer, batch, autocast_dtype(run.train))
        loop_holder.append(loop)
        warmup = backend.warmup_steps(run.workload.warmup_steps)
        return loop.run(warmup, run.workload.measured_steps, tokens_per_step(run))


def execute(the_plan: Plan, backend: Optional[Backend] = None) -> Result:
    """Measure a planned run and return its Result (never raises for OOM or model errors)."""
    run = the_plan.run
    backend = backend or create_backend(run.backend)
    if hasattr(backend, "check_idle"):
        backend.check_idle()
    started = time.perf_counter()
    loop_holder: list[MeasuredLoop] = []
    status = Status()
    try:
        metrics = _measure(the_plan, backend, loop_holder)
        oom = backend.predicted_oom(metrics.peak_allocated_bytes)
        if oom:
            status = Status("oom", _first_phase_over(backend, metrics), oom)
    except Exception as error:  # noqa: BLE001 - every failure must become a result row
        loop = loop_holder[0] if loop_holder else None
        phase = loop.phase if loop else "build"
        metrics = loop.metrics if loop else Metrics()
        metrics.peak_allocated_bytes = max(metrics.peak_allocated_bytes or 0, backend.peak_allocated())
        if backend.is_oom(error):
            status = Status("oom", phase, str(error).splitlines()[0])
        else:
            status = Status("error", phase, "".join(traceback.format_exception_only(error)).strip())
            status.message += "\n" + traceback.format_exc(limit=-8)
    finally:
        loop_holder.clear()
        backend.cleanup()
    metrics.runtime_overhead_bytes = backend.describe().get("runtime_overhead_bytes", 0)
    env = {"backend": backend.name, **backend.describe(), **provenance(),
           "warmup_steps_run": backend.warmup_steps(run.workload.warmup_steps),
           "wall_time_s": round(time.perf_counter() - started, 3)}
    config = recorded_config(run, backend.name)
    return Result(run_id(config, backend_label(run, backend.name)), config, status, dataclasses.asdict(metrics), env)


def _first_phase_over(backend: Backend, metrics: Metrics) -> Optional[str]:
    """The first measured phase whose simulated peak does not fit the device."""
    capacity = backend.describe().get("device_total_memory_bytes")
    for phase, peak in metrics.phase_peak_bytes.items():
        if capacity is not None and peak > capacity:
            return phase
    return None


def measure(run: RunConfig) -> Result:
    """Validate then measure ``run``: the whole pipeline for one configuration."""
    return execute(plan(run))
