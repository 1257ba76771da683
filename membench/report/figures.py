"""The report's figures (matplotlib): each saved as PNG and PDF, GiB on the axes.

All functions take the DataFrame of :func:`membench.report.load.load_results` and
return a Figure; :func:`save_all` writes them. Only plain runs are plotted in the
sweeps (sdpa, no adapter dropout, PEFT's adapter dtype) unless a model has none.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from membench.report.compare import GIB, default_knobs, side_by_side
from membench.report.tables import METHOD_LABELS, headline_rows

PARTS = (("weight_bytes", "weights"), ("gradient_bytes", "gradients"), ("optimizer_state_bytes", "optimizer state"),
         ("activation_bytes", "activations"))
COLORS = {"full": "tab:gray", "full_recompute": "silver", "lora": "tab:blue", "lora_recompute": "tab:cyan",
          "lora_fa": "tab:red", "lora_fa_recompute": "tab:orange", "qlora": "tab:purple", "qlora_fa": "tab:pink",
          "qlora_recompute": "tab:olive", "dora": "tab:green", "qdora": "tab:brown"}


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    runs = frame[frame["status"].isin(["ok", "oom"]) & frame["peak_allocated_bytes"].notna()]
    plain = default_knobs(runs)
    keep = []
    for _, group in runs.groupby("model", sort=False):
        mask = plain.loc[group.index]
        chosen = group[mask] if mask.any() else group
        main = chosen["precision"].mode().iloc[0]  # one precision per panel
        keep.append(chosen[chosen["precision"] == main])
    return pd.concat(keep) if keep else runs


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _gpu_line(ax, runs: pd.DataFrame) -> None:
    """The card's memory as a dashed line: above it, a run does not fit."""
    total = runs["device_total_memory_bytes"].dropna()
    if total.empty or runs["peak_allocated_bytes"].max() < 0.5 * total.max():
        return  # far below the card: the line would squash the curves
    capacity = int(total.max())
    name = runs["device_name"].dropna().iloc[0] if runs["device_name"].notna().any() else "GPU"
    ax.axhline(capacity / GIB, color="black", linestyle="--", linewidth=1)
    ax.annotate(f"{name}: {capacity / GIB:.1f} GiB", (0.02, capacity / GIB), xycoords=("axes fraction", "data"),
                va="bottom", fontsize=7)


def _sweep(frame: pd.DataFrame, x: str, fixed: str, title: str, xlabel: str, log2: bool) -> plt.Figure:
    runs = _plain(frame)
    models = [m for m in _by_size(runs) if runs[runs["model"] == m][x].nunique() > 1]
    if not models:
        return _empty(title, f"no model has more than one {xlabel.lower()}")
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models, strict=True):
        group = runs[runs["model"] == model]
        adapters = group[group["kind"] != "full"]
        # Hold the other axis where the most methods, then the most points, were measured.
        held = None
        if fixed in group and adapters[fixed].notna().any():
            cover = adapters.groupby(fixed).agg(methods=("method", "nunique"), points=(x, "nunique"))
            best = cover[(cover["methods"] == cover["methods"].max())]
            best = best[best["points"] == best["points"].max()]
            held = best.index.min() if fixed == "rank" else best.index.max()
        for method in [m for m in METHOD_LABELS if m in set(group["method"])]:
            series = group[group["method"] == method]
            if held is not None and method.startswith("lora") and (series[fixed] == held).any():
                series = series[series[fixed] == held]
            series = series.sort_values(x).drop_duplicates(x)
            if series[x].nunique() < 2 and x == "rank":
                continue
            peak = series["peak_allocated_bytes"].astype(float) / GIB
            ax.plot(series[x], peak, marker="o", markersize=3, color=COLORS.get(method), label=METHOD_LABELS[method])
            oom = series["status"] == "oom"
            ax.scatter(series[x][oom], peak[oom], marker="x", s=50, color=COLORS.get(method), zorder=3)
        _gpu_line(ax, group)
        held_label = f", {fixed.replace('_', ' ')} {held}" if held is not None else ""
        ax.set_title(f"{model} ({group['precision'].iloc[0]}, seq {group['seq_len'].iloc[0]}{held_label})",
                     fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("peak allocated (GiB)")
        if log2:
            ax.set_xscale("log", base=2)
            ticks = sorted(group[x].dropna().unique())
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.suptitle(title)  # before the layout, which then keeps the panel titles below it
    _figure_legend(fig, axes, "× = out of memory")
    return fig


def _by_size(runs: pd.DataFrame) -> list[str]:
    """Model names, smallest first (by parameter count), so panels read like the paper's tables."""
    sizes = runs.groupby("model")["total_params"].max().fillna(0) if "total_params" in runs else None
    names = list(dict.fromkeys(runs["model"]))
    return sorted(names, key=lambda m: (sizes[m] if sizes is not None else 0, m))


def _figure_legend(fig: plt.Figure, axes: list, title: str = "") -> None:
    """One legend under all panels, with every method any panel drew.

    Lays the figure out (``tight_layout``), so call it after ``fig.suptitle``: the layout makes room
    for a title that exists, not for one added later.
    """
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=len(entries), fontsize=8,
               title=title or None, title_fontsize=7, frameon=False)


def peak_vs_batch(frame: pd.DataFrame) -> plt.Figure:
    return _sweep(frame, "batch_size", "rank", "Peak memory vs batch size", "batch size", log2=True)


def peak_vs_rank(frame: pd.DataFrame) -> plt.Figure:
    return _sweep(frame, "rank", "batch_size", "Peak memory vs LoRA rank", "rank r", log2=True)


def breakdown(frame: pd.DataFrame) -> plt.Figure:
    """Stacked weights / gradients / optimizer / activations per method at each model's headline workload."""
    rows = headline_rows(frame)
    runs = frame[frame["status"].isin(["ok", "oom"])]
    if rows.empty:  # no complete comparison: one bar per method at each model's largest batch
        rows = runs.sort_values("batch_size").groupby("model").tail(1)
    models = [m for m in _by_size(runs) if m in set(rows["model"])]
    if not models:
        return _empty("Where the memory goes", "no results")
    fig, axes = _panels(len(models), width=4.6)
    for ax, model in zip(axes, models, strict=True):
        setting = rows[rows["model"] == model].iloc[0]
        same = runs[(runs["model"] == model) & (runs["batch_size"] == setting["batch_size"])
                    & (runs["seq_len"] == setting["seq_len"]) & (runs["precision"] == setting["precision"])]
        same = same[(same["kind"] == "full") | (same["rank"] == setting.get("rank"))] if "rank" in setting else same
        same = same[same["attn_implementation"] == setting["attn_implementation"]]
        same = same[same["lora_dropout"].fillna(0) == 0]
        same = same[same["adapter_dtype"].fillna(setting.get("adapter_dtype") or "fp32")
                    == (setting.get("adapter_dtype") or "fp32")]
        methods = [m for m in METHOD_LABELS if m in set(same["method"])]
        bottom = np.zeros(len(methods))
        for key, label in PARTS:
            values = np.array([float(same[same["method"] == m][key].fillna(0).iloc[0]) / GIB for m in methods])
            ax.bar([METHOD_LABELS[m] for m in methods], values, bottom=bottom, label=label)
            bottom += values
        peaks = [float(same[same["method"] == m]["peak_allocated_bytes"].iloc[0]) / GIB for m in methods]
        ax.scatter([METHOD_LABELS[m] for m in methods], peaks, marker="_", s=600, color="black", zorder=3,
                   label="peak")
        rank = "" if pd.isna(setting.get("rank")) else f" r{setting['rank']}"
        ax.set_title(f"{model} bs{setting['batch_size']} seq{setting['seq_len']}{rank}", fontsize=9)
        ax.set_ylabel("GiB")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Where the memory goes: weights, gradients, optimizer state and activations; black tick: peak")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def ratio_heatmap(frame: pd.DataFrame) -> plt.Figure:
    """LoRA/LoRA-FA peak ratio over batch size x rank, one panel per model; bold where ≥ 1.4."""
    table = side_by_side(_plain(frame))
    if table.empty or "lora_over_lora_fa" not in table or table["lora_over_lora_fa"].isna().all():
        return _empty("LoRA / LoRA-FA peak ratio", "no LoRA and LoRA-FA pairs")
    table = table.dropna(subset=["lora_over_lora_fa"])
    models = [m for m in _by_size(frame) if m in set(table["model"])]
    fig, axes = _panels(len(models), width=3.8, height=3.2)
    fig.set_layout_engine("constrained")
    lo, hi = float(table["lora_over_lora_fa"].min()), float(table["lora_over_lora_fa"].max())
    image = None
    for ax, model in zip(axes, models, strict=True):
        grid = table[table["model"] == model].pivot_table(index="batch_size", columns="rank",
                                                          values="lora_over_lora_fa", aggfunc="first")
        image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", vmin=min(lo, 1.0), vmax=max(hi, 1.4),
                          aspect="auto", origin="lower")
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns])
        ax.set_yticks(range(len(grid.index)), [str(i) for i in grid.index])
        for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value < (lo + hi) / 2 else "black",
                        fontweight="bold" if value >= 1.4 else "normal")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("rank r")
        ax.set_ylabel("batch size")
    fig.colorbar(image, ax=axes, shrink=0.8, label="LoRA / LoRA-FA peak (bold: ≥ 1.4×)")
    fig.suptitle("How much less memory LoRA-FA needs than LoRA")
    return fig


def time_vs_peak(frame: pd.DataFrame) -> plt.Figure:
    """Step time against peak memory per method: the Pareto view (needs measured step times)."""
    runs = frame[(frame["status"] == "ok") & frame["step_time_s"].notna()]
    if runs.empty:
        return _empty("Step time vs peak memory", "no step times: these runs were simulated.\n"
                      "Measure on a GPU (backend.name=cuda) for the time/memory trade-off.")
    models = _by_size(runs)
    fig, axes = _panels(len(models))
    for ax, model in zip(axes, models, strict=True):
        group = runs[runs["model"] == model]
        for method in [m for m in METHOD_LABELS if m in set(group["method"])]:
            series = group[group["method"] == method]
            ax.scatter(series["peak_allocated_bytes"].astype(float) / GIB, series["step_time_s"] * 1000,
                       color=COLORS.get(method), label=METHOD_LABELS[method], s=18)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("peak allocated (GiB)")
        ax.set_ylabel("step time (ms)")
        ax.grid(alpha=0.3)
    fig.suptitle("Step time vs peak memory (lower left is better)")
    _figure_legend(fig, axes)
    return fig


def _empty(title: str, message: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10)
    fig.suptitle(title)
    return fig


FIGURES = {"peak_vs_batch": peak_vs_batch, "peak_vs_rank": peak_vs_rank, "breakdown": breakdown,
           "ratio_heatmap": ratio_heatmap, "time_vs_peak": time_vs_peak}


def save_all(frame: pd.DataFrame, directory: Path) -> list[Path]:
    """Every figure as ``<name>.png`` (150 dpi) and ``<name>.pdf``."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES.items():
        written += save_figure(draw(frame), directory, name)
    return written


def save_figure(fig: plt.Figure, directory: Path, name: str) -> list[Path]:
    """``fig`` as ``<name>.png`` (150 dpi) and ``<name>.pdf`` (no creation date: rebuilt byte for byte); closes it."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in ("png", "pdf"):
        path = directory / f"{name}.{suffix}"
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata={"CreationDate": None} if suffix == "pdf" else None)
        written.append(path)
    plt.close(fig)
    return written
