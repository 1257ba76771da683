"""Shared helpers: compose the real Hydra configs and turn them into RunConfigs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from membench.cli import to_run_config
from membench.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "membench" / "conf"
MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml"))
METHODS = sorted(path.stem for path in (CONF / "method").glob("*.yaml"))
TINY_MODELS = ["tiny-roberta", "tiny-t5", "tiny-llama"]
# Small but not trivial: every code path (dropout, attention, heads) runs in milliseconds.
TINY_WORKLOAD = ["workload.batch_size=2", "workload.seq_len=16"]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_config(*overrides: str) -> RunConfig:
    """A validated RunConfig from the real conf/ tree plus ``overrides``."""
    return to_run_config(compose_config(list(overrides)))


def tiny(model: str, method: str, *extra: str, backend: str = "cpu") -> RunConfig:
    return run_config(f"model={model}", f"method={method}", f"backend.name={backend}", *TINY_WORKLOAD, *extra)


@pytest.fixture(autouse=True)
def _results_in_tmp(tmp_path, monkeypatch):
    """Nothing a test runs may write into the repository's results/."""
    monkeypatch.chdir(tmp_path)
