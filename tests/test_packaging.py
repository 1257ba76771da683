"""The built wheel: it ships every config and the sweeper plugin, and its command runs from anywhere.

The wheel is built once per module from a copy of the sources (setuptools writes ``build/``
next to ``pyproject.toml``; the copy keeps that out of the checkout), with no downloads, and
installed without dependencies into a folder that goes first on ``PYTHONPATH``: the
dependencies come from this environment, membench from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import CONF, ROOT

#: What the wheel is built from: the project file, the readme it names, and the two packages.
SOURCES = ("pyproject.toml", "README.md", "membench", "hydra_plugins")
TINY_RUN = ("model=tiny-llama", "workload.batch_size=2", "workload.seq_len=16", "backend.name=simulate")


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the folder it was installed into with ``pip install --target``)."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "src"
    source.mkdir()
    for name in SOURCES:
        origin = ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / name)
    _pip("wheel", ".", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(base / "dist"), cwd=source)
    [wheel] = (base / "dist").glob("membench-*.whl")
    _pip("install", "--no-deps", "--quiet", "--target", str(base / "site"), str(wheel), cwd=base)
    return wheel, base / "site"


def _run(command: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_holds_every_config_and_the_sweeper_plugin(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"membench/{path.relative_to(CONF.parent).as_posix()}" for path in CONF.rglob("*.yaml")}
    assert {"membench/conf/config.yaml", "membench/conf/maxfit.yaml",
            "membench/conf/hydra/launcher/isolated.yaml"} <= configs  # the walk found the nested ones
    assert any(name.startswith("membench/conf/experiment/") for name in configs)
    assert configs - names == set(), "configs missing from the wheel"
    plugin = {f"hydra_plugins/{path.relative_to(ROOT / 'hydra_plugins').as_posix()}"
              for path in (ROOT / "hydra_plugins").rglob("*.py")}
    assert "hydra_plugins/membench_sweeper/__init__.py" in plugin
    assert plugin - names == set(), "sweeper plugin files missing from the wheel"
    # Hydra finds plugins by walking the hydra_plugins namespace package: an __init__.py would hide the others'.
    assert "hydra_plugins/__init__.py" not in names
    assert not any(name.startswith("tests/") for name in names)


def test_installed_wheel_is_imported_and_finds_its_configs(installed, tmp_path):
    _, site = installed
    script = site / "bin" / "membench"
    assert script.is_file(), f"the wheel installs no console script at {script}"

    where = _run([sys.executable, "-c", "import membench, hydra_plugins.membench_sweeper as s; "
                  "print(membench.__file__); print(s.__file__)"], site, tmp_path)
    assert where.returncode == 0, where.stderr
    assert [Path(line).resolve().is_relative_to(site.resolve()) for line in where.stdout.split()] == [True, True], \
        where.stdout  # the wheel's copy, not the editable checkout

    helped = _run([str(script), "--help"], site, tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "tiny-llama" in helped.stdout and "lora_fa" in helped.stdout  # the shipped conf/ groups were found


def test_installed_wheel_runs_from_any_directory(installed, tmp_path):
    wheel, site = installed
    done = _run([str(site / "bin" / "membench"), *TINY_RUN], site, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "result: results/runs/tiny-llama--lora_fa--r8--bs2-seq16--fp32--simulate-h100-80gb--" in done.stdout
    [written] = (tmp_path / "results" / "runs").glob("*.json")
    result = json.loads(written.read_text())
    assert result["status"]["state"] == "ok"
    # Provenance from the wheel's metadata: outside a checkout there is no git state to read.
    version = wheel.name.split("-")[1]
    assert (result["env"]["membench_version"], result["env"]["git_sha"]) == (version, None)
