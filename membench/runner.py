"""One configuration, end to end: plan (validate) -> build model + method -> measured step -> Result.

Every check that can fail on bad input runs before any real allocation: the
config dataclasses, then :func:`membench.plan.plan` on a ``meta`` model. Failures
after that (a CUDA OOM, a crash inside the model) become a Result with status
``oom`` or ``error``; they never lose the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from membench.backends import Backend, create_backend, resolve_name
from membench.config import RunConfig
from membench.identity import IDENTITY_VERSION, backend_label, recorded_config, run_id
from membench.methods import autocast_dtype, build_for_method
from membench.optim import build_optimizer, replaces_state_each_step
from membench.parallel import local_tensor, parallelizer, process_group
from membench.parallel.figures import shard_figures
from membench.plan import Plan, plan
from membench.quantization import model_tensors
from membench.results import Result, Status, provenance
from membench.step import MeasuredLoop, Metrics, Progress
from membench.workload import make_batch


@contextlib.contextmanager
def _module_paths(tracker) -> Iterator[None]:
    """Log the module path of each allocation (:mod:`membench.module_scope`) while the block runs."""
    from membench.module_scope import ModuleScope

    with ModuleScope().active() as scope:
        tracker.module_of = scope.current
        try:
            yield
        finally:
            tracker.module_of = None


def snapshot_path(run: RunConfig, the_run_id: str) -> Path:
    """Where ``backend.memory_snapshot`` puts the allocator snapshot: beside the result JSON, same stem."""
    return Path(run.results_dir) / f"{the_run_id}.snapshot.pickle"


def tokens_per_step(run: RunConfig, task: Optional[str] = None) -> int:
    workload = run.workload
    decoder = (workload.target_len or workload.seq_len) if (task or run.model.task) == "seq2seq_lm" else 0
    return workload.batch_size * (workload.seq_len + decoder)


def build(the_plan: Plan, backend: Backend, mesh=None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model (method applied, wrapped for ``run.parallel`` on ``mesh``, in train mode) and one
    synthetic batch, on ``backend``'s device."""
    run = the_plan.run

    def factory(device: torch.device) -> nn.Module:
        # A fresh model every time: a plan must stay executable more than once.
        return build_for_method(run, the_plan.model, the_plan.hf_config, the_plan.targets, the_plan.excludes,
                                the_plan.target_parameters, device)

    torch.manual_seed(run.workload.seed)
    model = backend.build(factory, parallelizer(run.parallel, mesh))
    model.train()
    moved: dict[int, torch.Tensor] = {}  # causal LMs use input_ids as labels: one copy, as a script would
    batch = {}
    for key, value in make_batch(the_plan.model, the_plan.hf_config, run.workload).items():
        batch[key] = moved.setdefault(id(value), backend.to_device(value))
    return model, batch


def warmup(run: RunConfig, backend: Backend) -> tuple[int, bool]:
    """(full warm-up steps to run, whether to prime the optimizer state instead).

    A parallel run never primes: FSDP2 and DDP initialise lazily in the first forward and backward
    (gather buffers, DDP's buckets), so one real step is what reaches their steady state; a
    backend that may prime runs that one step instead of all the warm-up steps. Nor does an
    optimizer that replaces part of its state every step (Adafactor): see optim.replaces_state_each_step.
    """
    if run.parallel.enabled and backend.primes_optimizer:
        return min(run.workload.warmup_steps, 1), False
    primes = backend.primes_optimizer and not replaces_state_each_step(run.train)
    primed = primes and run.workload.warmup_steps > 0
    return (0 if primes else run.workload.warmup_steps), primed


def _measure(the_plan: Plan, backend: Backend, progress: Progress) -> Metrics:
    run = the_plan.run
    with process_group(run.parallel, backend.device, backend.rank) as mesh:
        return _measure_on(the_plan, backend, progress, mesh)


def _measure_on(the_plan: Plan, backend: Backend, progress: Progress, mesh) -> Metrics:
    run = the_plan.run
    model, batch = build(the_plan, backend, mesh)
    existing = [*model_tensors(model), *batch.values()]
    with backend.session([local_tensor(tensor) for tensor in existing]):
        optimizer = build_optimizer(model, run.method, run.train, backend)
        sharded = run.parallel.strategy == "fsdp2"
        loop = MeasuredLoop(backend, model, optimizer, batch, autocast_dtype(run.train), progress, sharded)
        for key, value in shard_figures(model, run.parallel.world_size).items():
            setattr(loop.metrics, key, value)
        warmup_steps, primed = warmup(run, backend)
        if primed:
            loop.prime_optimizer()
        return loop.run(warmup_steps, run.workload.measured_steps, tokens_per_step(run, the_plan.model.task), primed=primed)


def _failure(backend: Backend, error: BaseException, progress: Progress) -> Status:
    """The status of a run that raised: ``oom`` when the device ran out, else ``error``."""
    first_line = "".join(traceback.format_exception_only(error)).strip().splitlines()[0]
    where = f"{progress.step_label}: " if progress.step_label else ""
    if backend.is_oom(error):
        return Status("oom", progress.phase, where + first_line)
    return Status("error", progress.phase, where + first_line + "\n" + traceback.format_exc(limit=-8))


def execute(the_plan: Plan, backend: Optional[Backend] = None) -> Result:
    """Measure a planned run and return its Result (never raises for OOM or model errors).

    Raises:
        ConfigError: the backend cannot run here (no GPU for ``cuda``).
        BusyDeviceError: the GPU already holds memory that is not this run's.
    """
    run = the_plan.run
    backend = backend or create_backend(run.backend)
    backend.check_idle()
    backend.reset_peak()
    started = time.perf_counter()
    progress = Progress()
    config = recorded_config(run, backend.name)
    the_run_id = run_id(config, backend_label(run, backend.name), schema=run)
    # A tracked backend (simulate, cpu) logs every allocation, for the caching-allocator model
    # (membench.reserved: reserved memory, and the snapshot when asked for).
    tracker = getattr(backend, "tracker", None)
    events = tracker.record() if tracker is not None else None
    reserved_env: dict = {}
    # The snapshot is written when the block ends, also on an OOM: the moment it is most useful.
    # A tracked backend's snapshot frames name each allocation's module (the log carries it).
    recording = contextlib.nullcontext()
    if run.backend.memory_snapshot:
        recording = backend.memory_snapshot(snapshot_path(run, the_run_id)) if events is None else _module_paths(tracker)
    try:
        with recording:
            metrics = _measure(the_plan, backend, progress)
            for key, value in backend.allocator_figures().items():
                setattr(metrics, key, value)
        predicted = backend.predicted_oom(metrics.phase_peak_bytes)
        if events is not None:
            from membench.reserved import account

            by_reserved, reserved_env = account(
                events, run.workload.warmup_steps, run.backend.alloc_conf, backend,
                metrics, snapshot_path(run, the_run_id) if run.backend.memory_snapshot else None)
            predicted = predicted or by_reserved
        status = Status("oom", *predicted) if predicted else Status()
    except Exception as error:  # noqa: BLE001 - every failure must become a result row
        status = _failure(backend, error, progress)
        metrics = progress.metrics
        metrics.peak_allocated_bytes = max(metrics.peak_allocated_bytes or 0, backend.peak_allocated())
    finally:
        backend.cleanup()  # the model died with _measure's frame; give its memory back
    described = backend.describe()
    warmup_steps, primed = warmup(run, backend)
    metrics.runtime_overhead_bytes = described.get("runtime_overhead_bytes", 0)
    env = {"backend": backend.name, **described, **reserved_env, **provenance(), "identity_version": IDENTITY_VERSION,
           **the_plan.env(), "warmup_steps_run": warmup_steps, "optimizer_primed": primed,
           "wall_time_s": round(time.perf_counter() - started, 3)}
    return Result(the_run_id, config, status, dataclasses.asdict(metrics), env)


def measure(run: RunConfig) -> Result:
    """Validate then measure ``run``: the whole pipeline for one configuration.

    A parallel run on the ``cpu`` backend, outside any process group, runs for real as one process
    per rank over gloo (:mod:`membench.parallel.launch`); its result is rank 0's, with every rank's
    figures in ``env.ranks``.
    """
    the_plan = plan(run)
    if run.parallel.enabled and resolve_name(run.backend) == "cpu":
        import torch.distributed as dist

        if not dist.is_initialized():
            from membench.parallel.launch import combine, measure_ranks

            return combine(measure_ranks(run))
    return execute(the_plan)
