"""One JSON file per run: config, status, metrics (integer bytes) and provenance.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "run_id": "roberta-large--lora_fa--r8--bs32-seq128--fp32--simulate-h100-80gb--1a2b3c4d",
      "config":  {...the full resolved RunConfig...},
      "status":  {"state": "ok" | "oom" | "error", "phase": null | "build" | "forward" | ..., "message": null | str},
      "metrics": {...membench.step.Metrics...},
      "env":     {"backend", "device_name", "device_total_memory_bytes", "torch", "transformers",
                  "peft", "python", "git_sha", "git_dirty", "created_at", "wall_time_s", ...}
    }
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

SCHEMA_VERSION = 1
STATES = ("ok", "oom", "error")


class ResultFileError(ValueError):
    """A file that is not a readable membench result (corrupt, foreign or from a newer schema)."""


@dataclass
class Status:
    state: str = "ok"
    phase: Optional[str] = None
    message: Optional[str] = None


@dataclass
class Result:
    run_id: str
    config: dict[str, Any]
    status: Status
    metrics: dict[str, Any]
    env: dict[str, Any]
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, **{k: v for k, v in dataclasses.asdict(self).items()
                                                         if k != "schema_version"}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        if not isinstance(data, dict) or "schema_version" not in data:
            raise ResultFileError("not a membench result (no schema_version)")
        if data["schema_version"] != SCHEMA_VERSION:
            raise ResultFileError(f"schema_version {data['schema_version']!r}; this membench reads {SCHEMA_VERSION}")
        try:
            status = Status(**data["status"])
            if status.state not in STATES:
                raise ResultFileError(f"status.state={status.state!r}; expected one of {', '.join(STATES)}")
            return cls(run_id=data["run_id"], config=data["config"], status=status,
                       metrics=data["metrics"], env=data["env"])
        except (KeyError, TypeError) as exc:
            raise ResultFileError(f"missing or malformed section: {exc}") from exc


def write_result(result: Result, directory: str | Path) -> Path:
    """Write ``result`` to ``directory/<run_id>.json`` atomically (temp file + rename).

    A run killed mid-write leaves the previous file or none, never half a file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.run_id}.json"
    with tempfile.NamedTemporaryFile("w", dir=directory, prefix=".tmp-", suffix=".json", delete=False) as handle:
        json.dump(result.to_dict(), handle, indent=2, sort_keys=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)
    return path


def read_result(path: str | Path) -> Result:
    """Load one result file.

    Raises:
        ResultFileError: naming the file, when it is not valid JSON or not a membench result.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultFileError(f"{path}: unreadable result file: {exc}") from exc
    try:
        return Result.from_dict(data)
    except ResultFileError as exc:
        raise ResultFileError(f"{path}: {exc}") from exc


def config_digest(config: dict[str, Any]) -> str:
    """Short stable hash of a resolved config: equal configs give equal run ids."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def run_id(config: dict[str, Any], backend_label: str) -> str:
    """Readable, unique file stem: model--method--shape--precision--backend--hash."""
    method = config["method"]
    workload = config["workload"]
    label = method["name"]
    if method["kind"] != "full":
        label += f"--r{method['rank']}"
    shape = f"bs{workload['batch_size']}-seq{workload['seq_len']}"
    if workload.get("target_len"):
        shape += f"-tgt{workload['target_len']}"
    parts = [config["model"]["name"], label, shape, config["train"]["precision"], backend_label, config_digest(config)]
    return "--".join(parts)


def _git(*args: str) -> Optional[str]:
    source = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict[str, Any]:
    """Package versions and the git state of the membench source that produced a result."""
    import peft
    import torch
    import transformers

    sha = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_sha": sha,
        "git_dirty": None if dirty is None else bool(dirty),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
