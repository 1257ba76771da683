"""Result files: schema, round trip, atomic writes and their mode, run identity, provenance, corrupt files."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

import membench.files
import membench.results
from conftest import ROOT, tiny
from membench.config import MethodConfig, RunConfig
from membench.errors import ConfigError
from membench.files import check_writable_dir, write_atomic
from membench.identity import recorded_config, recorded_run_id, result_id
from membench.results import SCHEMA_VERSION, ResultFileError, read_result, write_result
from membench.runner import measure

#: Every result committed to the repository: their names must survive any change to the identity rules.
COMMITTED = sorted(ROOT.glob("results/*/runs/*.json"))


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
    for key in ("backend", "device_name", "torch", "transformers", "peft", "membench_version", "git_sha", "git_dirty",
                "created_at"):
        assert key in data["env"]
    import importlib.metadata

    assert data["env"]["bitsandbytes"] == importlib.metadata.version("bitsandbytes")
    assert data["config"]["backend"]["name"] == "simulate"  # resolved, never "auto"
    assert data["config"]["method"]["target_modules"] is None  # as asked: the family default...
    assert data["env"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]  # ...and what that resolved to
    assert data["env"]["adapted_layers"] == 2 * 7  # tiny-llama: 2 blocks x 7 linears


def test_bytes_are_integers(result):
    byte_keys = [k for k in result.metrics if k.endswith("_bytes") and not isinstance(result.metrics[k], dict)]
    assert byte_keys
    # The caching-allocator model's reserved peak (membench.reserved): segments hold at least what is allocated.
    assert result.metrics["peak_reserved_bytes"] >= result.metrics["peak_allocated_bytes"]
    for key in byte_keys:
        if key == "gathered_param_peak_bytes":  # FSDP2 only (tests/test_parallel.py)
            assert result.metrics[key] is None
            continue
        assert isinstance(result.metrics[key], int), key
    for phase, value in result.metrics["phase_peak_bytes"].items():
        assert isinstance(value, int), phase


def test_run_id_is_predictable_and_distinct(result):
    run = tiny("tiny-llama", "lora_fa", backend="simulate")
    assert result_id(run) == result.run_id
    assert result_id(tiny("tiny-llama", "lora_fa", "method.rank=4", backend="simulate")) != result.run_id
    assert result.run_id.startswith("tiny-llama--lora_fa--r8--bs2-seq16--fp32--simulate-h100-80gb--")


def test_run_id_is_recomputed_from_a_result_files_config(result):
    assert recorded_run_id(result.config) == result.run_id == result_id(tiny("tiny-llama", "lora_fa",
                                                                             backend="simulate"))


def test_every_committed_result_keeps_its_name():
    """Identity rules may grow, never rename: each committed file's config still hashes to its name."""
    assert len(COMMITTED) > 100  # results/paper and results/validate were found
    renamed = []
    for path in COMMITTED:
        data = json.loads(path.read_text())
        if not recorded_run_id(data["config"]) == data["run_id"] == path.stem:
            renamed.append(path.relative_to(ROOT).as_posix())
    assert renamed == []


# A field added later, with a default: (the schema holding it, the same schema with a non-default value).
def _with_new_method_field(run: RunConfig, value: bool) -> RunConfig:
    extended = dataclasses.make_dataclass("ExtendedMethod", [("fused_adapters", bool, False)],
                                          bases=(MethodConfig,))
    return dataclasses.replace(run, method=extended(**dataclasses.asdict(run.method), fused_adapters=value))


def _with_new_section(run: RunConfig, value: bool) -> RunConfig:
    data = dataclasses.make_dataclass("DataConfig", [("packed", bool, False), ("source", str, "random")])
    extended = dataclasses.make_dataclass("ExtendedRun", [("data", data, dataclasses.field(default_factory=data))],
                                          bases=(RunConfig,))
    fields = {field.name: getattr(run, field.name) for field in dataclasses.fields(RunConfig)}
    return extended(**fields, data=data(packed=value))


@pytest.mark.parametrize(("extend", "section", "key"), [(_with_new_method_field, "method", "fused_adapters"),
                                                      (_with_new_section, "data", "packed")],
                         ids=["method-field", "new-section"])
def test_a_new_field_with_its_default_renames_nothing(extend, section, key):
    run = tiny("tiny-llama", "lora_fa", backend="simulate")
    at_default, changed = extend(run, False), extend(run, True)
    assert result_id(at_default) == result_id(run)
    assert result_id(changed) != result_id(run)  # a run that sets it is a different run
    assert recorded_config(at_default, "simulate")[section][key] is False  # still recorded, default or not


def test_backend_trace_is_never_recorded_nor_hashed():
    """backend.trace and backend.trace_symbols say how a result is computed (trace or direct: the same
    bytes), not what: same id, no key."""
    run = tiny("tiny-llama", "lora_fa", backend="simulate")
    off = tiny("tiny-llama", "lora_fa", "backend.trace=off", backend="simulate")
    fewer = tiny("tiny-llama", "lora_fa", "backend.trace_symbols=BR", backend="simulate")
    assert off.backend.trace == "off" and run.backend.trace == "auto"
    assert fewer.backend.trace_symbols == "BR" and run.backend.trace_symbols == "BSTR"
    assert result_id(off) == result_id(run) == result_id(fewer)
    for config in (run, off, fewer):
        assert not {"trace", "trace_symbols"} & set(recorded_config(config, "simulate")["backend"])
    with pytest.raises(ConfigError, match="backend.trace='sometimes' is not supported; choose one of: auto, off"):
        tiny("tiny-llama", "lora_fa", "backend.trace=sometimes", backend="simulate")
    for bad in ("BX", "BB", "''"):
        with pytest.raises(ConfigError, match=r"backend.trace_symbols='.*' is not supported; give each of B, S, T, R"):
            tiny("tiny-llama", "lora_fa", f"backend.trace_symbols={bad}", backend="simulate")


def test_result_file_has_the_mode_open_would_give(result, tmp_path):
    old = os.umask(0o022)
    try:
        path = write_result(result, tmp_path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o027)
        assert stat.S_IMODE(write_atomic(tmp_path / "other.json", "{}").stat().st_mode) == 0o640  # follows umask
    finally:
        os.umask(old)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_atomic_write_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "run.json"
    path.write_text("old")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(membench.files.os, failing, broken)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    assert path.read_text() == "old"


def test_writable_dir_check_leaves_no_trace(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "runs") == tmp_path / "a" / "runs"
    assert list(tmp_path.iterdir()) == []  # the folders it had to create, and the probe, are gone
    (tmp_path / "kept").mkdir()
    check_writable_dir(tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == [] and (tmp_path / "kept").is_dir()  # an existing folder stays


def test_unwritable_dir_is_a_config_error(tmp_path):
    (tmp_path / "afile").write_text("")  # a path through a regular file fails even for root
    with pytest.raises(ConfigError) as error:
        check_writable_dir(tmp_path / "afile" / "runs", key="maxfit.output")
    message = str(error.value)
    assert f"maxfit.output='{tmp_path / 'afile' / 'runs'}'" in message
    assert "Not a directory" in message and "a folder you may create and write to" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_dir_is_a_config_error(tmp_path):
    tmp_path.joinpath("ro").mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="results_dir=.*Permission denied"):
        check_writable_dir(tmp_path / "ro")


# -- provenance: membench's own source, from git in its checkout, else from the installed distribution --------
def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _repository(top: Path, project: str) -> Path:
    """A git repository at ``top`` whose pyproject names ``project``, holding a ``membench/`` folder."""
    (top / "membench").mkdir(parents=True)
    (top / "pyproject.toml").write_text(f'[build-system]\nrequires = []\n\n[project]\nname = "{project}"\n')
    _git("init", "--quiet", cwd=top)
    return top / "membench"


class FakeDistribution:
    """What ``importlib.metadata`` gives for an installed membench."""

    def __init__(self, site: Path, direct_url: dict | None, version: str = "9.8.7"):
        self.site, self.direct_url, self.version = site, direct_url, version

    def locate_file(self, name: str) -> Path:
        return self.site / name

    def read_text(self, name: str) -> str | None:
        return json.dumps(self.direct_url) if name == "direct_url.json" and self.direct_url is not None else None


def test_provenance_in_this_checkout_is_its_git_state():
    source = membench.results.source_provenance()
    assert source["git_sha"] == _git("rev-parse", "HEAD", cwd=ROOT)
    assert isinstance(source["git_dirty"], bool)
    assert source["membench_version"] is not None


def test_a_checkout_counts_only_when_it_is_membenchs_own(tmp_path):
    package = _repository(tmp_path / "membench-checkout", "membench")
    assert membench.results.source_checkout(package) == (tmp_path / "membench-checkout").resolve()
    # A venv inside another project's repository, or even inside a membench checkout, is not that checkout.
    other = _repository(tmp_path / "other-project", "other-project")
    assert membench.results.source_checkout(other) is None
    venv_package = tmp_path / "membench-checkout" / ".venv" / "site-packages" / "membench"
    venv_package.mkdir(parents=True)
    assert membench.results.source_checkout(venv_package) is None


@pytest.mark.parametrize(("direct_url", "expected"), [
    ({"url": "https://example.org/membench.git", "vcs_info": {"vcs": "git", "commit_id": "c0ffee" * 6 + "c0ff"}},
     {"membench_version": "9.8.7", "git_sha": "c0ffee" * 6 + "c0ff", "git_dirty": False}),
    (None, {"membench_version": "9.8.7", "git_sha": None, "git_dirty": None}),  # from a wheel or an sdist
], ids=["pip-install-git", "wheel"])
def test_installed_membench_inside_another_repository(tmp_path, monkeypatch, direct_url, expected):
    _repository(tmp_path / "other-project", "other-project")
    site = tmp_path / "other-project" / ".venv" / "site-packages"
    (site / "membench").mkdir(parents=True)
    monkeypatch.setattr(membench.results.metadata, "distribution", lambda name: FakeDistribution(site, direct_url))
    assert membench.results.source_provenance(site / "membench") == expected


def test_another_copys_metadata_is_not_used(tmp_path, monkeypatch):
    (tmp_path / "running" / "membench").mkdir(parents=True)
    monkeypatch.setattr(membench.results.metadata, "distribution",
                        lambda name: FakeDistribution(tmp_path / "elsewhere", {"vcs_info": {"commit_id": "abc"}}))
    assert membench.results.source_provenance(tmp_path / "running" / "membench") == \
        {"membench_version": None, "git_sha": None, "git_dirty": None}


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


def test_git_dirty_means_changed_code_not_rewritten_results(tmp_path):
    """Regenerating committed results rewrites tracked files under results/: that is not a modified membench."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "membench").mkdir()
    (tmp_path / "membench" / "__init__.py").write_text("")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run.json").write_text("{}")
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "x", "--allow-empty")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "files")
    package = (tmp_path / "membench").resolve()
    (tmp_path / "results" / "run.json").write_text('{"regenerated": true}')
    assert membench.results.source_provenance(package)["git_dirty"] is False
    (tmp_path / "membench" / "__init__.py").write_text("x = 1\n")
    assert membench.results.source_provenance(package)["git_dirty"] is True


def test_a_write_killed_before_its_rename_leaves_nothing_a_json_glob_reads(tmp_path):
    """SIGKILL between the temporary file's fsync and the rename (a sweep killed mid-write) leaves the
    temporary file behind, complete: it must not pass for a result (``*.json``) in the folder."""
    import subprocess
    import sys

    script = ("import os, signal, sys; from membench import files; "
              "files.os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL); "
              "files.write_atomic(sys.argv[1], '{}')")
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run.json")], capture_output=True)
    assert killed.returncode == -9
    assert len(list(tmp_path.iterdir())) == 1 and list(tmp_path.glob("*.json")) == []


def test_a_field_added_later_is_recorded_only_when_set():
    """A committed result and one written today for the same run are the same file apart from provenance."""
    import json

    from conftest import ROOT, run_config
    from membench.identity import recorded_config

    committed = json.loads(next((ROOT / "results" / "paper" / "runs").glob("roberta-base--lora--r8--bs16-*.json"))
                           .read_text())
    today = recorded_config(run_config("model=roberta-base", "method=lora", "method.rank=8", "workload.batch_size=16",
                                       "workload.seq_len=128", "backend.name=simulate"), "simulate")
    assert today == committed["config"]
    skipped = run_config("model=tiny-llama", "method=qlora", "model.quantization_skip_modules=[lm_head]")
    assert recorded_config(skipped, "simulate")["model"]["quantization_skip_modules"] == ["lm_head"]
