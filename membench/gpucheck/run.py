"""Run the checks: the idle card, each configuration on cuda and simulate, the probes; then the files.

Two lanes share the budget. The GPU lane runs one process at a time (the card probe, each check's
``cuda`` run, the snapshot run, the probes), so no measured run shares the card with another
measurement. The CPU lane runs the simulations beside it in a small pool; at most one of them uses
fake CUDA tensors at a time (such a process holds a CUDA context of a few hundred MiB, outside the
allocator, so it cannot move a measured run's allocator figures, and the cuda backend tolerates 2 GiB
of foreign memory). Before a job starts, the budget guard checks that its estimated seconds fit what
is left; a job that does not fit is recorded as ``skipped: budget`` and is not started, and every
process is killed when the budget runs out (``timeout``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from membench.gpucheck.checks import PROBES, SNAPSHOT_RUN_S, Check, Probe, ProbeContext, gpu_seconds, \
    missing_coverage, run_configs, selected

DEFAULT_OUT = "results/gpu"
DEFAULT_BUDGET_S = 420  # 7 minutes of runs leave 1 of the 8 for start-up and the summary
CPU_WORKERS = 3
# A simulation's wall seconds on a few CPU cores: imports (~10 s) plus the fake step; a 7B model takes longer.
SIMULATE_SMALL_S = 15
SIMULATE_LARGE_S = 35
CARD_PROBE_S = 20
SIMULATIONS = ("simulate-fake-cpu", "simulate-fake-cuda")
FIGURES = ("peak_allocated_bytes", "peak_reserved_bytes", "activation_bytes", "step_time_s")
# The caching allocator's other figures: compared only where both results carry them (cuda reads
# segments and retries from torch.cuda.memory_stats but has no fragmentation figure of its own).
ALLOCATOR_FIGURES = ("fragmentation_bytes", "reserved_segments", "num_alloc_retries")


def device_key(name: str) -> str:
    """Folder name for a GPU: ``torch.cuda.get_device_name()`` lower-cased, non-alphanumerics as dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def simulated_device(name: str) -> tuple[str, Optional[str]]:
    """The ``backend.device`` profile that simulates this GPU, and a note when none matches it exactly."""
    from membench.devices import DEVICES

    for profile in DEVICES.values():
        if profile.name == name:
            return profile.key, None
    for profile in DEVICES.values():  # "NVIDIA H200 NVL" -> h200-141gb: same chip, its own capacity
        if profile.name.startswith("NVIDIA") and name.startswith(profile.name):
            return profile.key, f"no profile named {name!r}; simulated as {profile.key} ({profile.name})"
    return "h100-80gb", f"no profile for {name!r}; simulated as h100-80gb (capacity and workspaces may differ)"


class Budget:
    """Wall seconds left of ``total_s``; ``clock`` is injectable for tests."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = total_s
        self.clock = clock
        self.started = clock()
        self.lock = threading.Lock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        return max(0.0, self.total_s - self.elapsed())

    def allows(self, estimated_s: float) -> bool:
        return estimated_s <= self.remaining()


@dataclass
class Job:
    """One process: a check's run on one backend, the snapshot run, or a probe."""

    check: str
    label: str  # cuda | simulate-fake-cpu | simulate-fake-cuda | snapshot | probe
    argv: list[str]
    estimated_s: float
    result_path: Optional[Path] = None
    log_path: Optional[Path] = None


@dataclass
class Outcome:
    state: str  # ok | oom | error (the run's status) | failed (no result) | timeout | skipped: <why>
    wall_s: float = 0.0
    returncode: Optional[int] = None
    result_path: Optional[str] = None
    message: Optional[str] = None


def run_subprocess(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """(exit status, stdout+stderr); on timeout the whole process group is killed and 124 returned."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=max(1.0, timeout_s))
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return 124, (output or "") + f"\n[membench-gpucheck: killed after {timeout_s:.0f} s: budget]"


def execute(job: Job, budget: Budget, runner: Callable[[list[str], float], tuple[int, str]] = run_subprocess
            ) -> Outcome:
    """Run ``job`` if its estimate fits the budget; read back its result file's status."""
    if not budget.allows(job.estimated_s):
        return Outcome("skipped: budget", message=f"estimated {job.estimated_s:.0f} s, {budget.remaining():.0f} s left")
    started = time.monotonic()
    returncode, output = runner(job.argv, budget.remaining())
    wall_s = round(time.monotonic() - started, 1)
    if job.log_path is not None:
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        job.log_path.write_text(output)
    if returncode == 124:
        return Outcome("timeout", wall_s, returncode, message="killed: the budget ran out")
    if job.result_path is not None and job.result_path.is_file():
        status = json.loads(job.result_path.read_text())["status"]
        return Outcome(status["state"], wall_s, returncode, str(job.result_path),
                       (status.get("message") or "").splitlines()[0] if status.get("message") else None)
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return Outcome("failed", wall_s, returncode, message=f"exit {returncode}, no result file: {tail}")


def run_lanes(gpu_jobs: list[Job], cpu_jobs: list[Job], budget: Budget, run_one: Callable[[Job], Outcome],
              workers: int = CPU_WORKERS) -> dict[tuple[str, str], Outcome]:
    """GPU jobs one after another in this thread; CPU jobs in a pool beside them (fake-CUDA ones one at a time)."""
    fake_cuda = threading.Semaphore(1)

    def cpu_lane(job: Job) -> Outcome:
        if job.label == "simulate-fake-cuda":
            with fake_cuda:
                return run_one(job)
        return run_one(job)

    outcomes: dict[tuple[str, str], Outcome] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {(job.check, job.label): pool.submit(cpu_lane, job) for job in cpu_jobs}
        for job in gpu_jobs:
            outcomes[(job.check, job.label)] = run_one(job)
        for key, future in futures.items():
            outcomes[key] = future.result()
    return outcomes


# ---------------------------------------------------------------- summary


def compare(measured: dict[str, Any], predicted: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per figure: measured, predicted, predicted - measured and 100 x (predicted / measured - 1).

    Every figure of :data:`FIGURES` is listed (None where a side lacks it); those of
    :data:`ALLOCATOR_FIGURES` (fragmentation, segment count, cudaMalloc retries) only where both
    sides have them. ``alloc_conf`` gives each side's allocator settings (like for like: both runs
    get the check's ``backend.alloc_conf``).

    Args:
        measured, predicted: Result dicts (``membench.results.Result.to_dict()``). Bytes and counts are
            integers; ``step_time_s`` is seconds (a simulated step is not timed like a GPU one: CPU seconds).
    """
    out: dict[str, Any] = {}
    for figure in FIGURES + ALLOCATOR_FIGURES:
        real, guess = measured["metrics"].get(figure), predicted["metrics"].get(figure)
        if figure in ALLOCATOR_FIGURES and (real is None or guess is None):
            continue
        entry: dict[str, Any] = {"measured": real, "predicted": guess, "difference": None, "difference_pct": None}
        if real is not None and guess is not None:
            entry["difference"] = guess - real if figure != "step_time_s" else round(guess - real, 6)
            entry["difference_pct"] = round(100 * (guess / real - 1), 4) if real else None
        out[figure] = entry
    out["alloc_conf"] = {"measured": measured.get("env", {}).get("alloc_conf"),
                         "predicted": predicted.get("env", {}).get("alloc_conf")}
    return out


def reference_peaks() -> dict[str, str]:
    """``case`` -> H100 peak in GiB (or ``oom``) from membench/data/h100_reference.csv."""
    from membench.files import read_commented_csv
    from membench.report.validate import REFERENCE

    return {row["case"]: row["h100_peak_gib"] for row in read_commented_csv(REFERENCE)}


def check_summary(check: Check, outcomes: dict[str, Outcome]) -> dict[str, Any]:
    """One check's entry in summary.json: its runs and, per simulation, the differences against cuda."""
    def result(label: str) -> Optional[dict]:
        outcome = outcomes.get(label)
        if outcome is None or outcome.result_path is None or outcome.state not in ("ok", "oom"):
            return None
        return json.loads(Path(outcome.result_path).read_text())

    entry: dict[str, Any] = {"overrides": list(check.overrides), "why": check.why,
                             "runs": {label: dataclasses.asdict(outcome) for label, outcome in outcomes.items()},
                             "comparisons": {}}
    measured = result("cuda")
    for label in SIMULATIONS:
        predicted = result(label)
        if measured is not None and predicted is not None:
            entry["comparisons"][label] = compare(measured, predicted)
    if check.reference_case:
        h100 = reference_peaks().get(check.reference_case)
        entry["h100_reference"] = {"case": check.reference_case, "h100_peak_gib": h100}
        if measured is not None and measured["metrics"].get("peak_allocated_bytes") is not None:
            entry["h100_reference"]["measured_peak_gib"] = round(measured["metrics"]["peak_allocated_bytes"] / 2**30, 3)
    snapshot = result("snapshot")
    if snapshot is not None:
        entry["snapshot"] = {"file": snapshot["env"].get("memory_snapshot"),
                             "error": snapshot["env"].get("memory_snapshot_error"),
                             "peak_allocated_bytes": snapshot["metrics"].get("peak_allocated_bytes")}
    return entry


# ---------------------------------------------------------------- the kit


def result_path(check: Check, directory: Path, backend: list[str]) -> Path:
    from membench.identity import result_id

    return directory / f"{result_id(run_configs(check, *backend))}.json"


def plan_jobs(checks: list[Check], out: Path, device: str, fake_cuda: bool) -> tuple[list[Job], list[Job]]:
    """(GPU-lane jobs, CPU-lane jobs) for ``checks``, writing under ``out``."""
    python = sys.executable
    gpu, cpu = [], []
    backends = {"cuda": ["backend.name=cuda"],
                "simulate-fake-cpu": ["backend.name=simulate", f"backend.device={device}", "backend.fake_device=cpu"],
                "simulate-fake-cuda": ["backend.name=simulate", f"backend.device={device}",
                                       "backend.fake_device=cuda"]}
    for check in checks:
        large = check.estimated_s > 30
        for label, backend in backends.items():
            if label == "simulate-fake-cuda" and not fake_cuda:
                continue
            directory = out / "runs" / label
            job = Job(check.name, label,
                      [python, "-m", "membench.cli", *check.overrides, *backend, f"results_dir={directory}", "force=true"],
                      check.estimated_s if label == "cuda" else (SIMULATE_LARGE_S if large else SIMULATE_SMALL_S),
                      result_path(check, directory, backend), out / "logs" / f"{check.name}--{label}.log")
            (gpu if label == "cuda" else cpu).append(job)
            if label == "cuda" and check.snapshot:
                snapshot = [*backend, "backend.memory_snapshot=true"]
                gpu.append(Job(check.name, "snapshot",
                               [python, "-m", "membench.cli", *check.overrides, *snapshot,
                                f"results_dir={out / 'snapshots'}", "force=true"],
                               SNAPSHOT_RUN_S, result_path(check, out / "snapshots", snapshot),
                               out / "logs" / f"{check.name}--snapshot.log"))
    return gpu, cpu


def card_probe(budget: Budget) -> dict[str, Any]:
    """The idle card, read in a fresh process (membench.gpucheck.card) before anything else runs."""
    returncode, output = run_subprocess([sys.executable, "-m", "membench.gpucheck.card"], budget.remaining())
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if returncode != 0 or not lines:
        raise RuntimeError(f"the card probe failed (exit {returncode}): {output.strip()[-500:]}")
    return json.loads(lines[-1])


def run_probes(probes: list[Probe], out: Path, budget: Budget, gpus_visible: int,
               runner: Callable[[list[str], float], tuple[int, str]] = run_subprocess) -> dict[str, Any]:
    """Each registered probe's dict, or why it did not run."""
    results: dict[str, Any] = {}
    for entry in probes:
        if entry.gpus > gpus_visible:
            results[entry.name] = {"state": f"skipped: needs {entry.gpus} GPUs, {gpus_visible} visible"}
        elif not budget.allows(entry.estimated_s):
            results[entry.name] = {"state": "skipped: budget"}
        else:
            started = time.monotonic()
            try:
                value = entry.function(ProbeContext(out, sys.executable, budget.remaining(), runner))
                results[entry.name] = {"state": "ok", **value}
            except Exception as error:  # noqa: BLE001 - one probe's failure must not lose the others
                results[entry.name] = {"state": "error", "message": f"{type(error).__name__}: {error}"}
            results[entry.name]["wall_s"] = round(time.monotonic() - started, 1)
    return results


def write_validation(out: Path) -> Path:
    """validation.md: membench.report.validate's tables, once per simulation (fake CUDA, fake CPU)."""
    from membench.report import validate
    from membench.report.load import load_results
    from membench.report.render import markdown

    text = ["# Simulation vs this GPU\n",
            "Made by `membench-gpucheck` with `membench.report.validate` (error = simulated / measured - 1).\n"]
    for label in reversed(SIMULATIONS):
        frame, _ = load_results(out / "runs" / "cuda", out / "runs" / label, warn=False)
        pairs = validate.pairs_display(validate.backend_pairs(frame)) if not frame.empty else frame
        text.append(f"## cuda vs {label}\n")
        if pairs.empty:
            text.append("No pair of finished runs.\n")
            continue
        text += [validate.summary(frame) + "\n", markdown(pairs)]
    path = out / "validation.md"
    path.write_text("\n".join(text))
    return path


def environment(card: dict[str, Any], device: str, note: Optional[str]) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    from membench.devices import DEVICES
    from membench.results import provenance

    profile = DEVICES[device]
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "git_sha": provenance().get("git_sha"),
            "git_dirty": provenance().get("git_dirty"), "card": card,
            "simulated_as": {"device": device, "note": note, "profile_total_memory_bytes": profile.total_memory_bytes,
                             "profile_runtime_overhead_bytes": profile.runtime_overhead_bytes,
                             "profile_measured": profile.measured}}


def readme(command: str, summary: dict[str, Any]) -> str:
    states = [run["state"] for check in summary["checks"].values() for run in check["runs"].values()]
    skipped = sorted({state for state in states if state.startswith("skipped") or state in ("timeout", "failed")})
    card = summary["environment"]["card"]
    return "\n".join([
        f"# GPU check: {card.get('name')}\n",
        f"Run on {summary['created_at']} with `{command}` (budget {summary['budget_s']} s, "
        f"took {summary['elapsed_s']} s), membench {summary['environment']['git_sha']}, torch "
        f"{summary['environment']['torch']}, transformers {summary['environment']['transformers']}, "
        f"PEFT {summary['environment']['peft']}.\n",
        f"{len(summary['checks'])} checks, {states.count('ok')} runs ok, {states.count('oom')} oom, "
        f"{states.count('error')} error" + (f"; not finished: {', '.join(skipped)}" if skipped else "") + ".\n",
        "- `summary.json`: per check, cuda against each simulation (peak allocated, peak reserved, activations, "
        "step time: bytes and %; segments, retries and fragmentation where both sides have them), "
        "the snapshot-replay probe (the real snapshot through the allocator model), the idle card (`environment.card`: capacity, `mem_get_info`, cuBLAS "
        "workspaces), versions.",
        "- `validation.md`: membench.report.validate's tables for these runs.",
        "- `runs/cuda`, `runs/simulate-fake-cpu`, `runs/simulate-fake-cuda`: the result JSONs.",
        "- `snapshots/`: an allocator snapshot (open it at https://pytorch.org/memory_viz).",
        "- `logs/`: each process's output.",
    ]) + "\n"


def dry_run(checks: list[Check], out: str, budget_s: float) -> str:
    """The checks, their estimated cost and coverage: what ``--dry-run`` prints."""
    import torch

    fake_cuda = torch.backends.cuda.is_built()
    lines = [f"membench-gpucheck: {len(checks)} checks -> {out}/<device-key>/ (budget {budget_s:.0f} s)", ""]
    width = max(len(check.name) for check in checks)
    for number, check in enumerate(checks, 1):
        run = run_configs(check, "backend.name=simulate")
        covers = f"{run.model.model_type}, {run.method.name}, {run.train.precision}, {run.model.attn_implementation}"
        extra = [f"H100 ref {check.reference_case}"] * bool(check.reference_case) + ["+snapshot"] * check.snapshot
        lines.append(f"{number:>2}. {check.name:<{width}}  ~{gpu_seconds(check):>3} s GPU  "
                     f"[{covers}]{'  ' + '; '.join(extra) if extra else ''}")
        lines.append(f"    {check.why}")
    gpu_s = CARD_PROBE_S + sum(gpu_seconds(check) for check in checks)
    gpu_s += sum(entry.estimated_s for entry in PROBES)
    lines += ["", f"Probes: card (idle capacity, cuBLAS workspaces, ~{CARD_PROBE_S} s)"
              + "".join(f"; {entry.name} (~{entry.estimated_s} s, {entry.gpus} GPU)" for entry in PROBES),
              f"Runs per check: cuda, simulate-fake-cpu" + (", simulate-fake-cuda" if fake_cuda else
                                                           " (no simulate-fake-cuda: this torch has no CUDA)"),
              f"Estimated GPU-lane time: ~{gpu_s} s (simulations run beside it on the CPU)"]
    missing = missing_coverage(checks)
    lines.append("Coverage: every method, precision, attention implementation and family" if not missing else
                 "Not covered without --catalogue / --quantized: " + "; ".join(f"{axis} {', '.join(sorted(values))}" for axis, values in missing.items()))
    return "\n".join(lines)


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="membench-gpucheck", description=(
        "Measure a small set of configurations on this GPU and compare them with simulate; "
        "writes <out>/<device-key>/."))
    parser.add_argument("--out", default=DEFAULT_OUT, help="parent folder (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall seconds for all runs; checks that do not fit are skipped (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a subset: one check per model family")
    parser.add_argument("--catalogue", action="store_true",
                        help="also one check per catalogue family (gpt2, bert, deberta, gemma, phi3, qwen3, MoE); "
                             "raise --budget-s to about 660 for them")
    parser.add_argument("--quantized", action="store_true",
                        help="also QLoRA, QDoRA and DoRA (bitsandbytes 4-bit layers, PEFT DoRA) on 4 blocks of "
                             "Llama 3.1 8B; raise --budget-s by about 200 for them")
    parser.add_argument("--dry-run", action="store_true", help="list the checks, their cost and coverage; run nothing")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """The ``membench-gpucheck`` command; returns the exit status (2: no GPU, 1: a run failed)."""
    import torch

    args = parse(argv)
    checks = selected(args.quick, args.catalogue, args.quantized)
    if args.dry_run:
        print(dry_run(checks, args.out, args.budget_s))
        return 0
    if not torch.cuda.is_available():
        reason = "this torch has no CUDA" if not torch.backends.cuda.is_built() else "no CUDA GPU is visible"
        print(f"membench-gpucheck: refusing to run: {reason}; run it on a GPU machine, or use --dry-run",
              file=sys.stderr)
        return 2
    budget = Budget(args.budget_s)
    card = card_probe(budget)
    out = Path(args.out) / device_key(card["name"])
    device, note = simulated_device(card["name"])
    print(f"membench-gpucheck: {card['name']} -> {out} (simulated as {device}); budget {args.budget_s:.0f} s",
          flush=True)
    gpu_jobs, cpu_jobs = plan_jobs(checks, out, device, fake_cuda=True)

    def run_one(job: Job) -> Outcome:
        outcome = execute(job, budget)
        print(f"  {job.check} [{job.label}]: {outcome.state} ({outcome.wall_s} s)", flush=True)
        return outcome

    outcomes = run_lanes(gpu_jobs, cpu_jobs, budget, run_one)
    probes = run_probes(PROBES, out, budget, torch.cuda.device_count())
    summary = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": "membench-gpucheck " + " ".join(sys.argv[1:] if argv is None else argv),
               "budget_s": args.budget_s, "elapsed_s": round(budget.elapsed(), 1),
               "environment": environment(card, device, note),
               "checks": {check.name: check_summary(check, {label: outcome for (name, label), outcome
                                                            in outcomes.items() if name == check.name})
                          for check in checks},
               "probes": probes}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_validation(out)
    (out / "README.md").write_text(readme(summary["command"], summary))
    failed = [key for key, outcome in outcomes.items() if outcome.state in ("error", "failed")]
    print(f"membench-gpucheck: wrote {out}/summary.json, validation.md, README.md in {budget.elapsed():.0f} s"
          + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0
