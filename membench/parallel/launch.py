"""One process per rank, for real: the ``cpu`` backend's proof of the simulated per-rank figures.

:func:`measure_ranks` starts ``parallel.world_size`` processes (``torch.multiprocessing``, fork),
joins them in a gloo process group through a file in a temporary folder (no port to find), and
has each measure the run with the ``cpu`` backend: real tensors, real collectives, the same
allocator model. Each rank returns its Result; :func:`combine` makes rank 0's the run's result
and records every rank's figures in ``env.ranks``, with the headline peak the maximum over ranks.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from membench.config import RunConfig
from membench.results import Result, Status

#: Per-rank figures recorded in ``env.ranks``.
RANK_FIGURES = ("peak_allocated_bytes", "runtime_overhead_bytes", "weight_bytes", "sharded_weight_bytes", "gradient_bytes",
                "optimizer_state_bytes", "activation_bytes", "gathered_param_peak_bytes")


def _rank_main(rank: int, run: RunConfig, init_file: str, out_dir: str) -> None:
    import json

    import torch
    import torch.distributed as dist

    from membench.backends import create_backend
    from membench.plan import plan

    torch.set_num_threads(1)  # ranks share the machine's cores; and no OpenMP pool inherited across fork
    backend = create_backend(run.backend)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=run.parallel.world_size)
    try:
        result = execute_rank(plan(run), backend)
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result.to_dict()))


def execute_rank(the_plan, backend) -> Result:
    """One rank of a real multi-process run, measured in a process group that already exists.

    On a tracked backend (cpu), gloo's own buffers are reported, not counted: gloo's reduce-scatter
    (and all-reduce) works on a full-size copy of its input made on gloo's thread, outside the
    tracker's sight, first seen as a split view in ``work.wait()``; NCCL reduces in place on the GPU.
    Their bytes go to ``env.gloo_buffer_bytes``.
    """
    from membench.runner import execute

    tracker = getattr(backend, "tracker", None)
    if tracker is not None:
        tracker.count_unseen_views = False
    result = execute(the_plan, backend)
    if tracker is not None:
        result.env["gloo_buffer_bytes"] = tracker.unseen_view_bytes
    return result


def measure_ranks(run: RunConfig) -> list[Result]:
    """Every rank's Result of ``run`` on the ``cpu`` backend, rank 0 first."""
    import json

    import torch.multiprocessing as mp

    world_size = run.parallel.world_size
    with tempfile.TemporaryDirectory(prefix="membench-ranks-") as folder:
        init_file = str(Path(folder, "rendezvous"))
        # fork: the ranks start from this process's imports in milliseconds (spawn re-imports torch,
        # transformers and PEFT in each, seconds per rank on a small machine).
        mp.start_processes(_rank_main, args=(run, init_file, folder), nprocs=world_size, join=True,
                           start_method="fork")
        return [Result.from_dict(json.loads(Path(folder, f"rank{rank}.json").read_text()))
                for rank in range(world_size)]


def combine(results: list[Result]) -> Result:
    """Rank 0's result, with ``env.ranks`` holding each rank's figures and the peak the maximum over ranks.

    A rank that failed makes the run fail with that rank's status.
    """
    head = results[0]
    ranks = [{"rank": rank, "state": result.status.state, "gloo_buffer_bytes": result.env.get("gloo_buffer_bytes"),
              **{key: result.metrics.get(key) for key in RANK_FIGURES}} for rank, result in enumerate(results)]
    failed = next((result.status for result in results if result.status.state != "ok"), None)
    metrics = dict(head.metrics)
    peaks = [result.metrics.get("peak_allocated_bytes") for result in results]
    if all(peak is not None for peak in peaks):
        metrics["peak_allocated_bytes"] = max(peaks)
    status = dataclasses.replace(failed) if failed is not None else head.status
    return Result(head.run_id, head.config, Status(status.state, status.phase, status.message), metrics,
                  {**head.env, "ranks": ranks})
