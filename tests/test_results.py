"""Result files: schema, round trip, atomic writes, corrupt files reported by name."""

from __future__ import annotations

import json

import pytest

from conftest import tiny
from membench.results import SCHEMA_VERSION, ResultFileError, read_result, write_result
from membench.identity import result_id
from membench.runner import measure


@pytest.fixture(scope="module")
def result():
    return measure(tiny("tiny-llama", "lora_fa", backend="simulate"))


def test_round_trip(result, tmp_path):
    path = write_result(result, tmp_path)
    assert path.name == f"{result.run_id}.json"
    assert read_result(path) == result
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_sections_and_provenance(result, tmp_path):
    data = json.loads(write_result(result, tmp_path).read_text())
    assert data["schema_version"] == SCHEMA_VERSION
    assert set(data) == {"schema_version", "run_id", "config", "status", "metrics", "env"}
    assert data["status"] == {"state": "ok", "phase": None, "message": None}
    for key in ("backend", "device_name", "torch", "transformers", "peft", "git_sha", "git_dirty", "created_at"):
        assert key in data["env"]
    assert data["config"]["backend"]["name"] == "simulate"  # resolved, never "auto"
    assert data["config"]["method"]["target_modules"] is None  # as asked: the family default...
    assert data["env"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]  # ...and what that resolved to
    assert data["env"]["adapted_layers"] == 2 * 7  # tiny-llama: 2 blocks x 7 linears


def test_bytes_are_integers(result):
    byte_keys = [k for k in result.metrics if k.endswith("_bytes") and not isinstance(result.metrics[k], dict)]
    assert byte_keys
    assert result.metrics["peak_reserved_bytes"] is None  # only the real CUDA allocator reserves
    for key in set(byte_keys) - {"peak_reserved_bytes"}:
        assert isinstance(result.metrics[key], int), key
    for phase, value in result.metrics["phase_peak_bytes"].items():
        assert isinstance(value, int), phase


def test_run_id_is_predictable_and_distinct(result):
    run = tiny("tiny-llama", "lora_fa", backend="simulate")
    assert result_id(run) == result.run_id
    assert result_id(tiny("tiny-llama", "lora_fa", "method.rank=4", backend="simulate")) != result.run_id
    assert result.run_id.startswith("tiny-llama--lora_fa--r8--bs2-seq16--fp32--simulate-h100-80gb--")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "unreadable result file"),
        ('{"hello": 1}', "not a membench result"),
        ('{"schema_version": 99}', "schema_version 99"),
        ('{"schema_version": 1, "run_id": "x"}', "missing or malformed section"),
    ],
)
def test_corrupt_files_are_reported_by_name(tmp_path, content, expected):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ResultFileError) as error:
        read_result(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_error_inside_the_model_becomes_a_result(monkeypatch):
    """A crash in the step is recorded with its phase; nothing is raised or lost."""
    import membench.step

    def broken_step(self, *args, **kwargs):
        self.progress.phase = "backward"
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(membench.step.MeasuredLoop, "step", broken_step)
    result = measure(tiny("tiny-llama", "lora", backend="cpu"))
    assert result.status.state == "error"
    assert result.status.phase == "backward"
    assert result.status.message.startswith("warm-up step 1/2: RuntimeError: kernel exploded")


@pytest.mark.parametrize(
    "error",
    [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"), MemoryError()],
    ids=["allocator", "bare-MemoryError"],
)
def test_cpu_out_of_memory_becomes_an_oom_result(monkeypatch, error):
    import membench.step

    def oom_step(self, *args, **kwargs):
        self.progress.phase = "forward"
        raise error

    monkeypatch.setattr(membench.step.MeasuredLoop, "step", oom_step)
    result = measure(tiny("tiny-llama", "lora", backend="cpu"))
    assert (result.status.state, result.status.phase) == ("oom", "forward")
    assert type(error).__name__ in result.status.message


def test_failure_while_building_is_a_result(monkeypatch):
    import membench.runner

    def broken_build(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(membench.runner, "build", broken_build)
    result = measure(tiny("tiny-llama", "lora", backend="cpu"))
    assert (result.status.state, result.status.phase) == ("error", "build")
