"""The GPU check kit without a GPU: its check list, refusal, folder names, summary and budget guard."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from membench.config import ATTN_IMPLEMENTATIONS, PRECISIONS
from membench.gpucheck import checks as gpuchecks
from membench.gpucheck import run as gpurun
from membench.gpucheck.checks import CATALOGUE_CHECKS, CHECKS, QUANTIZED_CHECKS, Check, coverage, missing_coverage
from membench.results import write_result
from membench.runner import measure
from tests.conftest import CONF, METHODS, tiny


def test_checks_cover_every_method_precision_attention_and_family():
    covered = coverage(CHECKS)
    assert covered["method"] >= set(METHODS) - coverage(QUANTIZED_CHECKS)["method"]
    assert covered["precision"] >= set(PRECISIONS)
    assert covered["attention"] >= set(ATTN_IMPLEMENTATIONS)
    assert {"roberta", "t5", "llama", "qwen2", "mistral"} <= covered["family"]
    # The default checks cover the paper's and the current decoders' families; --catalogue adds one
    # check for each family the catalogue has beyond those, so together they cover every family.
    assert missing_coverage(CHECKS + CATALOGUE_CHECKS + QUANTIZED_CHECKS) == {}
    assert missing_coverage(CHECKS).keys() <= {"family", "method"}
    # The default kit leaves out only the 4-bit and DoRA methods, which --quantized adds (one check each).
    assert missing_coverage(CHECKS)["method"] == coverage(QUANTIZED_CHECKS)["method"]
    assert len(QUANTIZED_CHECKS) == len(coverage(QUANTIZED_CHECKS)["method"])
    assert not covered["family"] & coverage(CATALOGUE_CHECKS)["family"]  # no family measured twice
    # The coverage is read off the configs: dropping the only fp16 check (full_recompute) shows up as a gap.
    gaps = missing_coverage([c for c in CHECKS if "train.precision=fp16" not in c.overrides] + CATALOGUE_CHECKS
                            + QUANTIZED_CHECKS)
    assert gaps == {"precision": {"fp16"}, "method": {"full_recompute"}}


def test_check_list_is_small_unique_and_fits_the_budget():
    names = [check.name for check in CHECKS]
    assert len(names) == len(set(names))
    gpu_runs = len(CHECKS) + sum(check.snapshot for check in CHECKS)
    assert 12 <= gpu_runs <= 20
    assert sum(check.snapshot for check in CHECKS) == 1
    assert sum(map(gpuchecks.gpu_seconds, CHECKS)) + gpurun.CARD_PROBE_S <= gpurun.DEFAULT_BUDGET_S < 8 * 60
    cases = set(gpurun.reference_peaks())
    referenced = [check.reference_case for check in CHECKS if check.reference_case]
    assert len(referenced) >= 2 and set(referenced) <= cases
    assert "llama-7b/lora_fa-bf16-adapters" in referenced


def test_dry_run_lists_checks_cost_and_coverage(capsys):
    assert gpurun.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for check in CHECKS:
        assert check.name in out
    assert "[llama, lora_fa, bf16, sdpa]" in out
    assert "Estimated GPU-lane time" in out
    assert "Not covered without --catalogue / --quantized: method dora, dora_recompute, qdora," in out
    assert "family bert, deberta-v2," in out
    assert gpurun.main(["--dry-run", "--catalogue", "--quantized"]) == 0
    out = capsys.readouterr().out
    assert all(check.name in out for check in CATALOGUE_CHECKS + QUANTIZED_CHECKS)
    assert "Coverage: every method, precision, attention implementation and family" in out


def test_refuses_without_gpu(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpurun.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "refusing to run" in err and "--dry-run" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name, key", [("NVIDIA H200", "nvidia-h200"),
                                       ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
                                       ("  NVIDIA A100-SXM4-40GB ", "nvidia-a100-sxm4-40gb"), ("", "unknown-gpu")])
def test_device_key(name, key):
    assert gpurun.device_key(name) == key


def test_simulated_device():
    assert gpurun.simulated_device("NVIDIA H200") == ("h200-141gb", None)
    assert gpurun.simulated_device("NVIDIA H100 80GB HBM3") == ("h100-80gb", None)
    key, note = gpurun.simulated_device("NVIDIA H200 NVL")
    assert key == "h200-141gb" and "NVL" in note
    assert gpurun.simulated_device("NVIDIA L4") == ("l4-24gb", None)
    key, note = gpurun.simulated_device("NVIDIA GeForce GTX 1080")  # a card with no profile
    assert key == "h100-80gb" and "no profile" in note


def test_h200_profile():
    from membench.devices import DEVICES, H100

    h200 = DEVICES["h200-141gb"]
    assert h200.total_memory_bytes == 143_771 * 2**20 == 150_754_820_096
    assert isinstance(h200.total_memory_bytes, int) and not h200.measured
    assert h200.runtime_overhead_bytes == H100.runtime_overhead_bytes == 2 * 32 * 2**20
    assert tiny("tiny-llama", "lora_fa", "backend.device=h200-141gb", backend="simulate").backend.device == "h200-141gb"


@pytest.fixture(scope="module")
def simulated_and_cuda():
    """A real simulate result of a tiny model, and a "cuda" copy with other numbers."""
    predicted = measure(tiny("tiny-llama", "lora_fa", backend="simulate")).to_dict()
    measured = copy.deepcopy(predicted)
    measured["env"]["backend"] = "cuda"
    measured["run_id"] = predicted["run_id"].replace("simulate-h100-80gb", "cuda")
    metrics = measured["metrics"]
    metrics["peak_allocated_bytes"] = predicted["metrics"]["peak_allocated_bytes"] + 1_000_000
    metrics["peak_reserved_bytes"] = 4_000_000
    metrics["activation_bytes"] = predicted["metrics"]["activation_bytes"] // 2
    metrics["step_time_s"] = 0.5
    return predicted, measured


def test_compare_differences(simulated_and_cuda):
    predicted, measured = simulated_and_cuda
    compared = gpurun.compare(measured, predicted)
    peak = compared["peak_allocated_bytes"]
    assert peak["difference"] == -1_000_000 and isinstance(peak["difference"], int)
    assert peak["difference_pct"] == round(100 * (peak["predicted"] / peak["measured"] - 1), 4) < 0
    activations = compared["activation_bytes"]
    assert activations["measured"] == predicted["metrics"]["activation_bytes"] // 2
    assert activations["difference"] == predicted["metrics"]["activation_bytes"] - activations["measured"]
    assert activations["difference_pct"] == pytest.approx(100.0, abs=0.1)
    reserved = compared["peak_reserved_bytes"]
    assert reserved["measured"] == 4_000_000
    if reserved["predicted"] is None:
        assert reserved["difference"] is None and reserved["difference_pct"] is None
    step = compared["step_time_s"]
    assert step["measured"] == 0.5
    assert (step["difference"] is None) == (predicted["metrics"]["step_time_s"] is None)


def test_check_summary_and_validation(tmp_path, simulated_and_cuda):
    from membench.results import Result

    predicted, measured = simulated_and_cuda
    paths = {label: write_result(Result.from_dict(data), tmp_path / "runs" / label)
             for label, data in (("cuda", measured), ("simulate-fake-cpu", predicted))}
    check = Check("tiny", ("model=tiny-llama", "method=lora_fa"), "test", reference_case="roberta-large/lora_fa")
    outcomes = {label: gpurun.Outcome("ok", 1.0, 0, str(path)) for label, path in paths.items()}
    outcomes["simulate-fake-cuda"] = gpurun.Outcome("skipped: budget")
    entry = gpurun.check_summary(check, outcomes)
    assert set(entry["comparisons"]) == {"simulate-fake-cpu"}
    assert entry["comparisons"]["simulate-fake-cpu"]["peak_allocated_bytes"]["difference"] == -1_000_000
    assert entry["runs"]["simulate-fake-cuda"]["state"] == "skipped: budget"
    assert entry["h100_reference"]["h100_peak_gib"] == "6.84"
    json.dumps(entry)  # summary.json-ready
    text = gpurun.write_validation(tmp_path).read_text()
    assert "## cuda vs simulate-fake-cpu" in text and "tiny-llama" in text
    assert "## cuda vs simulate-fake-cuda\n\nNo pair" in text


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_budget_guard_skips_and_records():
    clock = FakeClock()
    budget = gpurun.Budget(100, clock)
    ran = []

    def runner(argv, timeout_s):
        ran.append((argv[0], timeout_s))
        clock.now += 40  # each job takes 40 s
        return 0, "done"

    jobs = [gpurun.Job(f"check{n}", "cuda", [f"job{n}"], estimated_s=30) for n in range(4)]
    outcomes = gpurun.run_lanes(jobs, [], budget, lambda job: gpurun.execute(job, budget, runner))
    assert [argv for argv, _ in ran] == ["job0", "job1"]
    assert ran[1][1] == 60  # a job's timeout is what is left of the budget
    states = [outcomes[(f"check{n}", "cuda")].state for n in range(4)]
    assert states[:2] == ["failed", "failed"]  # ran, but wrote no result file
    assert states[2:] == ["skipped: budget"] * 2
    assert "20 s left" in outcomes[("check2", "cuda")].message


def test_timeout_is_recorded():
    budget = gpurun.Budget(100)
    outcome = gpurun.execute(gpurun.Job("c", "cuda", ["x"], 1), budget, lambda argv, timeout_s: (124, "killed"))
    assert outcome.state == "timeout"
    rc, output = gpurun.run_subprocess([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert rc == 124 and "killed after" in output


def test_probes_register_and_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(gpuchecks, "PROBES", [])

    @gpuchecks.probe("two-gpu", "needs two", estimated_s=1, gpus=2)
    def two(context):
        raise AssertionError("must not run on one GPU")

    @gpuchecks.probe("one", "runs", estimated_s=1)
    def one(context):
        return {"out": str(context.out), "left": context.remaining_s > 0}

    @gpuchecks.probe("slow", "too slow", estimated_s=10_000)
    def slow(context):
        raise AssertionError("must not start past the budget")

    with pytest.raises(ValueError):
        gpuchecks.probe("one", "again", estimated_s=1)(one)
    results = gpurun.run_probes(gpuchecks.PROBES, tmp_path, gpurun.Budget(100), gpus_visible=1)
    assert results["two-gpu"]["state"].startswith("skipped: needs 2 GPUs")
    assert results["one"]["state"] == "ok" and results["one"]["left"] is True
    assert results["slow"]["state"] == "skipped: budget"


def test_planned_jobs_find_the_files_membench_writes(tmp_path):
    """The kit finds each run's file by the run id it computes; the run must write exactly that file."""
    check = Check("tiny", ("model=tiny-llama", "method=lora_fa", "workload.batch_size=2", "workload.seq_len=16"), "t")
    gpu, cpu = gpurun.plan_jobs([check], tmp_path, "h200-141gb", fake_cuda=False)
    assert [job.label for job in gpu] == ["cuda"] and [job.label for job in cpu] == ["simulate-fake-cpu"]
    job = cpu[0]
    assert job.argv[1:3] == ["-m", "membench.cli"] and "backend.fake_device=cpu" in job.argv
    overrides = job.argv[3:]  # what the subprocess's Hydra command line composes
    run = gpuchecks.run_configs(Check("same", tuple(overrides), ""))
    assert run.results_dir == str(tmp_path / "runs" / "simulate-fake-cpu") and run.force
    written = write_result(measure(run), run.results_dir)
    assert written == job.result_path
    assert "--simulate-h200-141gb--" in written.name
    outcome = gpurun.execute(job, gpurun.Budget(100), lambda argv, timeout_s: (0, "ran"))
    assert (outcome.state, outcome.result_path) == ("ok", str(written))


def test_conf_tree_is_the_packaged_one():
    assert gpuchecks.CONF == CONF


# ---------------------------------------------------------------- issue 13: reserved memory on the GPU

MIB = 2**20


def _trace(*events):
    """A one-device snapshot dict from (action, addr, size) tuples (no segments: only the trace matters here)."""
    return {"segments": [], "device_traces": [[{"action": action, "addr": addr, "size": size, "stream": 0,
                                                 "time_us": time, "frames": []}
                                                for time, (action, addr, size) in enumerate(events)]]}


def test_compare_lists_allocator_figures_where_both_sides_have_them(simulated_and_cuda):
    predicted, measured = copy.deepcopy(simulated_and_cuda)
    predicted["metrics"].update(reserved_segments=7, num_alloc_retries=0, fragmentation_bytes=3 * MIB)
    measured["metrics"].update(reserved_segments=9, num_alloc_retries=0, fragmentation_bytes=None)
    measured["env"]["alloc_conf"] = predicted["env"]["alloc_conf"] = "expandable_segments:True"
    compared = gpurun.compare(measured, predicted)
    assert compared["reserved_segments"] == {"measured": 9, "predicted": 7, "difference": -2,
                                             "difference_pct": round(100 * (7 / 9 - 1), 4)}
    assert compared["num_alloc_retries"]["difference"] == 0 and compared["num_alloc_retries"]["difference_pct"] is None
    assert "fragmentation_bytes" not in compared  # cuda has no fragmentation figure: not compared
    assert compared["peak_reserved_bytes"]["measured"] == 4_000_000
    assert compared["alloc_conf"] == {"measured": "expandable_segments:True", "predicted": "expandable_segments:True"}


def test_snapshot_diff_reports_the_extra_workspace_and_the_missing_free():
    from membench.gpucheck.snapshot_diff import diff_allocations

    shared = [("alloc", 1, 4 * MIB), ("alloc", 2, 1000), ("free_requested", 1, 4 * MIB), ("free_completed", 1, 4 * MIB)]
    real = _trace(*shared, ("alloc", 3, 32 * MIB))  # a 32 MiB workspace; the 1000-byte tensor stays alive
    simulated = _trace(*shared, ("free_completed", 2, 1000))  # the simulation frees it
    diff = diff_allocations(real, simulated)
    assert diff["allocs_only_in_real"] == [{"size": 32 * MIB, "count": 1, "bytes": 32 * MIB}]
    assert diff["allocs_only_in_real_unmatched_bytes"] == 32 * MIB
    assert diff["allocs_only_in_simulated"] == [] and diff["frees_only_in_real"] == []
    assert diff["frees_only_in_simulated"] == [{"size": 1024, "count": 1, "bytes": 1024}]  # 1000 B rounds to 1 KiB
    assert (diff["real_allocs"], diff["simulated_allocs"], diff["real_frees"], diff["simulated_frees"]) == (3, 2, 1, 2)


@pytest.mark.parametrize("alloc_conf", ["", "expandable_segments:True"])
def test_replaying_a_model_snapshot_reproduces_its_peak_reserved(alloc_conf):
    from membench.caching_allocator import AllocatorSettings, CachingAllocatorModel
    from membench.gpucheck.snapshot_diff import compare_snapshots, replay_snapshot, snapshot_figures

    model = CachingAllocatorModel(AllocatorSettings.parse(alloc_conf or None))
    a, b, c = model.malloc(30 * MIB), model.malloc(5000), model.malloc(3 * MIB)
    model.free(a)
    d = model.malloc(50 * MIB)
    model.free(c)
    model.malloc(12 * MIB)
    model.free(d)
    model.empty_cache()  # segment frees/unmaps: the trace's peak is not the end
    snapshot = model.snapshot()
    figures = snapshot_figures(snapshot)
    assert figures["peak_reserved_bytes"] == model.peak_reserved > model.reserved == figures["reserved_bytes"]
    assert figures["segment_count"] == model.segment_count and figures["reserved_before_trace_bytes"] == 0
    replay = replay_snapshot(snapshot, AllocatorSettings.parse(alloc_conf or None))
    assert replay["peak_reserved_bytes"] == model.peak_reserved
    assert replay["replayed_allocs"] == 5 and replay["frees_of_unknown_blocks"] == 0
    report = compare_snapshots(snapshot, snapshot, alloc_conf)
    assert report["replay_vs_real"]["peak_reserved_bytes"]["difference"] == 0
    assert report["allocation_diff"]["allocs_only_in_real"] == report["allocation_diff"]["frees_only_in_simulated"] == []
    json.dumps(report)


def test_expandable_check_composes_on_both_backends():
    from membench.identity import result_id

    expandable = {check.name: check for check in CHECKS}["llama-7b-lora_fa-bf16-expandable"]
    base = {check.name: check for check in CHECKS}["llama-7b-lora_fa-bf16"]
    assert expandable.overrides == (*base.overrides, gpuchecks.EXPANDABLE)
    for backend in ("cuda", "simulate"):
        run = gpuchecks.run_configs(expandable, f"backend.name={backend}")
        assert run.backend.alloc_conf == "expandable_segments:True"
        assert gpuchecks.run_configs(base, f"backend.name={backend}").backend.alloc_conf == ""
    simulate = ("backend.name=simulate", "backend.device=h200-141gb")
    assert result_id(gpuchecks.run_configs(expandable, *simulate)) != result_id(gpuchecks.run_configs(base, *simulate))
    names = [entry.name for entry in gpuchecks.PROBES]
    assert "snapshot-replay" in names
    # On one card (the default budget's machine) the probes needing more GPUs are skipped.
    assert (sum(map(gpuchecks.gpu_seconds, CHECKS)) + gpurun.CARD_PROBE_S
            + sum(entry.estimated_s for entry in gpuchecks.PROBES if entry.gpus == 1) <= gpurun.DEFAULT_BUDGET_S)


def test_snapshot_replay_probe_reads_the_kit_snapshot(tmp_path):
    """The probe finds the snapshot check's pickle under snapshots/, replays it, and starts the simulate twin."""
    from membench.caching_allocator import CachingAllocatorModel
    from membench.gpucheck import probes
    from membench.reserved import write_snapshot

    model = CachingAllocatorModel()
    model.free(model.malloc(40 * MIB))
    model.malloc(1 * MIB)
    check = probes.snapshot_check()
    result = gpurun.result_path(check, tmp_path / "snapshots", list(probes.CUDA_SNAPSHOT))
    pickle_path = result.with_name(f"{result.stem}.snapshot.pickle")
    write_snapshot(model.snapshot(), pickle_path)
    result.write_text(json.dumps({"env": {"memory_snapshot": str(pickle_path), "alloc_conf": "",
                                          "device_name": "NVIDIA H200"}}))
    started = []

    def runner(argv, timeout_s):
        started.append(argv)
        return 1, "no simulation here"

    context = gpuchecks.ProbeContext(tmp_path, sys.executable, 100.0, runner)
    report = probes.snapshot_replay(context)
    assert report["replay_vs_real"]["peak_reserved_bytes"]["difference"] == 0
    assert report["real"]["peak_reserved_bytes"] == model.peak_reserved
    assert report["simulated_snapshot"] is None and "replay only" in report["message"]
    assert {"backend.name=simulate", "backend.memory_snapshot=true", "backend.device=h200-141gb"} <= set(started[0])
    assert (tmp_path / "logs" / f"{check.name}--snapshot-simulate.log").read_text() == "no simulation here"
    skipped = probes.snapshot_replay(gpuchecks.ProbeContext(tmp_path / "empty", sys.executable, 100.0, runner))
    assert skipped["state"].startswith("skipped: no snapshot")


def test_fsdp2_two_gpu_probe_needs_two_gpus_and_its_configs_compose(tmp_path):
    """Registered for two GPUs; both of its runs' configurations are valid (torchrun's and simulate's)."""
    from conftest import run_config
    from membench.gpucheck import parallel_probe

    entry = next(entry for entry in gpuchecks.PROBES if entry.name == "fsdp2-two-gpu")
    assert entry.gpus == 2
    argvs = parallel_probe.commands("python", tmp_path, "h100-80gb")
    assert argvs["cuda"][:6] == ["python", "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m"]
    for argv in argvs.values():
        overrides = [arg for arg in argv if "=" in arg and not arg.startswith("--")]
        run = run_config(*overrides)
        assert (run.parallel.strategy, run.parallel.world_size) == ("fsdp2", 2)
