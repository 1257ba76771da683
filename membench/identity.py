"""A run's identity: the config as recorded in its result, and the run id (file stem) derived from it."""

from __future__ import annotations

import dataclasses

from membench.backends import resolve_name
from membench.config import RunConfig
from membench.results import run_id


def recorded_config(run: RunConfig, backend_name: str) -> dict:
    """The config as stored in the result: resolved backend, no output-only fields."""
    config = dataclasses.asdict(run)
    config.pop("results_dir")
    config.pop("force")
    backend = config["backend"]
    backend["name"] = backend_name
    # Keep only the knobs that affect this backend, so they alone decide the run id.
    irrelevant = {"cuda": ("device", "fake_device", "cuda_semantics"), "cpu": ("device", "fake_device")}
    for key in irrelevant.get(backend_name, ()):
        backend.pop(key)
    if not backend.get("memory_snapshot"):
        backend.pop("memory_snapshot", None)  # recorded only when on, so other runs keep their ids
    return config


def backend_label(run: RunConfig, backend_name: str) -> str:
    return f"simulate-{run.backend.device}" if backend_name == "simulate" else backend_name


def result_id(run: RunConfig) -> str:
    """The run id (file stem) this config's result will have."""
    name = resolve_name(run.backend)
    return run_id(recorded_config(run, name), backend_label(run, name))
