"""What every backend offers the measured step: a device, memory counters and OOM detection.

All counters are integer bytes. ``allocated`` is what the (real or modelled)
caching allocator has handed out; ``peak_allocated`` is its maximum since the
last ``reset_peak``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional

import torch
from torch import nn


def initialize_in_place(model: nn.Module) -> None:
    """Give a model materialised with ``to_empty`` real values, in place: transformers' own
    ``initialize_weights`` (parameters, LoRA's linears among them, and buffers such as position ids
    and rotary frequencies, which real kernels index with)."""
    for module in model.modules():
        if getattr(module, "_is_hf_initialized", False):
            module._is_hf_initialized = False  # marked on meta; its values are not there any more
    pretrained = next((module for module in model.modules() if hasattr(module, "initialize_weights")), None)
    with torch.no_grad():
        if pretrained is not None:
            pretrained.initialize_weights()


class BusyDeviceError(RuntimeError):
    """The GPU was not empty when a run started: its figures would not be this run's."""


class Backend(ABC):
    """Runs a model on some device and reports its memory.

    Attributes:
        name: ``cuda``, ``simulate`` or ``cpu``.
        device: Where the model's tensors live.
        timed: True when step times measure the real workload (False for simulate).
    """

    name: str
    device: torch.device
    timed: bool = True
    #: The rank a parallel run plays when membench starts the (fake) process group itself
    #: (:func:`membench.parallel.process_group`); rank 0 holds the largest shard.
    rank: int = 0

    def build(self, factory: Callable[[torch.device], nn.Module],
              parallelize: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
        """Build the model (with its method applied) on this backend's device.

        Args:
            parallelize: Wraps the model for data parallelism (:class:`membench.parallel.Parallelizer`);
                with ``on_meta`` it shards the model on ``meta`` (FSDP2), which is then materialised.
        """
        if parallelize is not None and getattr(parallelize, "on_meta", False):
            model = parallelize(factory(torch.device("meta")))
            model.to_empty(device=self.device)
            initialize_in_place(model)
            return model
        model = factory(self.device)
        return parallelize(model) if parallelize is not None else model

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def check_idle(self) -> None:
        """Raise BusyDeviceError if the device already holds memory that is not this run's."""

    @contextlib.contextmanager
    def session(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        """Everything from the optimizer to the last step runs inside this.

        Args:
            tensors: What exists before the session (weights, buffers, the batch).
        """
        yield

    @contextlib.contextmanager
    def op_origins(self) -> Iterator[Callable[[torch.UntypedStorage], Optional[torch._ops.OpOverload]]]:
        """While active, record which ATen op makes each storage; yields the lookup.

        Used around the measured forward to attribute saved tensors to ops. This
        default pushes a dispatch mode (:class:`membench.saved_tensors.OpOrigins`),
        one Python call per op; tracked backends answer from their allocator model.
        """
        from membench.saved_tensors import OpOrigins

        with OpOrigins() as origins:
            yield origins.origin

    def memory_snapshot(self, path: Path) -> ContextManager[None]:
        """Record the allocator's history while active, then write it to ``path`` (``cuda`` only).

        Raises:
            ConfigError: this backend has no allocator history to record.
        """
        from membench.errors import ConfigError

        raise ConfigError(f"backend.memory_snapshot=true needs backend.name=cuda, not {self.name}")

    #: Whether one ``optimizer.step()`` on zero gradients may replace the warm-up steps
    #: (see MeasuredLoop.prime_optimizer).
    primes_optimizer: bool = False

    def host_resident(self, tensors: list[torch.Tensor]) -> None:
        """Mark tensors that CUDA keeps in host memory (AdamW step counters), so they are not counted."""

    def off_device(self) -> Optional[ContextManager[None]]:
        """A context in which new tensors model CUDA managed memory (outside the caching allocator, not counted).

        None (here, and on ``cuda``): the device is real, and a library that allocates managed
        memory (bitsandbytes' paged optimizers) does so itself.
        """
        return None

    def before_first_step(self) -> None:
        """Hook for memory the runtime takes on the first step (simulate adds cuBLAS workspaces)."""

    def synchronize(self) -> None:
        """Wait for queued device work, so timings and counters are final."""

    @abstractmethod
    def allocated(self) -> int: ...

    @abstractmethod
    def reset_peak(self) -> None: ...

    def begin_phase(self, phase: str, label: str) -> None:
        """A phase of step ``label`` starts: its peak is counted from here (tracked backends also log it)."""
        self.reset_peak()

    @abstractmethod
    def peak_allocated(self) -> int: ...

    def gathered(self) -> Optional[int]:
        """Live bytes of FSDP2's gathered (unsharded) parameters; None where they are not told apart (cuda)."""
        return None

    def gathered_peak(self, reset: bool = False) -> Optional[int]:
        """The peak of :meth:`gathered` since the last reset (``reset``: start a new one); None on cuda."""
        return None

    def is_gathered(self, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage`` holds an FSDP2 gathered parameter (never for backends that cannot tell)."""
        return False

    def peak_reserved(self) -> Optional[int]:
        """Peak bytes the allocator held from the driver; None where there is no such allocator."""
        return None

    def allocator_figures(self) -> dict:
        """A real allocator's counterparts of the modelled reserved figures (Metrics field -> value); {} here."""
        return {}

    @abstractmethod
    def is_oom(self, error: BaseException) -> bool: ...

    def predicted_oom(self, phase_peaks: dict[str, int]) -> Optional[tuple[str, str]]:
        """(first phase, message) when simulated peaks would not fit the simulated GPU; None otherwise."""
        return None

    def cleanup(self) -> None:
        """Release cached memory after a run, so the next run starts from the same baseline."""

    @abstractmethod
    def describe(self) -> dict:
        """Environment facts for the result: device name, total memory, calibration constants."""
