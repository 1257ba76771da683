"""The ``membench`` command as a user runs it: from any directory, with overrides and own configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The console script installed beside this interpreter (pip install -e .), else the one on PATH.
MEMBENCH = str(Path(sys.executable).with_name("membench")) if Path(sys.executable).with_name("membench").exists() \
    else shutil.which("membench")


def membench(*args, cwd):
    assert MEMBENCH, "the membench command is not installed: pip install -e ."
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([MEMBENCH, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_runs_from_any_directory_and_writes_a_result(tmp_path):
    done = membench("model=tiny-llama", "method=lora_fa", "workload.batch_size=2", "workload.seq_len=16",
                    "backend.name=simulate", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "tiny-llama lora_fa r=8 bs=2 seq=16 fp32 [simulate: NVIDIA H100 80GB HBM3] → peak" in done.stdout
    files = list((tmp_path / "results" / "runs").glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["status"]["state"] == "ok"
    assert not (tmp_path / "outputs").exists()  # Hydra writes nothing of its own


def test_bad_input_exits_2_with_a_message(tmp_path):
    done = membench("model=tiny-llama", "method.rank=0", cwd=tmp_path)
    assert done.returncode == 2
    assert "membench: error: method.rank=0 must be a positive integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_model_lists_choices(tmp_path):
    done = membench("model=gpt-17", cwd=tmp_path)
    assert done.returncode != 0
    assert "gpt-17" in done.stderr and "roberta-large" in done.stderr


def test_config_dir_adds_a_users_model(tmp_path):
    model_dir = tmp_path / "my_conf" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "my-decoder.yaml").write_text(
        "name: my-decoder\nmodel_type: llama\ntask: causal_lm\nhf_config:\n  hidden_size: 32\n"
        "  intermediate_size: 64\n  num_hidden_layers: 1\n  num_attention_heads: 2\n  vocab_size: 100\n"
    )
    done = membench("--config-dir", str(tmp_path / "my_conf"), "model=my-decoder", "workload.batch_size=2",
                    "workload.seq_len=8", "backend.name=cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "my-decoder lora_fa" in done.stdout


@pytest.mark.parametrize("sweep", [False, True], ids=["single", "sweep"])
def test_unwritable_results_dir_fails_before_measuring(tmp_path, sweep):
    (tmp_path / "afile").write_text("")  # a folder under a regular file cannot be created, even by root
    grid = ["-m", "method=lora,lora_fa"] if sweep else []
    done = membench(*grid, "model=tiny-llama", "workload.batch_size=2", "workload.seq_len=16",
                    "backend.name=simulate", f"results_dir={tmp_path}/afile/runs", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"results_dir='{tmp_path}/afile/runs' is not a folder membench can write to" in done.stderr
    assert done.stderr.startswith("membench: error: job 1 of 2 (" if sweep else "membench: error: results_dir=")
    assert "Traceback" not in done.stderr and "peak" not in done.stdout  # nothing was measured


def test_unwritable_maxfit_output_fails_before_searching(tmp_path):
    (tmp_path / "afile").write_text("")
    done = subprocess.run([str(Path(MEMBENCH).with_name("membench-maxfit")), "model=tiny-llama",
                           f"maxfit.output={tmp_path}/afile/maxfit"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"membench-maxfit: error: maxfit.output='{tmp_path}/afile/maxfit' is not a folder" in done.stderr
    assert "searching" not in done.stdout  # failed before the first probe
