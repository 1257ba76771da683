"""Predicted reserved memory against the H100's, reproducing the process the measurements ran in.

    python -m membench.reserved_reference [--out results/calibration/h100_reserved.json]

The three H100 figures (``membench/data/h100_reserved_reference.csv``) were measured in one process,
run after run, with ``gc.collect(); torch.cuda.empty_cache()`` between them. Each configuration is
simulated with its allocation log recorded; the logs are replayed in that order through one
caching-allocator model (:func:`membench.reserved.replay_process`). Nothing is fitted: the table
says how far each prediction is from the measurement. Minutes on a laptop CPU, no GPU, no memory.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from membench.files import check_writable_dir, read_commented_csv

REFERENCE = Path(__file__).parent / "data" / "h100_reserved_reference.csv"
GIB = 1 << 30


def reference_rows() -> list[dict]:
    return read_commented_csv(REFERENCE)


def predict(rows: list[dict]) -> list[dict]:
    """Simulate each row with its log recorded, then replay the logs in one modelled process."""
    from hydra import compose, initialize_config_dir

    from membench.backends import create_backend
    from membench.cli import CONF_DIR, to_run_config
    from membench.plan import plan
    from membench.reserved import process_history, replay_process
    from membench.runner import execute

    histories, allocated = [], []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for row in rows:
            overrides = [*row["overrides"].split(), "backend.name=simulate", "backend.device=h100-80gb",
                         "backend.trace=off"]
            run = to_run_config(compose(config_name="config", overrides=overrides))
            backend = create_backend(run.backend)
            events = backend.tracker.record()
            result = execute(plan(run), backend)
            histories.append(process_history(events, run.workload.warmup_steps))
            allocated.append(result.metrics["peak_allocated_bytes"])
    figures = replay_process(histories)
    table = []
    for row, figure, peak in zip(rows, figures, allocated, strict=True):
        measured = round(float(row["h100_peak_reserved_gib"]) * GIB)
        table.append({"case": row["case"], "predicted_peak_reserved_bytes": figure.peak_reserved_bytes,
                      "h100_peak_reserved_bytes": measured, "predicted_peak_allocated_bytes": peak,
                      "error": (figure.peak_reserved_bytes - measured) / measured,
                      "fragmentation_bytes": figure.fragmentation_bytes, "reserved_segments": figure.reserved_segments})
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m membench.reserved_reference", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/calibration/h100_reserved.json"))
    args = parser.parse_args(argv)
    from membench.results import write_rows

    check_writable_dir(args.out.parent)
    table = predict(reference_rows())
    print("| case | predicted reserved (GiB) | H100 reserved (GiB) | error |")
    print("|---|---|---|---|")
    for row in table:
        print(f"| {row['case']} | {row['predicted_peak_reserved_bytes'] / GIB:.2f} | "
              f"{row['h100_peak_reserved_bytes'] / GIB:.2f} | {row['error']:+.2%} |")
    write_rows(args.out, table, "simulate")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
