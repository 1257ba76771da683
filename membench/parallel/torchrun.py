"""``torchrun --nproc-per-node N -m membench ...``: every rank measures itself, rank 0 writes the result.

torchrun starts one process per rank and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and the
rendezvous address) in each. Each membench process then joins the process group (NCCL on
``backend.name=cuda``, gloo on ``cpu``), pins its GPU (``LOCAL_RANK``), measures its own rank, and
sends its Result to global rank 0 (``gather_object``).

Where results go (also on several nodes): **only global rank 0 writes**, one result file, into its
own ``results_dir`` on its own node: rank 0's figures with every rank's in ``env.ranks`` and the
headline peak the maximum over ranks (:func:`membench.parallel.launch.combine`). Other ranks write
nothing and print nothing but errors, so N processes never race for one file and a shared
filesystem is not needed; give rank 0's node a ``results_dir`` you can read.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping, Optional

from membench.config import RunConfig
from membench.errors import ConfigError
from membench.results import Result

#: What torchrun sets in every process it starts.
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    return all(name in environ for name in TORCHRUN_VARIABLES)


def rank_of(environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank (0 when not launched by torchrun)."""
    return int(environ["RANK"]) if launched_by_torchrun(environ) else 0


def writes_results(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process writes (and prints) the run's result: global rank 0 only."""
    return rank_of(environ) == 0


def check_launch(run: RunConfig, backend_name: str, environ: Mapping[str, str] = os.environ) -> None:
    """Raise ConfigError when torchrun's world does not match ``run`` (before anything is built)."""
    world = int(environ["WORLD_SIZE"])
    if not run.parallel.enabled:
        raise ConfigError(f"torchrun started {world} processes but parallel.strategy=none; set parallel.strategy="
                          f"fsdp2 or ddp and parallel.world_size={world}")
    if run.parallel.world_size != world:
        raise ConfigError(f"parallel.world_size={run.parallel.world_size} but torchrun started {world} processes "
                          "(WORLD_SIZE); make them equal")
    if backend_name == "simulate":
        raise ConfigError("backend.name=simulate plays every rank in one process; run it without torchrun")


@contextlib.contextmanager
def torchrun_group(backend_name: str, environ: Mapping[str, str] = os.environ) -> Iterator[None]:
    """Join torchrun's process group for the run (NCCL on cuda, pinned to ``LOCAL_RANK``; gloo on cpu)."""
    import torch
    import torch.distributed as dist

    if backend_name == "cuda":
        torch.cuda.set_device(int(environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if backend_name == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def gather_results(result: Result) -> Optional[list[Result]]:
    """Every rank's Result on global rank 0 (rank order), None on the others."""
    import torch.distributed as dist

    gathered: Optional[list] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(result.to_dict(), gathered, dst=0)
    if gathered is None:
        return None
    return [Result.from_dict(data) for data in gathered]


def measure_under_torchrun(run: RunConfig, environ: Mapping[str, str] = os.environ) -> Optional[Result]:
    """This rank's measurement; on global rank 0 the combined Result of every rank, elsewhere None."""
    from membench.backends import create_backend, resolve_name
    from membench.parallel.launch import combine, execute_rank
    from membench.plan import plan

    backend_name = resolve_name(run.backend)
    check_launch(run, backend_name, environ)
    the_plan = plan(run)
    with torchrun_group(backend_name, environ):
        results = gather_results(execute_rank(the_plan, create_backend(run.backend)))
    return combine(results) if results is not None else None
