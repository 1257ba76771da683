"""The report's tables, as DataFrames of display strings (GiB appears here and in figures only)."""

from __future__ import annotations

import pandas as pd

from membench.report.compare import GIB, default_knobs, gib, side_by_side, unit

METHOD_LABELS = {"full": "full", "lora": "LoRA", "lora_fa": "LoRA-FA", "lora_recompute": "LoRA+recompute",
                 "lora_fa_recompute": "LoRA-FA+recompute", "full_recompute": "full+recompute",
                 "qlora": "QLoRA", "qlora_fa": "QLoRA-FA", "qlora_recompute": "QLoRA+recompute",
                 "qlora_fa_recompute": "QLoRA-FA+recompute", "dora": "DoRA", "dora_recompute": "DoRA+recompute",
                 "qdora": "QDoRA", "qdora_recompute": "QDoRA+recompute"}


def ratio(value, oom: bool = False) -> str:
    if value is None or pd.isna(value):
        return "—"
    return f"{value:.2f}×" + (" (OOM)" if oom else "")


def setting_label(row) -> str:
    """``bs32 seq128 fp32`` plus whatever differs from the defaults (eager, dropout, bf16 adapters)."""
    parts = [f"bs{row['batch_size']}", f"seq{row['seq_len']}", row["precision"]]
    if row.get("attn_implementation") == "eager":
        parts.append("eager")
    dropout = row.get("lora_dropout")
    if dropout is not None and not pd.isna(dropout) and dropout > 0:
        parts.append(f"dropout {row['lora_dropout']:g}")
    if row.get("adapter_dtype") == "base" and row["precision"] not in ("fp32", "bf16-autocast"):
        parts.append(f"{row['precision']} adapters")
    optimizer = row.get("optimizer")
    if isinstance(optimizer, str) and optimizer != "adamw":
        parts.append(optimizer)
    return " ".join(parts)


def _peak(row, method: str, size: int = GIB) -> str:
    value = row.get(f"peak_{method}")
    if value is None or pd.isna(value):
        return "—"
    return gib(value, size) + (" OOM" if row.get(f"status_{method}") == "oom" else "")


def comparison_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model x workload x rank: each method's peak (GiB) and the ratios the paper is about."""
    table = side_by_side(frame)
    if table.empty:
        return pd.DataFrame()
    methods = [m for m in METHOD_LABELS if f"peak_{m}" in table]
    name, size = unit(frame)
    rows = []
    for _, row in table.iterrows():
        rows.append({
            "model": row["model"], "setting": setting_label(row),
            "r": "—" if pd.isna(row["rank"]) else str(row["rank"]),
            **{f"{METHOD_LABELS[m]} ({name})": _peak(row, m, size) for m in methods},
            "LoRA/LoRA-FA": ratio(row["lora_over_lora_fa"], bool(row["oom_in_ratio"])),
            "LoRA/LoRA-FA reserved": ratio(row.get("reserved_lora_over_lora_fa")),
            "activations LoRA/LoRA-FA": ratio(row["act_lora_over_lora_fa"]),
            "full/LoRA-FA": ratio(row["full_over_lora_fa"]),
            "recompute time": "—" if pd.isna(row["recompute_time_overhead"])
            else f"{row['recompute_time_overhead']:+.0%}",
        })
    return pd.DataFrame(rows)


def breakdown_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every run: peak and where it goes (weights, gradients, optimizer state, activations, saved tensors)."""
    name, size = unit(frame)
    paged = "paged_optimizer_state_bytes" in frame and frame["paged_optimizer_state_bytes"].fillna(0).gt(0).any()
    rows = []
    for _, run in frame.iterrows():
        rows.append({
            "model": run["model"], "method": METHOD_LABELS.get(run["method"], run["method"]),
            "r": "—" if pd.isna(run["rank"]) else str(run["rank"]), "setting": setting_label(run),
            "status": run["status"], f"peak ({name})": gib(run.get("peak_allocated_bytes"), size),
            # The caching allocator's segments (measured on cuda, modelled on simulate/cpu; — for older results)
            f"reserved ({name})": gib(run.get("peak_reserved_bytes"), size),
            "fragmentation": gib(run.get("fragmentation_bytes"), size),
            "weights": gib(run.get("weight_bytes"), size), "gradients": gib(run.get("gradient_bytes"), size),
            "optimizer": gib(run.get("optimizer_state_bytes"), size),
            # A paged optimizer's state in CUDA managed memory: outside the peak (column only where a run has it)
            **({"paged optimizer": gib(run.get("paged_optimizer_state_bytes"), size)} if paged else {}),
            "activations": gib(run.get("activation_bytes"), size),
            "saved for backward": gib(run.get("saved_tensor_bytes"), size),
            "step (ms)": "—" if pd.isna(run.get("step_time_s")) else f"{run['step_time_s'] * 1000:.0f}",
        })
    return pd.DataFrame(rows)


def headline_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One comparable workload per model: all of full, LoRA, LoRA-FA and LoRA+recompute, largest batch.

    Defaults-only settings (sdpa, no dropout, PEFT's adapter dtype) are preferred.
    """
    table = side_by_side(frame)
    needed = [f"peak_{m}" for m in ("full", "lora", "lora_fa", "lora_recompute")]
    if table.empty or not all(c in table for c in needed):
        return pd.DataFrame()
    table = table.dropna(subset=needed)
    plain = default_knobs(table)
    table = table[plain] if plain.any() else table
    picked = table.sort_values(["batch_size", "rank"]).groupby("model", sort=False).tail(1)
    return picked.sort_values("peak_full")


def headline_table(frame: pd.DataFrame) -> pd.DataFrame:
    rows = headline_rows(frame)
    name, size = unit(frame)
    out = []
    for _, row in rows.iterrows():
        out.append({"model": row["model"], "setting": setting_label(row) + f" r{row['rank']}",
                    f"full ({name})": _peak(row, "full", size), f"LoRA ({name})": _peak(row, "lora", size),
                    f"LoRA-FA ({name})": _peak(row, "lora_fa", size),
                    f"LoRA+recompute ({name})": _peak(row, "lora_recompute", size),
                    "LoRA/LoRA-FA": ratio(row["lora_over_lora_fa"], bool(row["oom_in_ratio"])),
                    "full/LoRA-FA": ratio(row["full_over_lora_fa"])})
    return pd.DataFrame(out)


__all__ = ["GIB", "breakdown_table", "comparison_table", "headline_rows", "headline_table"]
