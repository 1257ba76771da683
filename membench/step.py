"""The measured training loop: warm-up steps, then steps split into phases.

One step is forward -> backward -> AdamW step -> ``zero_grad(set_to_none=True)``,
the loop every fine-tuning script runs. Each phase gets its own peak (the
backend's peak is reset at the phase start). The figures, all integer bytes:

* ``weight_bytes``: parameters + buffers (+ a quantised base's absmax and code tables), once per
  storage, allocator-rounded.
* ``optimizer_state_bytes``: what the first ``optimizer.step()`` adds.
* ``paged_optimizer_state_bytes``: a paged bitsandbytes optimizer's state in CUDA managed memory,
  outside the caching allocator, so in neither ``optimizer_state_bytes`` nor any peak; 0 for
  other optimizers (:func:`membench.optim.paged_state_bytes`).
* ``gradient_bytes``: the ``.grad`` storages of trainable weights after backward.
* ``activation_bytes``: allocated after forward minus before forward.
* ``saved_tensor_bytes``: unique storages autograd packed, parameters excluded.
* ``saved_bytes_by_module`` / ``saved_bytes_by_op``: the same storages split by
  the module that saved them (layer indices collapsed to ``*``) and by the ATen
  op that made them; each sums to ``saved_tensor_bytes`` exactly.
  ``saved_tensors_by_module`` / ``saved_tensors_by_op`` count the storages;
  ``saved_bytes_by_module_op`` crosses the two ({module: {op: bytes}}).
* ``ctx_kept_bytes_by_function``: storages custom autograd functions keep as ``ctx`` attributes
  (invisible to saved-tensor hooks, e.g. bitsandbytes' 8-bit matmul input), by function.
* ``peak_allocated_bytes``: the highest phase peak over the measured steps.

Under data parallelism (``parallel.strategy``) every figure is one rank's: a DTensor counts its
local shard. FSDP2's gathered (unsharded) parameters are neither weights nor activations:
``gathered_param_peak_bytes`` is their highest live total in the measured steps, and they are
left out of ``activation_bytes`` and ``saved_tensor_bytes`` (see :mod:`membench.parallel.figures`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from membench.backends.base import Backend
from membench.allocator import allocator_bytes, storage_key
from membench.compat import adamw_host_step_counters
from membench.quantization import logical_numel, model_tensors
from membench.optim import paged_state_bytes
from membench.parallel.wrap import local_tensor
from membench.saved_tensors import SavedTensorCounter

@dataclass
class Metrics:
    """Everything one run measured. Bytes are integers; None means not reached or not available."""

    total_params: int = 0
    trainable_params: int = 0
    weight_bytes: int = 0
    optimizer_state_bytes: Optional[int] = None
    paged_optimizer_state_bytes: Optional[int] = None  # managed memory, outside allocated (paged optimizers)
    gradient_bytes: Optional[int] = None
    activation_bytes: Optional[int] = None
    saved_tensor_bytes: Optional[int] = None
    peak_allocated_bytes: Optional[int] = None
    peak_reserved_bytes: Optional[int] = None
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    phase_allocated_bytes: dict[str, int] = field(default_factory=dict)
    step_time_s: Optional[float] = None
    tokens_per_s: Optional[float] = None
    runtime_overhead_bytes: int = 0
    # From the caching-allocator model (simulate, cpu: membench.reserved) or the real allocator (cuda):
    reserved_segments: Optional[int] = None  # segments held at the end of the measured steps
    fragmentation_bytes: Optional[int] = None  # reserved - allocated when allocated peaks in the measured steps
    num_alloc_retries: Optional[int] = None  # cudaMalloc failures answered by freeing cached segments
    # saved_tensor_bytes split by the module that packed each storage (its path, layer indices as
    # ``*``) and by the ATen op that made it; each sums to saved_tensor_bytes. See membench.saved_tensors.
    saved_bytes_by_module: dict[str, int] = field(default_factory=dict)
    saved_tensors_by_module: dict[str, int] = field(default_factory=dict)  # storages per module pattern
    saved_bytes_by_op: dict[str, int] = field(default_factory=dict)
    saved_tensors_by_op: dict[str, int] = field(default_factory=dict)  # storages per op
    saved_bytes_by_module_op: dict[str, dict[str, int]] = field(default_factory=dict)  # {module: {op: bytes}}
    # Kept for backward as plain attributes of custom autograd functions (not save_for_backward, so not
    # in saved_tensor_bytes; in activation_bytes and the peak): {function: bytes}. See membench.saved_tensors.
    ctx_kept_bytes_by_function: dict[str, int] = field(default_factory=dict)
    # Data parallelism (membench.parallel.figures); these keep their defaults on one GPU.
    world_size: int = 1
    sharded_weight_bytes: Optional[int] = None  # this rank's parameter shards, exact storage bytes (no rounding)
    shard_padding_bytes: Optional[int] = None  # FSDP2's dim-0 padding summed over all ranks, exact bytes
    gathered_param_peak_bytes: Optional[int] = None  # FSDP2: peak of gathered (unsharded) parameters


def unique_storage_bytes(tensors) -> int:
    """Allocator bytes of the distinct storages behind ``tensors`` (tied weights count once; a DTensor
    counts its rank's local shard)."""
    sizes = {}
    for tensor in tensors:
        local = local_tensor(tensor)
        sizes[storage_key(local)] = allocator_bytes(local.untyped_storage().nbytes())
    return sum(sizes.values())


@dataclass
class Progress:
    """Where a run is, and what it has measured so far; survives a failure (holds no tensors).

    Attributes:
        phase: ``build``, ``model_ready``, ``forward``, ``backward``, ``optimizer_step`` or ``done``.
        step_label: e.g. ``warm-up step 1/2`` or ``measured step 1/1``; empty before the first step.
        metrics: Filled in as each figure becomes known.
    """

    phase: str = "build"
    step_label: str = ""
    metrics: Metrics = field(default_factory=Metrics)


class MeasuredLoop:
    """Runs warm-up and measured steps, recording into ``progress`` as it goes.

    Step times include what measuring costs: a device synchronise at each phase
    boundary and, in measured steps, one Python call per tensor autograd saves
    (microseconds each).
    """

    def __init__(self, backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer,
                 batch: dict[str, torch.Tensor], autocast_dtype: Optional[torch.dtype], progress: Progress,
                 sharded: bool = False) -> None:
        self.backend = backend
        self.model = model
        self.optimizer = optimizer
        self.batch = batch
        self.autocast_dtype = autocast_dtype
        self.progress = progress
        self.metrics = progress.metrics
        self.sharded = sharded  # FSDP2: gathered parameters are measured apart
        progress.phase = "model_ready"
        parameters = list(model.parameters())
        self.trainable = [p for p in parameters if p.requires_grad]
        self.metrics.total_params = sum(logical_numel(p) for p in {id(p): p for p in parameters}.values())
        self.metrics.trainable_params = sum(p.numel() for p in self.trainable)
        self.metrics.weight_bytes = unique_storage_bytes(model_tensors(model))  # quantisation state included
        self.metrics.phase_allocated_bytes["model_ready"] = backend.allocated()
        self._saved = SavedTensorCounter([local_tensor(p) for p in parameters], model, backend.is_gathered)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.backend.device.type, dtype=self.autocast_dtype)

    def _enter(self, phase: str) -> None:
        self.progress.phase = phase
        self.backend.begin_phase(phase, self.progress.step_label)

    def _leave(self, phase: str, peaks: dict[str, int], reserved: list[int]) -> None:
        self.backend.synchronize()
        peaks[phase] = max(peaks.get(phase, 0), self.backend.peak_allocated())
        reserved_now = self.backend.peak_reserved()
        if reserved_now is not None:
            reserved.append(reserved_now)
        self.metrics.phase_allocated_bytes[phase] = self.backend.allocated()

    def step(self, first: bool, measured: bool, peaks: dict[str, int], reserved: list[int]) -> float:
        """One training step; returns its wall time in seconds."""
        self.backend.synchronize()
        start = time.perf_counter()

        if measured:
            self.backend.gathered_peak(reset=True)
        self._enter("forward")
        before_forward = self._ungathered()
        with contextlib.ExitStack() as saving:
            if measured:
                origins = saving.enter_context(self.backend.op_origins())
                saving.enter_context(self._saved.counting(origins))
            with self._autocast():
                loss = self.model(**self.batch).loss
        self._leave("forward", peaks, reserved)
        if measured:
            self._saved.forget_freed()  # packed inside the forward but already dropped: backward keeps none
            self.metrics.activation_bytes = self._ungathered() - before_forward
            self.metrics.saved_tensor_bytes = self._saved.total_bytes
            self.metrics.saved_bytes_by_module, self.metrics.saved_tensors_by_module = self._saved.by_module()
            self.metrics.saved_bytes_by_op, self.metrics.saved_tensors_by_op = self._saved.by_op()
            self.metrics.saved_bytes_by_module_op = self._saved.by_module_and_op()
            self.metrics.ctx_kept_bytes_by_function = self._saved.kept_by_function_objects(loss.grad_fn)

        self._enter("backward")
        loss.backward()
        del loss
        self._leave("backward", peaks, reserved)
        self.metrics.gradient_bytes = unique_storage_bytes(p.grad for p in self.trainable if p.grad is not None)

        self._enter("optimizer_step")
        before_update = self.backend.allocated()
        self.optimizer.step()
        if first:
            self._record_optimizer_state(before_update)
        self.optimizer.zero_grad(set_to_none=True)
        self._leave("optimizer_step", peaks, reserved)
        if measured and self.sharded and self.backend.gathered() is not None:
            self.metrics.gathered_param_peak_bytes = max(self.metrics.gathered_param_peak_bytes or 0,
                                                         self.backend.gathered_peak())
        return time.perf_counter() - start

    def _ungathered(self) -> int:
        """Allocated bytes less FSDP2's gathered parameters (which are not activations)."""
        gathered = self.backend.gathered()
        # Unchanged when nothing is gathered: a symbolic trace's allocated() remembers where it was read.
        return self.backend.allocated() - gathered if gathered else self.backend.allocated()

    def _record_optimizer_state(self, before_update: int) -> None:
        self.backend.host_resident(adamw_host_step_counters(self.optimizer))
        self.metrics.optimizer_state_bytes = self.backend.allocated() - before_update
        self.metrics.paged_optimizer_state_bytes = paged_state_bytes(self.optimizer)
        self.metrics.phase_allocated_bytes["optimizer_state"] = self.backend.allocated()

    def prime_optimizer(self) -> None:
        """Allocate the optimizer state as the first step would, from zero gradients, without forward/backward.

        Gradients exist during the first real ``optimizer.step()`` too, so the
        recorded ``optimizer_state`` figures are the same.
        """
        self.progress.step_label = "optimizer priming"
        self.backend.before_first_step()
        # The zero gradients come before the phase mark, so a recorded log (membench.events) tells them
        # apart from what optimizer.step() allocates (membench.reserved replays the latter as the first
        # real step's); the phase's peak still includes them (it starts from what is allocated at the mark).
        for param in self.trainable:
            param.grad = torch.zeros_like(param)
        self._enter("optimizer_step")
        before_update = self.backend.allocated()
        self.optimizer.step()
        self._record_optimizer_state(before_update)
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, warmup_steps: int, measured_steps: int, tokens_per_step: int, primed: bool = False) -> Metrics:
        """Warm up (or take ``primed`` optimizer state as given), then measure.

        Args:
            primed: :meth:`prime_optimizer` already allocated the optimizer state.
        """
        if not primed:
            self.backend.before_first_step()
        for index in range(warmup_steps):
            self.progress.step_label = f"warm-up step {index + 1}/{warmup_steps}"
            self.step(first=index == 0 and not primed, measured=False, peaks={}, reserved=[])
        peaks = self.metrics.phase_peak_bytes  # filled live, so a failure keeps the peaks so far
        reserved: list[int] = []
        times = []
        for index in range(measured_steps):
            self.progress.step_label = f"measured step {index + 1}/{measured_steps}"
            first = warmup_steps == 0 and index == 0 and not primed
            times.append(self.step(first=first, measured=True, peaks=peaks, reserved=reserved))
        self.progress.step_label = "end of run"
        self._enter("done")  # closes the last phase in a recorded log (membench.events); frees after it are teardown
        self.metrics.peak_allocated_bytes = max(peaks.values())
        self.metrics.peak_reserved_bytes = max(reserved) if reserved else None
        if self.backend.timed:
            self.metrics.step_time_s = statistics.median(times)
            self.metrics.tokens_per_s = tokens_per_step / self.metrics.step_time_s
        return self.metrics
