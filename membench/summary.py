"""The one-line human summary printed after each run (GiB here only: display)."""

from __future__ import annotations

from typing import Optional

from membench.results import Result

UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def display_unit(nbytes: Optional[int]) -> tuple[str, int]:
    """The largest binary unit in which ``nbytes`` is at least 1 (GiB for big runs, MiB for tiny ones)."""
    for name, size in UNITS:
        if nbytes is not None and nbytes >= size:
            return name, size
    return UNITS[-1]


def amount(nbytes: Optional[int], size: int) -> str:
    return "—" if nbytes is None else f"{nbytes / size:.2f}"


def describe_config(config: dict) -> str:
    method = config["method"]
    workload = config["workload"]
    parts = [config["model"]["name"], method["name"]]
    if method["kind"] != "full":
        parts.append(f"r={method['rank']}")
    parts += [f"bs={workload['batch_size']}", f"seq={workload['seq_len']}", config["train"]["precision"]]
    optimizer = config["train"].get("optimizer", "adamw")
    if optimizer != "adamw":
        parts.append(optimizer)
    parallel = config.get("parallel") or {}
    if parallel.get("strategy", "none") != "none":
        parts.append(f"{parallel['strategy']}x{parallel['world_size']}")
    return " ".join(parts)


def per_gpu(config: dict) -> str:
    """`` per GPU`` for a run over several ranks (its figures are rank 0's), else empty."""
    return " per GPU" if (config.get("parallel") or {}).get("world_size", 1) > 1 else ""


def headline(result: Result) -> str:
    """The sweep's one line per job, e.g. ``llama-7b lora_fa r=64 bs=16 seq=512 bf16 → peak 48.55 GiB``."""
    peak = result.metrics.get("peak_allocated_bytes")
    unit, size = display_unit(peak)
    state = result.status.state
    if state == "error":
        message = (result.status.message or "").splitlines()[0] if result.status.message else ""
        return f"{describe_config(result.config)} → ERROR in {result.status.phase}: {message}"
    figure = f"peak {amount(peak, size)} {unit}{per_gpu(result.config)}"
    return f"{describe_config(result.config)} → {'OOM, ' if state == 'oom' else ''}{figure}"


def reserved_clause(metrics: dict, env: dict, finished: bool = True) -> str:
    """`` allocated, 53.10 GiB reserved (79.6 GiB card: fits, 26.0 GiB spare)``; empty without a reserved figure.

    Spare is the card's capacity less the CUDA context (``env.cuda_context_bytes``, outside reserved
    memory) less the reserved peak; negative spare is reported as short. A run that did not finish
    (``finished=False``: an OOM) gets no verdict: its reserved peak stops where the allocator failed.
    """
    reserved = metrics.get("peak_reserved_bytes")
    if reserved is None:
        return ""
    unit, size = display_unit(reserved)
    clause = f" allocated, {reserved / size:.2f} {unit} reserved"
    total = env.get("device_total_memory_bytes")
    if not total:
        return clause
    if not finished:
        return f"{clause} ({total / GIB:.1f} GiB card)"
    spare = total - (env.get("cuda_context_bytes") or 0) - reserved
    verdict = f"fits, {spare / GIB:.1f} GiB spare" if spare >= 0 else f"does not fit, {-spare / GIB:.1f} GiB short"
    return f"{clause} ({total / GIB:.1f} GiB card: {verdict})"


GIB = 1 << 30


def summarize(result: Result) -> str:
    """E.g. ``llama-7b lora_fa r=64 bs=16 seq=512 bf16 [simulate: NVIDIA H100 80GB HBM3] peak 48.5 GiB ...``."""
    m = result.metrics
    head = f"{describe_config(result.config)} [{result.env['backend']}: {result.env.get('device_name')}]"
    unit, size = display_unit(m["peak_allocated_bytes"])
    breakdown = (
        f"weights {amount(m['weight_bytes'], size)} + grads {amount(m['gradient_bytes'], size)} + "
        f"optimizer {amount(m['optimizer_state_bytes'], size)} + activations {amount(m['activation_bytes'], size)}"
    )
    timing = f"{m['step_time_s'] * 1000:.0f} ms/step" if m.get("step_time_s") else "no step time (simulated)"
    kept = sum((m.get("ctx_kept_bytes_by_function") or {}).values())
    kept_clause = f" + kept by autograd functions' ctx {amount(kept, size)}" if kept else ""
    paged = m.get("paged_optimizer_state_bytes")
    if paged is not None and result.config["train"].get("optimizer", "").startswith("paged_"):  # in no peak
        breakdown += f"; paged optimizer state {amount(paged, size)} in managed memory, outside the peak"
    if m.get("gathered_param_peak_bytes") is not None:
        breakdown += f"; gathered weights peak {amount(m['gathered_param_peak_bytes'], size)}"
    figures = (f"peak {amount(m['peak_allocated_bytes'], size)} {unit}{per_gpu(result.config)}"
               f"{reserved_clause(m, result.env, finished=result.status.state == 'ok')} ({breakdown}; "
               f"saved for backward {amount(m['saved_tensor_bytes'], size)}{kept_clause}), {timing}")
    status = result.status
    if status.state == "ok":
        return f"{head} → {figures}"
    where = f" in {status.phase}" if status.phase else ""
    first_line = (status.message or "").splitlines()[0] if status.message else ""
    if status.state == "oom":
        return f"{head} → OOM{where}: {first_line}; {figures}"
    return f"{head} → ERROR{where}: {first_line}"
