"""The one-line human summary printed after each run (GiB here only: display)."""

from __future__ import annotations

from typing import Optional

from membench.results import Result

GiB = 1 << 30


def gib(nbytes: Optional[int]) -> str:
    return "—" if nbytes is None else f"{nbytes / GiB:.2f}"


def describe_config(config: dict) -> str:
    method = config["method"]
    workload = config["workload"]
    parts = [config["model"]["name"], method["name"]]
    if method["kind"] != "full":
        parts.append(f"r={method['rank']}")
    parts += [f"bs={workload['batch_size']}", f"seq={workload['seq_len']}", config["train"]["precision"]]
    return " ".join(parts)


def summarize(result: Result) -> str:
    """E.g. ``llama-7b lora_fa r=64 bs=16 seq=512 bf16 [simulate: NVIDIA H100 80GB HBM3] peak 48.5 GiB ...``."""
    m = result.metrics
    head = f"{describe_config(result.config)} [{result.env['backend']}: {result.env.get('device_name')}]"
    breakdown = (
        f"weights {gib(m['weight_bytes'])} + grads {gib(m['gradient_bytes'])} + "
        f"optimizer {gib(m['optimizer_state_bytes'])} + activations {gib(m['activation_bytes'])}"
    )
    timing = f"{m['step_time_s'] * 1000:.0f} ms/step" if m.get("step_time_s") else "no step time (simulated)"
    figures = f"peak {gib(m['peak_allocated_bytes'])} GiB ({breakdown}; saved for backward {gib(m['saved_tensor_bytes'])}), {timing}"
    status = result.status
    if status.state == "ok":
        return f"{head} → {figures}"
    where = f" in {status.phase}" if status.phase else ""
    first_line = (status.message or "").splitlines()[0] if status.message else ""
    if status.state == "oom":
        return f"{head} → OOM{where}: {first_line}; {figures}"
    return f"{head} → ERROR{where}: {first_line}"
