"""One JSON file per run: config, status, metrics (integer bytes) and provenance.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "run_id": "roberta-large--lora_fa--r8--bs32-seq128--fp32--simulate-h100-80gb--1a2b3c4d",
      "config":  {...the resolved RunConfig (membench.identity.recorded_config)...},
      "status":  {"state": "ok" | "oom" | "error", "phase": null | "build" | "forward" | ..., "message": null | str},
      "metrics": {...membench.step.Metrics...},
      "env":     {"backend", "device_name", "device_total_memory_bytes", "torch", "transformers",
                  "peft", "python", "membench_version", "git_sha", "git_dirty", "created_at",
                  "wall_time_s", ...}
    }
"""

from __future__ import annotations

import dataclasses
import json
import platform
import re
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from membench.files import write_atomic

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
    """Write ``result`` to ``directory/<run_id>.json`` atomically (see :func:`membench.files.write_atomic`).

    A run killed mid-write leaves the previous file or none, never half a file; the file is
    readable as any file ``open()`` creates (0644 under umask 022).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result.to_dict(), indent=2, sort_keys=False) + "\n"
    return write_atomic(directory / f"{result.run_id}.json", text)


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


#: The folder of the membench package that is running (``membench/``).
PACKAGE_DIR = Path(__file__).resolve().parent
DISTRIBUTION = "membench"
#: ``name = "membench"`` inside pyproject.toml's ``[project]`` table (a regex: tomllib is 3.11+).
PROJECT_NAME = re.compile(r"^\[project\]\s*$(?:\n(?!\[).*)*?\n\s*name\s*=\s*[\"']membench[\"']", re.MULTILINE)


def _git(*args: str, cwd: Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_checkout(package_dir: Path = PACKAGE_DIR) -> Optional[Path]:
    """The top of the git checkout that holds the running membench source, if it runs from one.

    A venv living inside some other repository also has a git top level above the
    installed package; that one is not membench's, so the top level counts only when it
    holds membench's ``pyproject.toml`` and its ``membench/`` folder is ``package_dir``.
    """
    top = _git("rev-parse", "--show-toplevel", cwd=package_dir)
    if top is None:
        return None
    top_dir = Path(top).resolve()
    try:
        pyproject = (top_dir / "pyproject.toml").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not PROJECT_NAME.search(pyproject) or (top_dir / "membench").resolve() != package_dir:
        return None
    return top_dir


def installed_source(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """Version and commit of the installed ``membench`` distribution, when it is the running package.

    Returns:
        ``membench_version`` (None when no distribution or another copy's), ``git_sha`` (the
        commit ``pip install git+...`` recorded in ``direct_url.json``, else None) and
        ``git_dirty`` (False for such a commit: pip installed it as committed; else None).
    """
    unknown = {"membench_version": None, "git_sha": None, "git_dirty": None}
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return unknown
    # Metadata found on sys.path may belong to another membench than the one running.
    if Path(str(dist.locate_file("membench"))).resolve() != package_dir:
        return unknown
    commit = None
    try:
        direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
        commit = direct_url.get("vcs_info", {}).get("commit_id")
    except (ValueError, AttributeError):
        pass  # a malformed direct_url.json: version only
    return {"membench_version": dist.version, "git_sha": commit, "git_dirty": False if commit else None}


#: What ``git_dirty`` looks at: the code and its configs (relative to the checkout's top).
SOURCE_PATHS = ("membench", "hydra_plugins", "pyproject.toml")


def source_provenance(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """Which membench source produced a result: version, commit and whether it had local changes.

    From git when membench runs from its own checkout, else from the installed
    distribution's metadata (see :func:`installed_source`).
    """
    installed = installed_source(package_dir)
    top = source_checkout(package_dir)
    if top is None:
        return installed
    # Local changes to the code only: results/ and other data in the checkout are what membench writes,
    # so regenerating committed results must not mark the later ones as made by a modified membench.
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *SOURCE_PATHS, cwd=top)
    version = installed["membench_version"]
    if version is None:  # an editable install's metadata lives elsewhere: still this checkout's version
        try:
            version = metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            version = None
    return {"membench_version": version, "git_sha": _git("rev-parse", "HEAD", cwd=top),
            "git_dirty": None if dirty is None else bool(dirty)}


def write_rows(path: str | Path, rows: list[dict], backend: str) -> Path:
    """``{"rows": rows, "env": {backend, provenance}}`` as JSON at ``path`` (its folder made if missing):
    a table of figures that says what produced it (calibrations, benchmarks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"rows": rows, "env": {"backend": backend, **provenance()}}
    return write_atomic(path, json.dumps(document, indent=2) + "\n")


def _installed_version(distribution: str) -> Optional[str]:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance() -> dict[str, Any]:
    """Package versions and the membench source (version, git state) that produced a result."""
    import peft
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        # QLoRA bases and 8-bit optimizers run bitsandbytes' own code; None where it is not installed
        "bitsandbytes": _installed_version("bitsandbytes"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **source_provenance(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
