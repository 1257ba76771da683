"""Simulation: the real model code on fake tensors, with the allocator model.

FakeTensorMode gives every tensor a shape, dtype and device but no memory, so
a 7B model runs on a laptop in seconds. The model is built on ``meta`` and
then materialised into fake tensors; random init on fake CUDA tensors fails,
and on meta it costs nothing.

A CUDA build of torch simulates on fake ``cuda`` tensors and so runs CUDA's
own code paths. A CPU-only build cannot (autograd refuses fake CUDA there), so
it uses fake ``cpu`` tensors plus :class:`CudaSemantics` for the two places
where CPU and CUDA save different bytes. transformers' packed-sequence check,
which fake tensors cannot answer, is answered by
:func:`membench.compat.no_packed_sequences`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from membench.compat import FakeTensorMode, fake_quantized_parameter, fast_fake_cache_keys, no_packed_sequences
from membench.devices import TRAINING_THREADS, DeviceProfile
from membench.backends.tracker import TrackedBackend
from membench.errors import ConfigError
from membench.quantization import is_quantized

GiB = 1 << 30


def empty_like_on(device: torch.device):
    return lambda tensor: torch.empty(tensor.shape, dtype=tensor.dtype, device=device)


def materialize(model: nn.Module, device: torch.device, fake_mode=None) -> nn.Module:
    """Replace every meta parameter and buffer with an empty tensor on ``device``, in place.

    Unlike ``Module.to_empty``, a tensor shared by two modules (tied embeddings)
    stays shared, so it is counted once. A bitsandbytes quantised weight becomes a
    fake tensor of its own class with fake statistics (needs the active ``fake_mode``).
    """
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        # This module's own tensors, every name (remove_duplicate=False), listed before any is replaced.
        own = [*module.named_parameters(recurse=False, remove_duplicate=False),
               *module.named_buffers(recurse=False, remove_duplicate=False)]
        for key, tensor in own:
            if id(tensor) not in made and is_quantized(tensor):  # bitsandbytes' packed weight and its statistics
                made[id(tensor)] = fake_quantized_parameter(fake_mode, tensor, device, empty_like_on(device))
                if getattr(module, "quant_state", None) is not None:  # Linear4bit keeps a second reference
                    module.quant_state = made[id(tensor)].quant_state
            elif id(tensor) not in made:
                empty = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                if isinstance(tensor, nn.Parameter):
                    empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
                made[id(tensor)] = empty
            setattr(module, key, made[id(tensor)])  # a buffer stays a buffer (persistent or not)
    return model


class SimulateBackend(TrackedBackend):
    """Predicts the figures of ``profile`` without allocating device memory."""

    name = "simulate"
    timed = False

    def __init__(self, profile: DeviceProfile, cuda_semantics: bool = True, fake_device: str = "auto") -> None:
        if fake_device == "cuda" and not torch.backends.cuda.is_built():
            raise ConfigError("backend.fake_device=cuda needs a CUDA build of torch; use auto or cpu")
        # auto: fake CUDA only where CUDA really runs. A CUDA wheel without a GPU would
        # silently disable torch.autocast("cuda") and leave kernel choice to a missing device.
        fake_cuda = fake_device == "cuda" or (fake_device == "auto" and torch.cuda.is_available())
        # With fake CUDA tensors the CUDA code paths run as they are; no emulation needed.
        super().__init__(torch.device("cuda" if fake_cuda else "cpu"), cuda_semantics and not fake_cuda)
        self.profile = profile
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=False)

    def build(self, factory: Callable[[torch.device], nn.Module],
              parallelize: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
        model = factory(torch.device("meta"))
        if parallelize is not None and getattr(parallelize, "on_meta", False):
            model = parallelize(model)  # FSDP2 shards on meta; to_empty keeps its DTensor parameters
            # to_empty's empty_like takes the meta local shards as inputs: let this one step accept them.
            self.fake_mode.allow_non_fake_inputs = True
            try:
                with self.fake_mode:
                    return model.to_empty(device=self.device)
            finally:
                self.fake_mode.allow_non_fake_inputs = False
        with self.fake_mode:
            model = materialize(model, self.device, self.fake_mode)
            return parallelize(model) if parallelize is not None else model

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.fake_mode:
            return self.fake_mode.from_tensor(tensor).to(self.device)

    @contextlib.contextmanager
    def session(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        # The tracker must sit above the fake mode, so it sees the fake outputs.
        # Same dispatch-cache keys, built faster (about 15% of a direct simulation's time).
        with fast_fake_cache_keys(), self.fake_mode, super().session(tensors), no_packed_sequences():
            yield

    # Warm-up steps exist to reach the steady state: optimizer state allocated, caches and
    # workspaces warm. The allocator model has no cache, and a step leaves nothing behind but
    # the optimizer state, so one optimizer.step() on zero gradients reaches the same state
    # without a forward and backward (~3 s for LLaMA-7B here). tests/test_simulate.py proves
    # the measured step equals the cpu backend's after real warm-up steps.
    primes_optimizer = True

    def before_first_step(self) -> None:
        # One cuBLAS workspace per training thread (membench.devices): separate allocations, as the
        # caching allocator sees them (each opens its own segment; membench.reserved places them).
        share, rest = divmod(self.profile.runtime_overhead_bytes, TRAINING_THREADS)
        for index in range(TRAINING_THREADS):
            self.tracker.add_constant(share + (rest if index == 0 else 0))

    def is_oom(self, error: BaseException) -> bool:
        return False  # fake tensors never run out; see predicted_oom

    def predicted_oom(self, phase_peaks: dict[str, int]) -> Optional[tuple[str, str]]:
        capacity = self.profile.total_memory_bytes
        over = [phase for phase, peak in phase_peaks.items() if peak > capacity]
        if not over:
            return None
        peak = max(phase_peaks.values())
        return over[0], (f"predicted peak {peak / GiB:.2f} GiB exceeds the {self.profile.name}'s "
                         f"{capacity / GiB:.1f} GiB")

    def describe(self) -> dict:
        return {
            "device_name": self.profile.name,
            "device_total_memory_bytes": self.profile.total_memory_bytes,
            "simulated_device": self.profile.key,
            "fake_device": self.device.type,
            "runtime_overhead_bytes": self.profile.runtime_overhead_bytes,
            "cuda_semantics": self.cuda_semantics,
            # Whose kernels' saved bytes the figures follow (membench.analytic.measured_kernels).
            "kernels": "cuda" if (self.cuda_semantics or self.device.type == "cuda") else "cpu",
        }
