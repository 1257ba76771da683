"""Sweeps as a user runs them: ``membench -m ...`` over tiny models, in a temporary directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from membench.results import read_result
from membench.runner import measure
from membench.cli import run_one
from tests.conftest import ROOT, compose_config, tiny
from tests.test_cli import MEMBENCH, membench

TINY = ["workload.batch_size=2", "workload.seq_len=16", "backend.name=simulate"]


def results(directory: Path) -> dict[str, float]:
    """Result file name → modification time."""
    return {p.name: p.stat().st_mtime for p in (directory / "results" / "runs").glob("*.json")}


def test_multirun_writes_one_result_per_configuration_then_resumes(tmp_path):
    sweep = ["-m", "model=tiny-llama,tiny-roberta", "method=full,lora,lora_fa", "method.rank=4,8", *TINY]
    first = membench(*sweep, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # full has no rank: measured once per model, not once per rank
    assert "10 configurations; 0 already measured" in first.stdout
    lines = [line for line in first.stdout.splitlines() if " → peak " in line]
    assert sorted(line.split("]")[0] for line in lines) == sorted(f"[{number}/10" for number in range(1, 11))
    assert sum("tiny-llama full bs=2 seq=16 fp32 → peak" in line for line in lines) == 1
    assert sum("tiny-roberta lora_fa r=8 bs=2 seq=16 fp32 → peak" in line for line in lines) == 1
    done = results(tmp_path)
    assert len(done) == 10
    assert all(read_result(tmp_path / "results" / "runs" / name).status.state == "ok" for name in done)

    again = membench(*sweep, "method.rank=4,8,16", cwd=tmp_path)  # one more rank: 4 new runs
    assert again.returncode == 0, again.stderr
    assert "14 configurations; 10 already measured" in again.stdout and "4 to run" in again.stdout
    after = results(tmp_path)
    assert len(after) == 14
    assert all(after[name] == mtime for name, mtime in done.items())  # finished files untouched


def test_force_remeasures(tmp_path):
    """In process (cli.run_one, what each job runs): the skip-or-measure decision, not the command, is tested."""
    args = ["model=tiny-llama", "method=lora_fa", *TINY]
    assert run_one(compose_config(args))[0] == "ok"
    before = results(tmp_path)
    assert len(before) == 1
    time.sleep(0.01)
    state, line = run_one(compose_config([*args, "force=true"]))
    assert state == "ok" and "already measured" not in line
    after = results(tmp_path)
    assert after.keys() == before.keys()  # the same run id: force is not part of the identity
    assert all(after[name] > mtime for name, mtime in before.items())


def test_a_single_run_also_skips_an_existing_result(tmp_path, capsys):
    args = ["model=tiny-llama", "method=lora_fa", *TINY]
    assert run_one(compose_config(args))[0] == "ok"
    written = results(tmp_path)
    capsys.readouterr()
    state, line = run_one(compose_config(args))
    assert state == "skipped"
    assert line.endswith("→ already measured (ok), skipped; force=true re-measures")
    assert line in capsys.readouterr().out
    assert results(tmp_path) == written  # nothing rewritten


def test_an_invalid_job_stops_the_sweep_before_anything_runs(tmp_path):
    done = membench("-m", "model=tiny-llama", "method=lora", "method.rank=4,0", *TINY, cwd=tmp_path)
    assert done.returncode == 2
    assert "job 2 of 2" in done.stderr and "method.rank=0 must be a positive integer" in done.stderr
    assert not (tmp_path / "results").exists()


def test_an_interrupted_sweep_loses_nothing_and_resumes(tmp_path):
    sweep = ["-m", "model=tiny-llama", "method=lora,lora_fa", "method.rank=1,2,3,4,5,6", *TINY]
    process = subprocess.Popen([MEMBENCH, *sweep], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "HYDRA_FULL_ERROR": "0"}, start_new_session=True)
    runs = tmp_path / "results" / "runs"
    deadline = time.monotonic() + 240
    while len(list(runs.glob("*.json"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up: what is on disk is what a crash leaves
    process.communicate()
    finished = sorted(runs.glob("*.json"))
    assert 3 <= len(finished) < 12, "the sweep was not interrupted mid-way"
    for path in finished:
        assert json.loads(path.read_text())["status"]["state"] == "ok"  # complete files only
    resumed = membench(*sweep, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"12 configurations; {len(finished)} already measured" in resumed.stdout
    assert len(list(runs.glob("*.json"))) == 12


#: Dry-runs each experiment named on its command line in turn, in one process (one import of torch,
#: transformers and PEFT, not one per experiment), each as ``membench -m experiment=NAME`` would.
DRY_RUNS = """
import sys
from hydra.core.global_hydra import GlobalHydra
from membench.cli import main
for name in sys.argv[1:]:
    GlobalHydra.instance().clear()
    sys.argv = ["membench", "-m", f"experiment={name}", "hydra.sweeper.dry_run=true"]
    print(f"=== {name}", flush=True)
    try:
        main()
    except SystemExit as exit:
        if exit.code:
            raise
"""


def test_every_experiment_composes_and_its_first_line_runs_it(tmp_path):
    experiments = sorted(p.stem for p in (ROOT / "membench" / "conf" / "experiment").glob("*.yaml"))
    for name in experiments:
        first_line = (ROOT / "membench" / "conf" / "experiment" / f"{name}.yaml").read_text().splitlines()[0]
        assert first_line == f"# membench -m experiment={name}"
    done = subprocess.run([sys.executable, "-c", DRY_RUNS, *experiments], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert done.returncode == 0, done.stderr
    listings = dict(part.split("\n", 1) for part in done.stdout.split("=== ")[1:])
    assert sorted(listings) == experiments
    for name, stdout in listings.items():
        total = int(stdout.splitlines()[0].split(" configurations")[0].rsplit(" ", 1)[1])
        assert total > 0 and f"[{total}/{total}]" in stdout, name
    assert not [path for path in (tmp_path / "results").rglob("*") if path.is_file()]  # nothing ran


METRICS = ("weight_bytes", "gradient_bytes", "optimizer_state_bytes", "activation_bytes", "saved_tensor_bytes",
           "peak_allocated_bytes", "phase_peak_bytes", "phase_allocated_bytes")


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
def test_in_process_runs_give_the_same_bytes_in_any_order(backend):
    off = ["backend.trace=off"] if backend == "simulate" else []  # direct runs: what could leak between them
    configs = [tiny("tiny-llama", "full", *off, backend=backend), tiny("tiny-t5", "lora", *off, backend=backend),
               tiny("tiny-roberta", "lora_fa_recompute", "method.lora_dropout=0.1", *off, backend=backend),
               tiny("tiny-llama", "lora_fa", "train.precision=bf16", *off, backend=backend)]

    def sweep(order):
        metrics = {i: measure(configs[i]).metrics for i in order}  # one run per config, in this order
        return {i: {k: metrics[i][k] for k in METRICS} for i in order}

    forward = sweep([0, 1, 2, 3])
    backward = sweep([3, 2, 1, 0])
    assert forward == backward


def test_isolated_launcher_runs_each_configuration_in_its_own_process(tmp_path):
    # backend.trace=off: a job a cached trace answers would be evaluated by the sweeper, in its own process
    done = membench("-m", "hydra/launcher=isolated", "model=tiny-llama", "method=lora,lora_fa", *TINY,
                    "backend.trace=off", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "[1/2] tiny-llama lora r=8" in done.stdout and "[2/2] tiny-llama lora_fa r=8" in done.stdout
    logs = list((tmp_path / "multirun").rglob("*_log.out"))
    assert len(logs) == 2  # one submitit job (process) per configuration
    assert len(results(tmp_path)) == 2


def test_trace_waves_record_each_trace_once_before_evaluating_it():
    from membench.sweep import trace_waves

    runs = [tiny("tiny-llama", "lora", "workload.batch_size=2", backend="simulate"),
            tiny("tiny-llama", "lora", "workload.batch_size=3", backend="simulate"),    # same trace as 0
            tiny("tiny-llama", "lora_fa", "workload.batch_size=3", backend="simulate"),  # its own trace
            tiny("tiny-llama", "lora", "workload.batch_size=1", backend="simulate"),    # size 1: direct
            tiny("tiny-llama", "lora", "workload.batch_size=4", "backend.trace=off", backend="simulate"),  # direct
            tiny("tiny-llama", "lora", "workload.batch_size=5", "workload.seq_len=40", backend="simulate")]  # as 0
    assert trace_waves(runs) == [[0, 2, 3, 4], [1, 5]]
    assert trace_waves(runs[3:5]) == [[0, 1]]  # nothing to evaluate later: one wave
    assert trace_waves([runs[3], runs[0], runs[1]]) == [[1, 0], [2]]  # the recorder (the longest job) first
    # job 0 is answered by a cached trace (of another sequence length, say): job 1 records its group's
    assert trace_waves(runs, answered=frozenset({0})) == [[1, 2, 3, 4], [0, 5]]


def test_processes_launcher_simulates_in_parallel_workers_with_the_same_bytes(tmp_path, monkeypatch):
    """One worker records the batch-size trace (B symbolic only: the jobs vary nothing else); the sweeper
    evaluates the other three jobs from it in its own process; every result equals direct simulation."""
    import pickle

    monkeypatch.setenv("MEMBENCH_TRACE_CACHE", str(tmp_path / "traces"))
    sweep = ["model=tiny-llama", "method=lora", "workload.batch_size=2,3,4,5", "workload.seq_len=16",
             "backend.name=simulate"]
    pooled = membench("-m", "hydra/launcher=processes", "hydra.launcher.n_jobs=2", *sweep,
                      "results_dir=pooled", cwd=tmp_path)
    assert pooled.returncode == 0, pooled.stderr
    assert "4 configurations; 0 already measured" in pooled.stdout
    assert pooled.stdout.count(" → peak ") == 4  # each job's line once (workers print to this terminal)
    assert [line for line in pooled.stdout.splitlines() if line.startswith("[1/4]")][0].count("bs=2") == 1
    [sweep_dir] = (tmp_path / "multirun").iterdir()
    assert [path.name for path in sweep_dir.iterdir() if path.is_dir()] == ["0"]  # one job launched: the recorder
    [trace] = [trace for path in (tmp_path / "traces").glob("*.pickle") for trace in pickle.loads(path.read_bytes())]
    assert trace.validity["S"] == (16, 16) and trace.validity["R"] == (8, 8) and trace.validity["B"][0] == 2
    evaluated = [read_result(path).env["trace"] for path in (tmp_path / "pooled").glob("*.json")]
    assert all(env["evaluated_from_trace"] and env["key"] == trace.key for env in evaluated) and len(evaluated) == 4
    pooled_metrics = {read_result(path).run_id: read_result(path).metrics for path in (tmp_path / "pooled").glob("*.json")}
    in_process = {}
    for batch in (2, 3, 4, 5):  # what one process measures, one run after another
        result = measure(tiny("tiny-llama", "lora", f"workload.batch_size={batch}", backend="simulate"))
        in_process[result.run_id] = result.metrics
    assert pooled_metrics == in_process


def test_a_sweep_records_a_trace_only_where_enough_jobs_share_it_with_the_sizes_they_vary(tmp_path):
    from membench.sweep import MIN_JOBS_PER_ONE_SIZE_TRACE, MIN_JOBS_PER_TRACE, plan_traces
    from membench.trace import load_or_record

    def run(method, batch, rank=4, seq=16):
        adapters = () if method == "full" else (f"method.rank={rank}",)
        return tiny("tiny-llama", method, f"workload.batch_size={batch}", *adapters, f"workload.seq_len={seq}",
                    backend="simulate")

    ranks = [run("lora", batch, rank) for batch, rank in zip(range(2, 2 + MIN_JOBS_PER_TRACE), (2, 3, 4, 5))]
    few_ranks = [run("lora_fa", batch, rank) for batch, rank in zip(range(2, 1 + MIN_JOBS_PER_TRACE), (2, 3, 4))]
    batches = [run("lora_recompute", batch) for batch in range(2, 2 + MIN_JOBS_PER_ONE_SIZE_TRACE)]
    lengths = [run("full", 2, seq=seq) for seq in range(16, 16 + MIN_JOBS_PER_ONE_SIZE_TRACE)]
    runs = ranks + few_ranks + batches + lengths
    cache = str(tmp_path / "traces")
    plan = plan_traces(runs, cache)
    start = len(ranks)
    assert plan.direct == set(range(start, start + len(few_ranks)))  # 3 jobs do not pay for a trace with R
    start += len(few_ranks)
    assert plan.symbols == {**dict.fromkeys(range(len(ranks)), "BR"), **dict.fromkeys(range(start, start + len(batches)), "B"),
                            **dict.fromkeys(range(start + len(batches), len(runs)), "ST")}
    assert plan_traces(batches[:-1], cache).direct == {0, 1}  # 2 jobs do not pay even for one size
    load_or_record(few_ranks[0], cache)  # once its trace is cached, evaluating it is the cheap way
    assert plan_traces(runs, cache).direct == set()
    assert plan_traces([run("lora", 1)], cache).direct == set()  # size 1 is direct anyway: nothing to switch


def test_the_watcher_evaluates_jobs_as_their_trace_arrives_and_leaves_the_others(tmp_path, monkeypatch):
    from membench.sweep import CachedTraceWatcher
    from membench.trace import load_or_record

    monkeypatch.setenv("MEMBENCH_TRACE_CACHE", str(tmp_path / "traces"))
    runs = [tiny("tiny-llama", "lora", f"workload.batch_size={batch}", backend="simulate") for batch in (2, 3, 4)]
    runs.append(tiny("tiny-llama", "lora_fa", backend="simulate"))  # another trace, never recorded here
    evaluated = []
    with CachedTraceWatcher(runs, [1, 2, 3], lambda index: evaluated.append(index) or "ok", interval_s=0.02) as watcher:
        time.sleep(0.1)
        assert not evaluated  # nothing cached yet
        load_or_record(runs[0])  # a worker caches the trace
        deadline = time.monotonic() + 30
        while len(evaluated) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert sorted(evaluated) == [1, 2] and watcher.states == {1: "ok", 2: "ok"} and watcher.pending == [3]


def test_rank_one_has_a_trace_group_of_its_own_and_every_other_rank_shares_one():
    from membench.sweep import trace_groups, trace_waves

    runs = [tiny("tiny-llama", "lora", f"method.rank={rank}", backend="simulate") for rank in (1, 2, 5, 8)]
    keys = trace_groups(runs)
    assert keys[0] == keys[1] + "--rank1" and keys[1] == keys[2] == keys[3]
    assert trace_waves(runs) == [[0, 1], [2, 3]]  # rank 1 records its own; rank 2 the one ranks 5 and 8 evaluate
