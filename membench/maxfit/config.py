"""The ``maxfit`` section of ``conf/maxfit.yaml``: its schema, its Hydra registration and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from membench.config import (
    MAX_WORLD_SIZE,
    BackendConfig,
    MethodConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    WorkloadConfig,
    check_choice,
    check_positive,
    register_configs,
)
from membench.errors import ConfigError

GiB = 1 << 30
DIMENSIONS = ("batch_size", "seq_len")
#: Which answers of a search on traces a direct simulation confirms at n and n + 1.
CONFIRM = ("method", "once", "all", "off")


@dataclass
class MaxFitConfig:
    """The ``maxfit`` section of ``conf/maxfit.yaml`` (see there for each key)."""

    budgets_gib: list[float] = field(default_factory=lambda: [24.0, 40.0, 80.0])
    budgets_bytes: Optional[list[int]] = None
    methods: list[str] = field(default_factory=lambda: ["full", "lora", "lora_fa", "lora_recompute"])
    dimensions: list[str] = field(default_factory=lambda: list(DIMENSIONS))
    search_cap: int = 65536
    verify: bool = False
    confirm: str = "once"
    output: str = "results/maxfit"
    by: str = "reserved"
    #: Search each method on each of these world sizes (with the command line's parallel.strategy):
    #: the largest per-GPU value on N GPUs, and the fewest GPUs that fit. null: the configured world size.
    world_sizes: Optional[list[int]] = None

    def __post_init__(self) -> None:
        from membench.maxfit.probe import BY

        check_choice("maxfit.by", self.by, BY)
        check_positive("maxfit.search_cap", self.search_cap)
        check_choice("maxfit.confirm", self.confirm, CONFIRM)
        check_dimensions(self.dimensions)
        if not self.methods:
            raise ConfigError("maxfit.methods=[] names no method; e.g. [full, lora, lora_fa, lora_recompute]")
        if self.world_sizes is not None:
            if not self.world_sizes:
                raise ConfigError("maxfit.world_sizes=[] names no world size; e.g. [1, 2, 4, 8], or null")
            for size in self.world_sizes:
                if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_WORLD_SIZE:
                    raise ConfigError(f"maxfit.world_sizes entry {size!r} must be an integer from 1 to "
                                      f"{MAX_WORLD_SIZE}")

    def budgets(self) -> list[int]:
        """The budgets in integer bytes (``budgets_bytes`` when given, else ``budgets_gib``)."""
        if self.budgets_bytes is not None:
            return check_budgets(self.budgets_bytes, "maxfit.budgets_bytes")
        check_budgets(self.budgets_gib, "maxfit.budgets_gib")
        return [int(round(gib * GiB)) for gib in self.budgets_gib]


@dataclass
class MaxFitRunConfig(RunConfig):
    """Root schema of ``conf/maxfit.yaml``: ``conf/config.yaml`` plus a ``maxfit`` section.

    It is merged after ``config``: the RunConfig fields are MISSING here, and OmegaConf
    never lets a MISSING value replace a set one, so they keep config.yaml's values (and
    types); only ``maxfit`` is added.
    """

    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    workload: WorkloadConfig = MISSING
    train: TrainConfig = MISSING
    backend: BackendConfig = MISSING
    parallel: ParallelConfig = MISSING
    results_dir: str = MISSING
    force: bool = MISSING
    maxfit: MaxFitConfig = field(default_factory=MaxFitConfig)


def register_maxfit_configs() -> None:
    register_configs()
    ConfigStore.instance().store(name="maxfit_schema", node=MaxFitRunConfig)


def check_dimensions(dimensions: Sequence[str]) -> None:
    if not dimensions:
        raise ConfigError(f"maxfit.dimensions=[] searches nothing; choose from: {', '.join(DIMENSIONS)}")
    for dimension in dimensions:
        if dimension not in DIMENSIONS:
            raise ConfigError(f"maxfit.dimensions entry {dimension!r} is not supported; "
                              f"choose from: {', '.join(DIMENSIONS)}")


def check_budgets(budgets: Sequence[float], key: str = "budgets_bytes") -> list:
    if not budgets:
        raise ConfigError(f"{key}=[] gives no budget; e.g. [24, 40, 80] (GiB) or bytes in maxfit.budgets_bytes")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0 \
                or not math.isfinite(budget):
            raise ConfigError(f"{key} entry {budget!r} is not a memory budget; budgets must be positive numbers")
    return list(budgets)


register_maxfit_configs()
