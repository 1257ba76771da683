"""What the caching-allocator model adds to a LLaMA-7B simulation's wall time (issue 13: at most 20%).

    python benchmarks/reserved_overhead.py [--repeats 3] [--out results/benchmarks/reserved_overhead.json]

Runs LLaMA-7B LoRA and LoRA-FA (bf16, bs16, seq512, r64) on ``simulate`` directly (no trace), timing
the whole run and, inside it, :func:`membench.reserved.account` (process history, replay, figures).
The overhead is account's time over the rest of the run; recording the log (one tuple append per
allocation) is inside the rest, so the figure slightly understates the full cost of reserved memory.
Medians over ``--repeats`` runs; the first run of the process (imports, Hydra) is discarded.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

import membench.reserved
from membench.cli import CONF_DIR, to_run_config
from membench.results import write_rows
from membench.runner import measure

CASES = {
    "llama-7b lora": ["model=llama-7b", "method=lora"],
    "llama-7b lora_fa": ["model=llama-7b", "method=lora_fa"],
}
COMMON = ["method.rank=64", "train.precision=bf16", "workload.batch_size=16", "workload.seq_len=512",
          "backend.name=simulate", "backend.trace=off"]


def timed_run(overrides: list[str]) -> tuple[float, float]:
    """(whole run, inside account) in seconds."""
    spent = []
    original = membench.reserved.account

    def account(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    membench.reserved.account = account
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            run = to_run_config(compose(config_name="config", overrides=overrides + COMMON))
        started = time.perf_counter()
        measure(run)  # measures; writes nothing (the CLI writes results)
        total = time.perf_counter() - started
    finally:
        membench.reserved.account = original
    return total, sum(spent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/reserved_overhead.json"))
    args = parser.parse_args()
    timed_run(CASES["llama-7b lora_fa"])  # warm: imports, Hydra, transformers' lazy modules
    rows = []
    for case, overrides in CASES.items():
        samples = [timed_run(overrides) for _ in range(args.repeats)]
        total = statistics.median(s[0] for s in samples)
        replay = statistics.median(s[1] for s in samples)
        rows.append({"case": case, "median_run_s": round(total, 3), "median_account_s": round(replay, 3),
                     "overhead": round(replay / (total - replay), 4), "repeats": args.repeats})
        print(f"{case}: run {total:.2f} s, of which the allocator model {replay:.2f} s "
              f"(+{replay / (total - replay):.0%} over the simulation without it)")
    write_rows(args.out, rows, "simulate")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
