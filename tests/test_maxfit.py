"""membench-maxfit: the largest batch / sequence length under a budget, checked by independent runs."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import hydra
import pandas as pd
import pytest
import torch
from hydra import initialize_config_dir

from conftest import CONF, METHODS, run_config
from membench import maxfit
from membench.errors import ConfigError
from membench.results import Result, Status
from membench.runner import measure

# tiny-llama, LoRA, real CPU execution: a probe costs ~0.3 s, peaks are exact and affine in batch.
BASE = ("model=tiny-llama", "method=lora", "method.rank=4", "backend.name=cpu", "workload.batch_size=2",
        "workload.seq_len=16", "workload.warmup_steps=0")


def peak(**workload) -> int:
    """The peak of an independent run (not through the finder's cache)."""
    extra = [f"workload.{key}={value}" for key, value in workload.items()]
    result = measure(run_config(*BASE, *extra))
    assert result.status.state == "ok", result.status
    return result.metrics["peak_allocated_bytes"]


@pytest.fixture(scope="module")
def batch_peaks():
    return {batch: peak(batch_size=batch) for batch in (3, 4)}


def test_batch_size_answer_fits_and_the_next_does_not(batch_peaks):
    budget = (batch_peaks[3] + batch_peaks[4]) // 2
    other = batch_peaks[4] * 3  # a budget the test did not derive the answer from
    found = {f.budget_bytes: f for f in maxfit.find_max_fit(run_config(*BASE), "batch_size", [budget, other])}
    assert found[budget].max_fit == 3 and found[budget].limited_by == "memory"
    assert found[budget].peak_bytes_at_max_fit == batch_peaks[3]
    assert found[budget].peak_bytes_at_next == batch_peaks[4]
    wide = found[other]
    assert wide.limited_by == "memory" and wide.max_fit > 4
    assert peak(batch_size=wide.max_fit) <= other < peak(batch_size=wide.max_fit + 1)
    assert all(f.probes >= 2 and f.new_probes <= f.probes for f in found.values())
    assert sum(f.new_probes for f in found.values()) <= 8, "the search must not scan linearly"


def test_seq_len_answer_fits_and_the_next_does_not():
    budget = (peak(seq_len=40) + peak(seq_len=48)) // 2
    (found,) = maxfit.find_max_fit(run_config(*BASE), "seq_len", [budget])
    assert found.limited_by == "memory" and 40 <= found.max_fit < 48
    assert found.peak_bytes_at_max_fit == peak(seq_len=found.max_fit) <= budget
    assert found.peak_bytes_at_next == peak(seq_len=found.max_fit + 1) > budget


def test_seq_len_stops_at_the_models_maximum_and_batch_at_the_cap():
    run = run_config(*BASE)
    huge = 1 << 40
    (by_length,) = maxfit.find_max_fit(run, "seq_len", [huge])
    assert (by_length.max_fit, by_length.limited_by) == (256, "model_max_length")  # tiny-llama's positions
    assert by_length.peak_bytes_at_next is None
    (by_cap,) = maxfit.find_max_fit(run, "batch_size", [huge], search_cap=8)
    assert (by_cap.max_fit, by_cap.limited_by) == (8, "search_cap")


def test_nothing_fits_gives_null(batch_peaks):
    (found,) = maxfit.find_max_fit(run_config(*BASE), "batch_size", [1000])
    assert found.max_fit is None and found.limited_by == "memory" and found.probes == 1
    assert found.peak_bytes_at_next > 1000


def test_simulated_oom_against_the_profile_does_not_decide_the_budget():
    """simulate marks a peak above the simulated card as oom; the budget, not the card, decides."""
    run = run_config("model=tiny-llama", "method=lora", "method.rank=4", "backend.name=simulate",
                     "workload.batch_size=2", "workload.seq_len=16")
    prober = maxfit.Prober(maxfit.plan(run))
    probe = prober("batch_size", 2)
    faked = maxfit.Probe(2, "oom", probe.peak_bytes, "simulate", probe.device)
    assert faked.fits(probe.peak_bytes) is True
    assert maxfit.Probe(2, "oom", 10, "cuda", "gpu").fits(1 << 40) is False  # a real OOM never fits


def test_by_reserved_a_modelled_allocator_oom_never_fits():
    """The reserved replay stops where the modelled cudaMalloc fails: its peak is a lower bound, not the need."""
    assert maxfit.Probe(2, "oom", 10, "simulate", "card", complete=False).fits(1 << 40) is False
    # a card of 1 GiB (0.5 GiB usable past the CUDA context), searched up to 4096: the answer is the card's
    run = run_config("model=tiny-llama", "method=lora", "method.rank=4", "backend.name=simulate",
                     "backend.device=custom", "backend.device_memory_gib=1", "workload.batch_size=2",
                     "workload.seq_len=128")
    budget = (1 << 30) - (512 << 20)
    (reserved,) = maxfit.maxfit_rows([run], ["batch_size"], [budget], search_cap=4096, confirm="off", by="reserved")
    (allocated,) = maxfit.maxfit_rows([run], ["batch_size"], [budget], search_cap=4096, confirm="off",
                                      by="allocated")
    assert reserved["limited_by"] == "memory" and reserved["max_fit"] < 4096
    assert reserved["max_fit"] <= allocated["max_fit"]
    prober = maxfit.Prober(maxfit.plan(run), by="reserved")
    assert prober("batch_size", reserved["max_fit"]).fits(budget)
    assert not prober("batch_size", reserved["max_fit"] + 1).fits(budget)


def test_an_error_probe_is_reported_not_raised(monkeypatch):
    real_execute = maxfit.execute

    def failing(the_plan, backend=None):
        result = real_execute(the_plan, backend)
        if the_plan.run.workload.batch_size > 2:
            return Result(result.run_id, result.config, Status("error", "forward", "RuntimeError: boom"),
                          result.metrics, result.env)
        return result

    monkeypatch.setattr(maxfit, "execute", failing)
    runs = [run_config(*BASE)]
    rows = maxfit.maxfit_rows(runs, ["batch_size", "seq_len"], [1 << 30], search_cap=8)
    by_dimension = {row["dimension"]: row for row in rows}
    failed = by_dimension["batch_size"]
    assert failed["limited_by"] == "error" and failed["max_fit"] is None and "boom" in failed["error"]
    assert by_dimension["seq_len"]["max_fit"] == 8  # the other search went on (to the cap)


@pytest.mark.parametrize("dimension, budgets, match", [
    ("batch", [1 << 30], "batch_size, seq_len"),
    ("batch_size", [0], "budget"),
    ("batch_size", [-5], "budget"),
    ("batch_size", [], "budget"),
])
def test_bad_input_is_a_config_error(dimension, budgets, match):
    with pytest.raises(ConfigError, match=match):
        maxfit.find_max_fit(run_config(*BASE), dimension, budgets)


def run_app(*overrides: str, out=None):
    """What ``membench-maxfit <overrides>`` does, in process."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra.compose(config_name="maxfit", overrides=list(overrides))
        return maxfit.run_maxfit(cfg, list(overrides), hydra.compose, METHODS, out=out or io.StringIO())


@pytest.mark.parametrize("override, match", [
    ("maxfit.methods=[lora,lorax]", "'lorax' is not a method; choose from: .*lora_fa"),
    ("maxfit.budgets_gib=[24,0]", "budgets_gib entry 0"),
    ("maxfit.dimensions=[batch_size,rank]", "'rank' is not supported; choose from: batch_size, seq_len"),
    ("maxfit.search_cap=0", "search_cap=0"),
    ("maxfit.world_sizes=[1,2]", "maxfit.world_sizes=\\[1, 2\\] needs parallel.strategy=fsdp2"),
    ("maxfit.world_sizes=[0]", "maxfit.world_sizes entry 0 must be an integer from 1 to 1024"),
])
def test_bad_command_line_fails_before_any_probe(override, match, monkeypatch):
    monkeypatch.setattr(maxfit, "execute", lambda *a, **k: pytest.fail("probed despite bad input"))
    with pytest.raises(ConfigError, match=match):
        run_app("model=tiny-llama", override)


def test_verify_without_a_gpu_fails_before_any_probe(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setattr(maxfit, "execute", lambda *a, **k: pytest.fail("probed despite no GPU"))
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run_app("model=tiny-llama", "maxfit.verify=true")


def test_command_writes_json_and_csv_and_the_report_reads_them(tmp_path, batch_peaks):
    budget = (batch_peaks[3] + batch_peaks[4]) // 2
    out = io.StringIO()
    rows, json_path, csv_path = run_app(
        *BASE[:1], "method.rank=4", "method=full",  # method= is ignored and method.rank skips full
        "backend.name=cpu", "workload.batch_size=2", "workload.seq_len=16", "workload.warmup_steps=0",
        "maxfit.methods=[lora,lora_fa,full]", f"maxfit.budgets_bytes=[{budget}]",
        "maxfit.dimensions=[batch_size]", f"maxfit.output={tmp_path / 'maxfit'}", "maxfit.by=allocated", out=out)
    assert [row["method"] for row in rows] == ["lora", "lora_fa", "full"]
    assert rows[0]["max_fit"] == 3 and rows[0]["rank"] == 4 and rows[2]["rank"] is None
    assert rows[1]["max_fit"] >= rows[0]["max_fit"]  # LoRA-FA keeps no copy of X
    assert set(rows[0]) == set(maxfit.COLUMNS) and rows[0]["git_sha"] and rows[0]["torch"]
    assert json_path.exists() and csv_path.exists() and not list(json_path.parent.glob(".*.tmp"))
    assert {"torch", "transformers", "peft", "git_sha"} <= set(json.loads(json_path.read_text())["env"])
    printed = out.getvalue()
    assert "lora_fa fits batch" in printed and "max_memory_allocated" in printed

    (tmp_path / "maxfit" / "broken.json").write_text("{not json")
    (tmp_path / "maxfit" / "foreign.json").write_text(json.dumps({"schema_version": 1, "run_id": "x"}))
    with pytest.warns(UserWarning) as caught:
        df = maxfit.load_maxfit(tmp_path / "maxfit")
    assert {"broken.json", "foreign.json"} <= {str(w.message).split(":")[0].rsplit("/", 1)[-1] for w in caught}
    assert len(df) == 3 and str(df["max_fit"].dtype) == "Int64"
    (sentence,) = maxfit.sentences(df)
    lora_fa = int(df.loc[df["method"] == "lora_fa", "max_fit"].iloc[0])
    assert sentence.startswith(f"on a {maxfit.budget_label(budget)} card, lora_fa fits batch {lora_fa} where lora "
                               "fits 3")
    table = maxfit.markdown_table(df)
    assert table.splitlines()[0].startswith("| model |") and "| 4 | batch_size |" in table and "| 3 |" in table
    with csv_path.open() as handle:
        assert [line["max_fit"] for line in csv.DictReader(handle)][0] == "3"  # an integer, not "3.0"


def test_report_text_for_limits_and_units():
    rows = [
        {"model": "m", "method": "lora", "rank": 8, "precision": "bf16", "fixed_batch_size": 4, "fixed_seq_len": None,
         "target_len": None, "dimension": "seq_len", "budget_bytes": 24 << 30, "max_fit": 512,
         "limited_by": "model_max_length"},
        {"model": "m", "method": "full", "rank": None, "precision": "bf16", "fixed_batch_size": 4,
         "fixed_seq_len": None, "target_len": None, "dimension": "seq_len", "budget_bytes": 24 << 30,
         "max_fit": None, "limited_by": "memory"},
    ]
    df = maxfit._typed(pd.DataFrame(rows))
    assert maxfit.sentences(df) == [
        "on a 24 GiB card, lora fits sequence length 512 (the model's maximum) where full fits none "
        "(m, bf16, r=8, batch 4)"]
    assert maxfit.budget_label(3 << 20) == "3.00 MiB" and maxfit.budget_label(40 << 30) == "40 GiB"
    assert "| 24 GiB | 512 (the model's maximum) | none |" in maxfit.markdown_table(df)


# --- on traces (backend.trace=auto): the stand-in engine until membench.trace lands, then the real one ---

SIM = ("model=tiny-llama", "method=lora", "method.rank=4", "backend.name=simulate", "workload.batch_size=2",
       "workload.seq_len=16")


@pytest.fixture
def engine(monkeypatch):
    """The trace engine the commands see: the real membench.trace when complete, else a counting stand-in."""
    from membench import tracing
    from trace_stand_in import StandInEngine

    real = tracing.engine()
    if real is not None:
        return real
    stand_in = StandInEngine()
    monkeypatch.setattr(tracing, "engine", lambda: stand_in)
    return stand_in


@pytest.fixture
def direct_calls(monkeypatch):
    """Counts direct simulations (every probe not evaluated from a trace goes through maxfit.execute)."""
    calls = []
    real_execute = maxfit.execute

    def counting(the_plan, backend=None):
        calls.append((the_plan.run.workload.batch_size, the_plan.run.workload.seq_len))
        return real_execute(the_plan, backend)

    monkeypatch.setattr(maxfit, "execute", counting)
    return calls


@pytest.fixture(scope="module")
def sim_budgets():
    """Budgets between simulated peaks: batch 5|6 at seq 16, seq 40|41 at batch 2 (both searches start at 2)."""
    def sim_peak(*extra):
        return measure(run_config(*SIM, *extra)).metrics["peak_allocated_bytes"]
    return [(sim_peak("workload.batch_size=5") + sim_peak("workload.batch_size=6")) // 2,
            (sim_peak("workload.seq_len=40") + sim_peak("workload.seq_len=41")) // 2]


def _answers(rows):
    return [(r["method"], r["dimension"], r["budget_bytes"], r["max_fit"], r["peak_bytes_at_max_fit"],
             r["peak_bytes_at_next"], r["limited_by"]) for r in rows]


def test_search_on_traces_equals_direct_search_and_confirms_at_n_and_n_plus_1(engine, direct_calls, sim_budgets):
    runs = [run_config(*SIM), run_config(*SIM[:1], "method=lora_fa", *SIM[2:])]
    assert maxfit.uses_trace(runs[0])
    traced = maxfit.maxfit_rows(runs, ["batch_size", "seq_len"], sim_budgets, confirm="method")
    # One confirmation per method: the direct simulations are exactly its n and n + 1.
    confirmed = [r for r in traced if r["confirmed"]]
    assert [r["method"] for r in confirmed] == ["lora", "lora_fa"]
    expected = []
    for row in confirmed:
        n = row["max_fit"]
        fixed = row["fixed_seq_len"] if row["dimension"] == "batch_size" else row["fixed_batch_size"]
        expected += [(x, fixed) if row["dimension"] == "batch_size" else (fixed, x) for x in (n, n + 1)]
    assert sorted(direct_calls) == sorted(expected)
    assert all(r["trace"] for r in traced) and all(r["new_probes"] <= r["probes"] for r in traced)

    direct_calls.clear()
    off = [dataclasses.replace(r, backend=dataclasses.replace(r.backend, trace="off")) for r in runs]
    assert not maxfit.uses_trace(off[0])
    direct = maxfit.maxfit_rows(off, ["batch_size", "seq_len"], sim_budgets)
    assert _answers(direct) == _answers(traced)
    assert len(direct_calls) == sum(r["new_probes"] for r in direct)  # backend.trace=off: every probe direct
    assert all(r["trace"] is None and r["confirmed"] is None for r in direct)


def test_confirm_off_simulates_nothing_directly_and_all_confirms_every_answer(engine, direct_calls, sim_budgets):
    run = run_config(*SIM)
    rows = maxfit.maxfit_rows([run], ["batch_size"], sim_budgets, confirm="off")
    assert direct_calls == [] and all(r["confirmed"] is None for r in rows)
    rows = maxfit.maxfit_rows([run], ["batch_size"], sim_budgets, confirm="all")
    assert all(r["confirmed"] for r in rows)
    assert sorted(direct_calls) == sorted({(x, 16) for r in rows for x in (r["max_fit"], r["max_fit"] + 1)})


def test_nothing_fits_on_a_trace_probes_size_1_directly(engine, direct_calls):
    (found,) = maxfit.find_max_fit(run_config(*SIM), "batch_size", [1000],
                                   prober=maxfit.Prober(maxfit.plan(run_config(*SIM)), via_trace=True))
    assert found.max_fit is None and found.limited_by == "memory" and found.probes == 2  # 2 (also the start), then 1
    assert direct_calls == [(1, 16)]


def test_a_trace_that_disagrees_with_direct_simulation_is_searched_again_directly(monkeypatch, direct_calls,
                                                                                  sim_budgets):
    from membench import tracing
    from trace_stand_in import StandInEngine

    monkeypatch.setattr(tracing, "engine", lambda: StandInEngine(offset=512))  # a broken trace
    lines = []
    rows = maxfit.maxfit_rows([run_config(*SIM)], ["batch_size"], sim_budgets, log=lines.append)
    assert any("disagrees with direct simulation" in line for line in lines)
    direct = maxfit.maxfit_rows([run_config(*SIM, "backend.trace=off")], ["batch_size"], sim_budgets)
    assert _answers(rows) == _answers(direct) and all(r["trace"] is None for r in rows)


def test_bad_confirm_is_a_config_error(monkeypatch):
    monkeypatch.setattr(maxfit, "execute", lambda *a, **k: pytest.fail("probed despite bad input"))
    with pytest.raises(ConfigError, match="maxfit.confirm='sometimes' is not supported; choose one of: method"):
        run_app("model=tiny-llama", "maxfit.confirm=sometimes")


def test_search_by_reserved_answers_at_most_the_allocated_answers(batch_peaks):
    """Reserved memory (segments, fragmentation included) is at least allocated: it fits no more."""
    budgets = [batch_peaks[4] * 3, batch_peaks[4] * 5]  # reserved rounds to 2 MiB segments: budgets above them
    runs = [run_config(*BASE)]
    allocated = maxfit.maxfit_rows(runs, ["batch_size"], budgets, by="allocated")
    reserved = maxfit.maxfit_rows(runs, ["batch_size"], budgets, by="reserved")
    for by_allocated, by_reserved in zip(allocated, reserved):
        assert 0 < by_reserved["max_fit"] <= by_allocated["max_fit"]
        assert by_reserved["peak_bytes_at_max_fit"] <= by_reserved["budget_bytes"] < by_reserved["peak_bytes_at_next"]
    assert any(r["max_fit"] < a["max_fit"] for a, r in zip(allocated, reserved))
    assert maxfit.MaxFitConfig().by == "reserved"
    with pytest.raises(ConfigError, match="maxfit.by"):
        maxfit.MaxFitConfig(by="free")


def test_method_runs_give_quantized_and_dora_methods_their_base():
    """maxfit.methods=[lora,qlora,qdora] pairs one command line with each method's own base (nf4 or none)."""
    from membench.maxfit.cli import method_runs

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        runs = method_runs(["lora", "qlora", "qdora", "dora"], ["model=tiny-llama", "method.rank=4"], hydra.compose,
                           METHODS)
    assert [(r.method.name, r.model.quantization, r.method.dora, r.method.rank) for r in runs] == [
        ("lora", "none", False, 4), ("qlora", "nf4", False, 4), ("qdora", "nf4", True, 4), ("dora", "none", True, 4)]


def test_world_sizes_give_per_gpu_answers_and_the_fewest_gpus_that_fit(tmp_path):
    """Budget: full fine-tuning's simulated peak at batch 2 on 2 GPUs. It fits there, not on 1 GPU, and 4
    GPUs (a quarter of the weights, gradients and optimizer state each) fit at least as large a batch."""
    from membench.runner import measure

    common = ("model=tiny-llama", "backend.name=simulate", "workload.seq_len=16", "parallel.strategy=fsdp2")
    at_two = measure(run_config(*common, "method=full", "workload.batch_size=2", "parallel.world_size=2"))
    budget = at_two.metrics["peak_allocated_bytes"]
    out = io.StringIO()
    rows, json_path, csv_path = run_app(
        *common, "workload.batch_size=2", "maxfit.methods=[full]", "maxfit.world_sizes=[1,2,4]",
        f"maxfit.budgets_bytes=[{budget}]", "maxfit.dimensions=[batch_size]", "maxfit.by=allocated",
        f"maxfit.output={tmp_path}", out=out)
    fits = {row["world_size"]: row["max_fit"] for row in rows}
    assert fits[2] >= 2 and (fits[1] or 0) < 2 and fits[4] >= fits[2]
    assert "full: batch 2 fits" in out.getvalue() and "per GPU from 2 GPUs (of 1/2/4 tried" in out.getvalue()
    assert "world_size" in csv_path.read_text().splitlines()[0]
