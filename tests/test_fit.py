"""membench-fit (what fits on which GPU, from traces) and the trace routing of single runs."""

from __future__ import annotations

import io
import json

import hydra
import pytest
from hydra import initialize_config_dir

from conftest import CONF, METHODS, compose_config
from membench import fit, maxfit, tracing
from membench.cli import run_one
from membench.errors import ConfigError
from trace_stand_in import StandInEngine


def run_app(*overrides: str, out=None):
    """What ``membench-fit <overrides>`` does, in process."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra.compose(config_name="fit", overrides=list(overrides))
        return fit.run_fit(cfg, list(overrides), hydra.compose, METHODS, out=out or io.StringIO())


def test_fit_prints_and_writes_the_table(tmp_path):
    out = io.StringIO()
    rows, paths = run_app("model=tiny-llama", "workload.batch_size=2", "workload.seq_len=16",
                          "fit.devices=[gpu-24gb,h100-80gb]", "fit.methods=[lora,lora_fa]", "fit.search_cap=8",
                          f"fit.output={tmp_path / 'fit'}", out=out)
    assert [(r["method"], r["device"]) for r in rows] == [("lora", "gpu-24gb"), ("lora_fa", "gpu-24gb"),
                                                          ("lora", "h100-80gb"), ("lora_fa", "h100-80gb")]
    assert all(r["max_batch_size"] == 8 and r["batch_limited_by"] == "search_cap" for r in rows)
    assert rows[0]["budget_bytes"] == fit.device_budget(fit.DEVICES["gpu-24gb"])
    assert [p.suffix for p in paths] == [".json", ".csv", ".md"] and all(p.exists() for p in paths)
    document = json.loads(paths[0].read_text())
    assert document["kind"] == "membench-fit"
    assert document["env"]["backend"] == "simulate"  # what produced it
    assert {"torch", "transformers", "peft", "git_sha"} <= set(document["env"])
    printed = out.getvalue()
    assert "| lora_fa | 8 | h100-80gb |" in printed and "≥8 (cap)" in printed
    assert paths[2].read_text() == fit.load_fit_markdown(tmp_path / "fit")
    (tmp_path / "fit" / "fit--foreign.json").write_text("{not json")  # skipped, not fatal
    table = fit.by_card_markdown(tmp_path / "fit").splitlines()
    assert table[0] == "| model | method | seq | gpu-24gb | h100-80gb |"
    assert table[2:] == ["| tiny-llama | lora | 16 | ≥8 (cap) | ≥8 (cap) |", "| tiny-llama | lora_fa | 16 | ≥8 (cap) | ≥8 (cap) |"]
    from membench.report.cli import main as report

    report([str(tmp_path / "fit")])  # a folder of membench-fit files: the table by card
    assert (tmp_path / "fit" / "report" / "fit.md").read_text().endswith("\n".join(table) + "\n")


@pytest.mark.parametrize("override, match", [
    ("fit.devices=[gpu-24gb,tpu-v5]", "'tpu-v5' is not a GPU profile; choose from: .*h100-80gb"),
    ("fit.methods=[lora,lorax]", "'lorax' is not a method"),
    ("fit.confirm=maybe", "fit.confirm='maybe' is not supported"),
    ("backend.name=cpu", "membench-fit simulates"),
    ("method.rank=32", "method.rank=32 is not below"),
])
def test_bad_input_fails_before_any_trace(override, match, monkeypatch):
    monkeypatch.setattr(tracing, "engine", lambda: pytest.fail("traced despite bad input"))
    monkeypatch.setattr(maxfit, "execute", lambda *a, **k: pytest.fail("simulated despite bad input"))
    with pytest.raises(ConfigError, match=match):
        run_app("model=tiny-llama", override)


@pytest.mark.parametrize("trace, evaluated", [("auto", 1), ("off", 0)])
def test_single_run_goes_through_the_trace_unless_off(trace, evaluated, monkeypatch, tmp_path):
    stand_in = StandInEngine()
    monkeypatch.setattr(tracing, "engine", lambda: stand_in)
    state, _ = run_one(compose_config(["model=tiny-llama", "backend.name=simulate", "workload.batch_size=2",
                                       "workload.seq_len=16", f"backend.trace={trace}",
                                       f"results_dir={tmp_path}"]))
    assert state == "ok" and stand_in.evaluated == evaluated
    (written,) = tmp_path.glob("*.json")
    assert ("trace" in json.loads(written.read_text())["env"]) == (trace == "auto")


def test_cpu_runs_never_use_a_trace(monkeypatch, tmp_path):
    stand_in = StandInEngine()
    monkeypatch.setattr(tracing, "engine", lambda: stand_in)
    run_one(compose_config(["model=tiny-llama", "backend.name=cpu", "workload.batch_size=2", "workload.seq_len=16",
                            f"results_dir={tmp_path}"]))
    assert stand_in.evaluated == 0


def test_fit_by_reserved_answers_at_most_by_allocated_and_skips_a_dimension(tmp_path):
    common = ("model=tiny-llama", "workload.batch_size=2", "workload.seq_len=16", "fit.devices=[gpu-24gb]",
              "fit.methods=[lora_fa]", "fit.search_cap=64", "fit.dimensions=[batch_size]", "fit.confirm=off",
              f"fit.output={tmp_path / 'fit'}")
    by_reserved, paths = run_app(*common, "fit.by=reserved")
    by_allocated, _ = run_app(*common, "fit.by=allocated")
    assert by_reserved[0]["by"] == "reserved" and by_allocated[0]["by"] == "allocated"
    assert by_reserved[0]["max_seq_len"] is None and by_reserved[0]["seq_limited_by"] is None  # not searched
    assert by_reserved[0]["max_batch_size"] <= by_allocated[0]["max_batch_size"]
    assert "peak reserved memory" in paths[2].read_text() and "| — |" in paths[2].read_text()


def test_fit_rejects_an_unknown_criterion_or_dimension():
    with pytest.raises(ConfigError, match="fit.by='peak' is not supported"):
        run_app("model=tiny-llama", "fit.by=peak")
    with pytest.raises(ConfigError, match="'layers' is not supported"):
        run_app("model=tiny-llama", "fit.dimensions=[layers]")


def test_committed_fit_files_keep_their_names_when_fields_are_added():
    """Fit (and maxfit) files are named by a digest of their settings with each run reduced to its identity
    fields: this file, written before the QLoRA and DoRA knobs existed, gets its name from today's settings too,
    so a re-run replaces it instead of sitting beside it in the table."""
    from conftest import ROOT, run_config
    from membench.identity import settings_digest, settings_record

    path = ROOT / "results" / "fit" / "fit--llama-3.1-8b--bf16--9bac4384.json"
    settings = json.loads(path.read_text())["settings"]
    runs = [run_config("model=llama-3.1-8b", f"method={method}", "train.precision=bf16", "workload.seq_len=2048",
                       "workload.batch_size=1", "method.rank=16")
            for method in ("lora", "lora_fa", "lora_recompute", "lora_fa_recompute")]
    today = {**settings, "runs": [settings_record(run) for run in runs]}
    assert "quantization" in today["runs"][0]["model"] and "quantization" not in settings["runs"][0]["model"]
    assert path.stem.endswith(settings_digest(settings)) and path.stem.endswith(settings_digest(today))
