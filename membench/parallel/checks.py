"""A parallel run's checks that need more than its config: the backend, the installed torch, the model's size.

Run by :func:`membench.plan.plan` on the meta model, before anything is materialised.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from membench.compat import CompatError, fsdp2_api
from membench.compat.torch_distributed import check_fake_process_group
from membench.config import RunConfig
from membench.errors import ConfigError

GiB = 1 << 30
#: Optimizers whose step fails on FSDP2's DTensor parameters, and the failure (found by running them).
FSDP2_INCOMPATIBLE_OPTIMIZERS = {
    "adamw_8bit": "bitsandbytes' optimizer ops have no DTensor sharding strategy (NotImplementedError: "
                  "bitsandbytes.optimizer_update_32bit has no sharding strategy registered)",
    "paged_adamw_8bit": "bitsandbytes' optimizer ops have no DTensor sharding strategy (NotImplementedError: "
                        "bitsandbytes.optimizer_update_32bit has no sharding strategy registered)",
    "adafactor": "transformers' Adafactor mixes plain tensors into DTensor ops (RuntimeError: aten.add_ got "
                 "mixed torch.Tensor and DTensor)",
}


def check_parallel(run: RunConfig, backend_name: str, meta_model: nn.Module) -> None:
    """Raise ConfigError for a parallel run that cannot be measured as asked, naming why.

    Args:
        backend_name: The resolved backend (``simulate``, ``cpu`` or ``cuda``).
    """
    parallel = run.parallel
    if not parallel.enabled:
        return
    try:
        if backend_name == "simulate":
            check_fake_process_group()
        if parallel.strategy == "fsdp2":
            fsdp2_api()
    except CompatError as error:
        raise ConfigError(f"parallel.strategy={parallel.strategy} cannot run with the installed torch: {error}") from None
    if run.model.quantization != "none":
        raise ConfigError(
            f"model.quantization={run.model.quantization} with parallel.strategy={parallel.strategy} is not modelled: "
            "FSDP2 turns every parameter into a DTensor shard and gathers plain tensors back, so bitsandbytes' "
            "Params4bit/Int8Params lose their quant_state (the packed weight cannot be dequantised), and a "
            "simulated run fails there; accelerate instead leaves uint8 4-bit weights out of sharding, replicated "
            "on every GPU. Run the quantised base on one GPU (parallel.strategy=none)")
    if parallel.strategy == "fsdp2" and run.train.optimizer in FSDP2_INCOMPATIBLE_OPTIMIZERS:
        raise ConfigError(
            f"train.optimizer={run.train.optimizer} cannot step FSDP2's sharded parameters: "
            f"{FSDP2_INCOMPATIBLE_OPTIMIZERS[run.train.optimizer]}; with parallel.strategy=fsdp2 use "
            "train.optimizer=adamw or sgd")
    if parallel.cpu_offload and backend_name != "cuda":
        raise ConfigError(
            "parallel.cpu_offload=true needs backend.name=cuda: FSDP2's CPUOffloadPolicy pins host memory "
            "(aten._pin_memory), which needs a GPU on a real run and has no fake-tensor kernel in simulation")
    if parallel.strategy == "fsdp2" and run.workload.warmup_steps < 1:
        raise ConfigError(
            "parallel.strategy=fsdp2 needs workload.warmup_steps >= 1, not 0: FSDP2 creates its gather buffers in "
            "the first step, and membench tells gathered parameters from activations by seeing FSDP2 free them "
            "(UntypedStorage.resize_) once")
    if parallel.strategy == "ddp":
        _check_ddp(run, backend_name, meta_model)


def _check_ddp(run: RunConfig, backend_name: str, meta_model: nn.Module) -> None:
    weights = sum(param.numel() * param.element_size() for param in meta_model.parameters())
    capacity = _capacity(run, backend_name)
    if capacity is not None and weights > capacity:
        raise ConfigError(
            f"parallel.strategy=ddp keeps the whole model on every GPU, and its weights alone "
            f"({weights / GiB:.1f} GiB) exceed one GPU's {capacity / GiB:.1f} GiB; use parallel.strategy=fsdp2, "
            "which shards them")
    if backend_name == "simulate":
        raise ConfigError(
            "parallel.strategy=ddp cannot be simulated: DDP's C++ Reducer reads every parameter's data when it is "
            "built (fake tensors have none) and allocates its gradient buckets in C++, and the fake process "
            "group's all-reduce hands DDP's communication hook no tensor. Measure DDP with backend.name=cpu "
            "(one real process per rank over gloo) or backend.name=cuda under torchrun")
    if run.workload.warmup_steps < 2:
        raise ConfigError(
            f"parallel.strategy=ddp needs workload.warmup_steps >= 2, not {run.workload.warmup_steps}: DDP builds "
            "its gradient buckets with the model and builds them again in the second step's forward (in the "
            "order gradients became ready); the allocator model sees them from then on")


def _capacity(run: RunConfig, backend_name: str) -> Optional[int]:
    if backend_name == "simulate":
        from membench.devices import device_profile

        return device_profile(run.backend).total_memory_bytes
    if backend_name == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    return None
