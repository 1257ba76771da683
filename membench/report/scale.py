"""Several GPUs in the report: per-GPU peak against the number of GPUs (FSDP2), and the fewest that fit.

Read off runs with ``parallel.world_size > 1``: one line per model, method and per-GPU batch, with
the capacities of an 80 GB and a 141 GB card drawn across (what ``torch.cuda`` reports for an H100
80GB and an H200, from membench.devices).
"""

from __future__ import annotations

import pandas as pd

from membench.report.tables import METHOD_LABELS

GIB = 1 << 30
CARDS = ("h100-80gb", "h200-141gb")


def has_parallel(frame: pd.DataFrame) -> bool:
    return "world_size" in frame and bool((frame["world_size"].fillna(1) > 1).any())


def _runs(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["world_size"].fillna(1) > 1) & frame["status"].isin(["ok", "oom"])]


def _capacities() -> dict[str, int]:
    from membench.devices import DEVICES

    return {DEVICES[key].name: DEVICES[key].total_memory_bytes for key in CARDS if key in DEVICES}


def fewest_gpus_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model, method, batch and seq: per-GPU peak (GiB) at each world size, and the fewest GPUs that fit each card
    (among the world sizes run: "≤ 8" when the smallest one run already fits, "> 64" when none does)."""
    runs = _runs(frame)
    if runs.empty:
        return pd.DataFrame()
    capacities = _capacities()
    rows = []
    keys = ["model", "method", "precision", "batch_size", "seq_len"]
    for key, group in runs.groupby(keys, sort=True):
        peaks = group.set_index("world_size")["peak_allocated_bytes"].sort_index()
        row = dict(zip(keys, key))
        row["method"] = METHOD_LABELS.get(row["method"], row["method"])
        row.update({f"{size} GPUs": f"{peak / GIB:.1f}" for size, peak in peaks.items()})
        for name, capacity in capacities.items():
            fitting = [size for size, peak in peaks.items() if peak <= capacity]
            smallest = min(peaks.index)
            row[f"fewest ({name})"] = ((f"≤ {smallest}" if min(fitting) == smallest else str(min(fitting)))
                                       if fitting else f"> {max(peaks.index)}")
        rows.append(row)
    return pd.DataFrame(rows)


def peak_vs_world_size(frame: pd.DataFrame):
    """Per-GPU peak (GiB, log) against world size, one panel per model and batch, one line per method."""
    import matplotlib.pyplot as plt

    from membench.report.figures import COLORS

    runs = _runs(frame)
    panels = runs[["model", "batch_size", "seq_len"]].drop_duplicates().sort_values(["model", "batch_size"]).values
    fig, grid = plt.subplots(1, max(len(panels), 1), figsize=(5.4 * max(len(panels), 1), 4.0), squeeze=False)
    for ax, (model, batch, seq) in zip(grid[0], panels):
        panel = runs[(runs["model"] == model) & (runs["batch_size"] == batch) & (runs["seq_len"] == seq)]
        for method, lines in panel.groupby("method", sort=False):
            lines = lines.sort_values("world_size")
            ax.plot(lines["world_size"], lines["peak_allocated_bytes"] / GIB, marker="o",
                    color=COLORS.get(method, None), label=METHOD_LABELS.get(method, method))
        for name, capacity in _capacities().items():
            ax.axhline(capacity / GIB, color="black", linestyle="--", linewidth=0.8)
            ax.text(panel["world_size"].min(), capacity / GIB, f" {name}", fontsize=7, va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(panel["world_size"].unique()), [str(w) for w in sorted(panel["world_size"].unique())])
        ax.set_xlabel("GPUs (FSDP2)")
        ax.set_ylabel("peak per GPU (GiB)")
        ax.set_title(f"{model}, batch {batch} per GPU, seq {seq}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Per-GPU peak against the number of GPUs; dashed: the cards' capacity", fontsize=9)
    fig.tight_layout()
    return fig
