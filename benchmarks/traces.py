"""What a symbolic trace costs and saves (issue 14: one more LLaMA-7B workload from a warm trace in at most 1 s).

    python benchmarks/traces.py [--repeats 3] [--out results/benchmarks/traces.json]

For each case, on ``simulate``: the median wall time of a direct simulation (``backend.trace=off``),
the time to record the case's symbolic trace (B, S, T and the LoRA rank symbolic), and the median
time to evaluate it for other workloads (another batch size, sequence length in the recorded
S % 32 class, and rank; reserved-memory replay included), each checked equal to the direct
simulation of that workload. ``record_over_direct`` is what a sweep weighs
(``membench.sweep.MIN_JOBS_PER_TRACE``). The first run of the process
(imports, Hydra) is discarded.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from membench.cli import CONF_DIR, to_run_config
from membench.results import write_rows
from membench.runner import measure
from membench.trace import evaluate, record_trace

#: case -> (overrides of the recorded run, the workloads evaluated from its trace: batch, seq, rank).
CASES = {
    "llama-7b lora bf16": (["model=llama-7b", "method=lora", "train.precision=bf16", "method.rank=64",
                            "workload.batch_size=4", "workload.seq_len=512"], [(6, 300, 64), (5, 512, 32), (11, 128, 8)]),
    "t5-large lora": (["model=t5-large", "method=lora", "method.rank=8", "workload.batch_size=8", "workload.seq_len=256"],
                      [(16, 256, 128), (3, 96, 16), (32, 256, 8)]),
    "roberta-base lora": (["model=roberta-base", "method=lora", "method.rank=8", "workload.batch_size=16",
                           "workload.seq_len=128"], [(32, 128, 128), (64, 128, 8), (7, 256, 24)]),
}
#: Issue 14's target for evaluating one more workload from a warm LLaMA-7B trace.
EVALUATE_TARGET_S = 1.0


def config(overrides: list[str], *extra: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_run_config(compose(config_name="config",
                                     overrides=[*overrides, "backend.name=simulate", "backend.trace=off", *extra]))


def seconds(function, *args) -> tuple[float, object]:
    gc.collect()  # the garbage of what ran before (a direct simulation's fake model) is not this call's cost
    started = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - started, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/traces.json"))
    args = parser.parse_args()
    measure(config(CASES["roberta-base lora"][0]))  # warm: imports, Hydra, transformers' lazy modules
    rows = []
    for case, (overrides, workloads) in CASES.items():
        run = config(overrides)
        direct = statistics.median(seconds(measure, run)[0] for _ in range(args.repeats))
        record, trace = seconds(record_trace, run)
        evaluations = []
        for batch, seq, rank in workloads:
            other = config(overrides, f"workload.batch_size={batch}", f"workload.seq_len={seq}", f"method.rank={rank}")
            spent, evaluated = seconds(evaluate, trace, other)
            if evaluated.metrics != measure(other).metrics:
                raise SystemExit(f"{case} at b{batch} s{seq} r{rank}: the trace differs from direct simulation")
            evaluations.append(spent)
        evaluation = statistics.median(evaluations)
        rows.append({"case": case, "median_direct_s": round(direct, 3), "record_s": round(record, 3),
                     "record_over_direct": round(record / direct, 2), "median_evaluate_s": round(evaluation, 3),
                     "evaluated_workloads": [f"b{b} s{s} r{r}" for b, s, r in workloads],
                     "evaluate_target_s": EVALUATE_TARGET_S if case.startswith("llama-7b") else None,
                     "repeats": args.repeats})
        print(f"{case}: direct {direct:.2f} s, recording {record:.2f} s ({record / direct:.1f} direct runs), "
              f"evaluating another workload {evaluation:.3f} s (equal to direct at {len(workloads)} workloads)")
    write_rows(args.out, rows, "simulate")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
