"""The kit's probes beyond the cuda-vs-simulate checks (registered with :func:`~membench.gpucheck.checks.probe`).

``snapshot-replay``: the snapshot check's real allocator snapshot (``snapshots/`` of this kit run)
replayed through the caching-allocator model, and its allocation sizes diffed against the same
configuration's simulated snapshot (:mod:`membench.gpucheck.snapshot_diff` does the comparing).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Optional

from membench.gpucheck.checks import CHECKS, Check, ProbeContext, probe

SNAPSHOT_REPLAY_S = 25  # one small simulate run (imports ~10 s, the fake step) plus loading and replaying
CUDA_SNAPSHOT = ("backend.name=cuda", "backend.memory_snapshot=true")  # what plan_jobs runs the snapshot check with


def snapshot_check(checks: Optional[list[Check]] = None) -> Check:
    """The check whose cuda run also records an allocator snapshot."""
    return next(check for check in (CHECKS if checks is None else checks) if check.snapshot)


def simulate_snapshot_backend(device: str, fake_device: str) -> list[str]:
    return ["backend.name=simulate", f"backend.device={device}", f"backend.fake_device={fake_device}",
            "backend.memory_snapshot=true"]


def _snapshot_file(result_file: Path, directory: Path) -> Optional[Path]:
    """The pickle a result names in ``env.memory_snapshot``, else the one beside it with the same stem."""
    if result_file.is_file():
        named = json.loads(result_file.read_text())["env"].get("memory_snapshot")
        if named and Path(named).is_file():
            return Path(named)
    beside = directory / f"{result_file.stem}.snapshot.pickle"
    return beside if beside.is_file() else None


def _load(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle)  # noqa: S301 - a file this kit run wrote itself


@probe("snapshot-replay", "the real snapshot's trace through the allocator model; alloc sizes the simulation misses",
       estimated_s=SNAPSHOT_REPLAY_S)
def snapshot_replay(context: ProbeContext) -> dict[str, Any]:
    import torch

    from membench.gpucheck.run import result_path, simulated_device
    from membench.gpucheck.snapshot_diff import compare_snapshots

    check = snapshot_check()
    directory = context.out / "snapshots"
    real_result = result_path(check, directory, list(CUDA_SNAPSHOT))
    real_file = _snapshot_file(real_result, directory)
    if real_file is None:
        return {"state": f"skipped: no snapshot of check {check.name} under {directory} (its run did not finish)"}
    real_env = json.loads(real_result.read_text())["env"] if real_result.is_file() else {}
    alloc_conf = real_env.get("alloc_conf")
    if alloc_conf is None:
        from membench.gpucheck.checks import run_configs

        alloc_conf = run_configs(check, *CUDA_SNAPSHOT).backend.alloc_conf
    device, note = simulated_device(real_env.get("device_name") or torch.cuda.get_device_name())
    backend = simulate_snapshot_backend(device, "cuda" if torch.cuda.is_available() else "cpu")
    simulated_dir = directory / "simulate"
    status, output = context.run([context.python, "-m", "membench.cli", *check.overrides, *backend,
                                  f"results_dir={simulated_dir}", "force=true"], context.remaining_s)
    (context.out / "logs").mkdir(parents=True, exist_ok=True)
    (context.out / "logs" / f"{check.name}--snapshot-simulate.log").write_text(output)
    simulated_file = _snapshot_file(result_path(check, simulated_dir, backend), simulated_dir)
    report = compare_snapshots(_load(real_file), _load(simulated_file) if simulated_file else None, alloc_conf)
    report.update({"check": check.name, "real_snapshot": str(real_file),
                   "simulated_snapshot": str(simulated_file) if simulated_file else None,
                   "simulated_as": device, "simulated_as_note": note, "simulate_exit_status": status})
    if simulated_file is None:
        report["message"] = f"the simulate snapshot run wrote no snapshot (exit {status}); replay only"
    return report
