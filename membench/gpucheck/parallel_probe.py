"""``fsdp2-two-gpu``: FSDP2 on two GPUs under torchrun (NCCL), every rank's peak against simulate's.

Runs when the kit sees two GPUs: ``torchrun --nproc-per-node 2 -m membench backend.name=cuda`` writes one
result (rank 0's, every rank's figures in ``env.ranks``, :mod:`membench.parallel.torchrun`), and the same
configuration simulated (rank 0 of 2 on the fake process group) predicts each rank's peak.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from membench.gpucheck.checks import ProbeContext, four_layers, probe

FSDP2_TWO_GPU_S = 90  # two processes importing torch + a CUDA context each (~15 s), a 4-layer 8B shape, 3 steps
OVERRIDES = (*four_layers("llama-3.1-8b"), "method=lora_fa", "train.precision=bf16", "workload.batch_size=2",
             "workload.seq_len=1024", "parallel.strategy=fsdp2", "parallel.world_size=2", "force=true")


def commands(python: str, out: Path, device: str) -> dict[str, list[str]]:
    """The two runs: ``cuda`` under torchrun, and ``simulate`` for ``device`` (a ``backend.device`` key)."""
    return {"cuda": [python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "membench", *OVERRIDES,
                     "backend.name=cuda", f"results_dir={out / 'cuda'}"],
            "simulate": [python, "-m", "membench", *OVERRIDES, "backend.name=simulate", f"backend.device={device}",
                         f"results_dir={out / 'simulate'}"]}


def _result(folder: Path) -> Optional[dict]:
    files = sorted(folder.glob("*.json"))
    return json.loads(files[-1].read_text()) if files else None


@probe("fsdp2-two-gpu", "FSDP2 on 2 GPUs (torchrun, NCCL): each rank's measured peak against simulate's",
       estimated_s=FSDP2_TWO_GPU_S, gpus=2)
def fsdp2_two_gpu(context: ProbeContext) -> dict[str, Any]:
    import torch

    from membench.gpucheck.run import simulated_device

    device, note = simulated_device(torch.cuda.get_device_name())
    out = context.out / "fsdp2-two-gpu"
    report: dict[str, Any] = {"simulated_as": device, "simulated_as_note": note}
    (context.out / "logs").mkdir(parents=True, exist_ok=True)
    for name, argv in commands(context.python, out, device).items():
        status, output = context.run(argv, context.remaining_s)
        (context.out / "logs" / f"fsdp2-two-gpu--{name}.log").write_text(output)
        report[f"{name}_exit_status"] = status
    real, simulated = _result(out / "cuda"), _result(out / "simulate")
    if real is None or simulated is None:
        report["state"] = "incomplete: a run wrote no result (see logs/fsdp2-two-gpu--*.log)"
        return report
    predicted = simulated["metrics"]["peak_allocated_bytes"]
    ranks = real["env"].get("ranks", [])
    report.update({"state": "ok", "simulated_peak_bytes": predicted,
                   "measured_peak_bytes": [entry["peak_allocated_bytes"] for entry in ranks],
                   "relative_error": [(entry["peak_allocated_bytes"] - predicted) / entry["peak_allocated_bytes"]
                                      for entry in ranks if entry.get("peak_allocated_bytes")]})
    return report
