"""Result files → one pandas DataFrame, one row per run, bytes as integers.

Files that are not readable membench results (corrupt JSON, another tool's JSON,
a newer schema) are skipped and named, never fatal: a sweep's other results
still make a report.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from membench.results import Result, ResultFileError, read_result

BYTE_COLUMNS = ("peak_allocated_bytes", "peak_reserved_bytes", "fragmentation_bytes", "weight_bytes", "gradient_bytes",
                "optimizer_state_bytes", "paged_optimizer_state_bytes", "activation_bytes", "saved_tensor_bytes", "runtime_overhead_bytes",
                "device_total_memory_bytes")
#: Columns that identify a workload apart from the method; runs equal on these are compared.
SETTING = ("model", "precision", "batch_size", "seq_len", "target_len", "attn_implementation",
           "optimizer", "optimizer_impl", "backend", "device_name", "strategy", "world_size")
#: What distinguishes adapter configurations (None for full fine-tuning).
ADAPTER = ("rank", "alpha", "adapter_dtype", "lora_dropout", "target_modules")


@dataclass
class Skipped:
    path: Path
    reason: str


def result_files(paths: Iterable[str | Path]) -> list[Path]:
    """The ``*.json`` files under each path (a ``runs/`` folder is preferred when present)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
            continue
        root = path / "runs" if (path / "runs").is_dir() else path
        files += sorted(p for p in root.rglob("*.json") if not p.name.startswith("."))
    return files


def row(result: Result, path: Path) -> dict:
    """Flatten one result: config knobs, status, metrics and provenance."""
    config, metrics, env = result.config, result.metrics, result.env
    model, method, workload, train = config["model"], config["method"], config["workload"], config["train"]
    targets = env.get("target_modules") or method.get("target_modules")
    return {
        "run_id": result.run_id,
        "model": model["name"], "model_type": model.get("model_type"), "task": model["task"],
        "attn_implementation": model.get("attn_implementation", "sdpa"),
        "method": method["name"], "kind": method["kind"], "recompute": bool(method["gradient_checkpointing"]),
        "quantization": model.get("quantization", "none"), "dora": bool(method.get("dora", False)),
        "strategy": (config.get("parallel") or {}).get("strategy", "none"),
        "world_size": (config.get("parallel") or {}).get("world_size", 1),
        "rank": method.get("rank"), "alpha": method.get("alpha"),
        "adapter_dtype": method.get("adapter_dtype") if method["kind"] != "full" else None,
        "lora_dropout": method.get("lora_dropout") if method["kind"] != "full" else None,
        "target_modules": ",".join(targets) if targets and method["kind"] != "full" else None,
        "batch_size": workload["batch_size"], "seq_len": workload["seq_len"], "target_len": workload.get("target_len"),
        "precision": train["precision"], "optimizer": train.get("optimizer", "adamw"),
        "optimizer_impl": train.get("optimizer_impl"),
        "backend": env.get("backend"), "device_name": env.get("device_name"),
        "device_total_memory_bytes": env.get("device_total_memory_bytes"),
        "status": result.status.state, "phase": result.status.phase,
        "message": (result.status.message or "").splitlines()[0] if result.status.message else None,
        **{key: metrics.get(key) for key in BYTE_COLUMNS if key in metrics},
        "step_time_s": metrics.get("step_time_s"), "tokens_per_s": metrics.get("tokens_per_s"),
        "trainable_params": metrics.get("trainable_params"), "total_params": metrics.get("total_params"),
        "torch": env.get("torch"), "transformers": env.get("transformers"), "peft": env.get("peft"),
        "git_sha": env.get("git_sha"), "git_dirty": env.get("git_dirty"), "created_at": env.get("created_at"),
        "wall_time_s": env.get("wall_time_s"), "path": str(path),
    }


def load_results(*paths: str | Path, warn: bool = True) -> tuple[pd.DataFrame, list[Skipped]]:
    """Every readable result under ``paths`` as a DataFrame, plus the files that were skipped.

    Args:
        paths: Result files or folders (searched recursively; ``<folder>/runs`` first).
        warn: Also emit a warning naming each skipped file.
    """
    rows, skipped = [], []
    for path in result_files(paths):
        try:
            rows.append(row(read_result(path), path))
        except ResultFileError as error:
            skipped.append(Skipped(path, str(error)))
            if warn:
                warnings.warn(f"skipped {error}", stacklevel=2)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, skipped
    for column in BYTE_COLUMNS:
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    for column in ("rank", "alpha", "target_len", "batch_size", "seq_len"):
        frame[column] = frame[column].astype("Int64")
    # Several files for one run id (re-measured with force=true): the newest wins.
    frame = frame.sort_values("created_at").drop_duplicates("run_id", keep="last")
    return frame.sort_values(["model", "method", "batch_size", "seq_len", "rank"]).reset_index(drop=True), skipped
