"""Wrapping a model for data parallelism with torch's own FSDP2 and DDP.

FSDP2 (``fully_shard``) shards on ``meta``, before anything is materialised: each repeated block
becomes a parameter group of its own, then (``parallel.wrap_embeddings``) the input embeddings and
the output head, then the root takes what is left. DDP wraps a materialised model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from membench.compat import fsdp2_api
from membench.config import ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor (``DTensor.to_local``, a view of its storage); else ``tensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return tensor
    if isinstance(tensor, DTensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: entries of the outermost ``nn.ModuleList`` s (decoder layers, T5 blocks).

    A ModuleList inside a block (T5's ``block.layer``) is part of that block.
    """
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            for child in module.children():
                inside.add(id(child))
            continue
        if isinstance(module, nn.ModuleList):
            for child in module.children():
                found.append(child)
                inside.add(id(child))
    return found


def _embeddings(model: nn.Module) -> list[nn.Module]:
    """Input embeddings and output head (once each, a tied pair once), when the model names them."""
    found: list[nn.Module] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if isinstance(module, nn.Module) and all(module is not other for other in found):
            found.append(module)
    return found


@dataclass
class Parallelizer:
    """Wraps a model for ``parallel``; ``on_meta``: call it on the meta model, before materialising."""

    parallel: ParallelConfig
    mesh: object

    @property
    def on_meta(self) -> bool:
        return self.parallel.strategy == "fsdp2"

    def __call__(self, model: nn.Module) -> nn.Module:
        if self.parallel.strategy == "fsdp2":
            return self._fully_shard(model)
        return self._ddp(model)

    def _fully_shard(self, model: nn.Module) -> nn.Module:
        fully_shard, mixed_precision, cpu_offload = fsdp2_api()
        parallel = self.parallel
        options = {"mesh": self.mesh, "reshard_after_forward": parallel.reshard_after_forward}
        if parallel.param_dtype is not None or parallel.reduce_dtype is not None:
            options["mp_policy"] = mixed_precision(
                param_dtype=DTYPES.get(parallel.param_dtype), reduce_dtype=DTYPES.get(parallel.reduce_dtype))
        if parallel.cpu_offload:
            options["offload_policy"] = cpu_offload()
        groups = blocks(model)
        if parallel.wrap_embeddings:
            groups += [module for module in _embeddings(model) if all(module is not block for block in groups)]
        for module in groups:
            fully_shard(module, **options)
        # reshard_after_forward=None for the root is FSDP2's own default (it keeps the root's
        # parameters gathered from forward to backward, since backward needs them first).
        root = dict(options, reshard_after_forward=None if parallel.reshard_after_forward is True
                    else parallel.reshard_after_forward)
        return fully_shard(model, **root)

    def _ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, bucket_cap_mb=self.parallel.bucket_cap_mb)


def parallelizer(parallel: ParallelConfig, mesh: Optional[object]) -> Optional[Parallelizer]:
    return Parallelizer(parallel, mesh) if parallel.enabled else None
