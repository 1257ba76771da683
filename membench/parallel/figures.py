"""Per-rank figures of a data-parallel model: its parameter shards and FSDP2's padding.

FSDP2 shards each parameter on dim 0 into ``world_size`` equal chunks, padding dim 0 up to a
multiple of the world size (``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``: every rank's
local storage has the padded chunk's size, rank 0's holds real rows only, so its shard is the
largest). Hence, exactly: ``world_size * sharded_weight_bytes = unsharded bytes + shard_padding_bytes``.
"""

from __future__ import annotations

from torch import nn

from membench.allocator import storage_key
from membench.parallel.wrap import local_tensor


def shard_figures(model: nn.Module, world_size: int) -> dict[str, int]:
    """``world_size``, ``sharded_weight_bytes`` (this rank's parameter storages, exact bytes, each
    once) and ``shard_padding_bytes`` (``world_size`` x that less the unsharded parameters' bytes)."""
    local: dict[int, int] = {}
    whole: dict[int, int] = {}
    for param in model.parameters():
        shard = local_tensor(param)
        key = storage_key(shard)
        local[key] = shard.untyped_storage().nbytes()
        whole[key] = param.numel() * param.element_size()  # a DTensor's numel is the whole parameter's
    sharded = sum(local.values())
    return {"world_size": world_size, "sharded_weight_bytes": sharded,
            "shard_padding_bytes": world_size * sharded - sum(whole.values()) if world_size > 1 else 0}
