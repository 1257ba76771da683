"""Runs side by side: one row per workload x adapter config, one column per method.

Ratios are taken between runs that differ only in the method: same model,
workload, numerics, backend and device, and (for LoRA vs LoRA-FA) the same
rank, adapter dtype, dropout and targets. Full fine-tuning has no adapter
config, so it is matched on the workload alone.

A ratio involving an OOM run is kept with a flag: on ``simulate`` the peak of
an OOM run is the predicted peak (a real number above the card's memory); on
``cuda`` it is where the run died, so the ratio is a lower bound.
"""

from __future__ import annotations

import pandas as pd

from membench.report.load import ADAPTER, SETTING

GIB = 1 << 30
METHOD_ORDER = ("full", "full_recompute", "lora", "lora_recompute", "lora_fa", "lora_fa_recompute")


def _measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a peak to compare: ok, and OOM (its peak is predicted or where it died)."""
    return frame[frame["status"].isin(["ok", "oom"]) & frame["peak_allocated_bytes"].notna()]


def row_key(frame: pd.DataFrame, columns) -> pd.Series:
    """One string per row from ``columns`` (missing values as ∅): rows equal on them get equal keys."""
    parts = [frame[c].astype("string").fillna("∅") for c in columns]
    out = parts[0]
    for part in parts[1:]:
        out = out + "|" + part
    return out


def default_knobs(frame: pd.DataFrame) -> pd.Series:
    """Rows with the defaults: sdpa attention, no adapter dropout, PEFT's fp32 adapters (or no adapters)."""
    return ((frame["attn_implementation"] == "sdpa") & (frame["lora_dropout"].fillna(0) == 0)
            & (frame["adapter_dtype"].fillna("fp32") == "fp32"))


def side_by_side(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (workload, adapter config) with each method's peak, activations, state and time.

    Columns: the SETTING and ADAPTER keys, then ``peak_<method>``, ``activation_<method>``,
    ``status_<method>``, ``step_time_<method>`` for each method present, then
    ``lora_over_lora_fa`` (peak ratio), ``reserved_lora_over_lora_fa`` (the same on peak reserved
    memory; NaN for results without it), ``act_lora_over_lora_fa`` (activation ratio),
    ``full_over_lora_fa``, ``recompute_time_overhead`` (lora_recompute / lora step time - 1),
    ``activation_share_lora`` (LoRA's activations / its peak) and ``oom_in_ratio``.
    """
    runs = _measured(frame).copy()
    if runs.empty:
        return pd.DataFrame()
    if "peak_reserved_bytes" not in runs:  # results written before reserved memory was modelled
        runs["peak_reserved_bytes"] = pd.NA
    runs["_setting"] = row_key(runs, SETTING)
    adapters = runs[runs["kind"] != "full"]
    full = runs[runs["kind"] == "full"]
    base = adapters.drop_duplicates(["_setting", *ADAPTER])[[*SETTING, *ADAPTER, "_setting"]]
    if base.empty:  # only full fine-tuning: one row per workload
        base = full.drop_duplicates("_setting")[[*SETTING, "_setting"]].assign(**{c: None for c in ADAPTER})
    table = base.reset_index(drop=True)
    table["_adapter"] = row_key(table, ADAPTER)
    runs["_adapter"] = row_key(runs, ADAPTER)
    for method in [m for m in METHOD_ORDER if m in set(runs["method"])] + sorted(
            set(runs["method"]) - set(METHOD_ORDER)):
        subset = runs[runs["method"] == method]
        on = ["_setting"] if subset["kind"].iloc[0] == "full" else ["_setting", "_adapter"]
        picked = subset[[*on, "peak_allocated_bytes", "peak_reserved_bytes", "activation_bytes", "status",
                         "step_time_s"]].rename(columns={
            "peak_allocated_bytes": f"peak_{method}", "peak_reserved_bytes": f"reserved_{method}",
            "activation_bytes": f"activation_{method}",
            "status": f"status_{method}", "step_time_s": f"step_time_{method}"})
        table = table.merge(picked.drop_duplicates(on), on=on, how="left")
    table["lora_over_lora_fa"] = _ratio(table, "peak_lora", "peak_lora_fa")
    table["reserved_lora_over_lora_fa"] = _ratio(table, "reserved_lora", "reserved_lora_fa")
    table["act_lora_over_lora_fa"] = _ratio(table, "activation_lora", "activation_lora_fa")
    table["full_over_lora_fa"] = _ratio(table, "peak_full", "peak_lora_fa")
    table["recompute_time_overhead"] = _ratio(table, "step_time_lora_recompute", "step_time_lora") - 1
    table["activation_share_lora"] = _ratio(table, "activation_lora", "peak_lora")
    table["oom_in_ratio"] = (table.get("status_lora") == "oom") | (table.get("status_lora_fa") == "oom")
    return table.drop(columns=["_setting", "_adapter"])


def _ratio(table: pd.DataFrame, numerator: str, denominator: str) -> pd.Series:
    if numerator not in table or denominator not in table:
        return pd.Series(float("nan"), index=table.index)
    return table[numerator].astype("Float64") / table[denominator].astype("Float64")


def unit(frame: pd.DataFrame) -> tuple[str, int]:
    """Display unit for a table: GiB, or MiB when every peak is below 1 GiB (tiny models)."""
    peaks = frame["peak_allocated_bytes"].dropna() if "peak_allocated_bytes" in frame else pd.Series(dtype=float)
    return ("MiB", 1 << 20) if len(peaks) and peaks.max() < GIB else ("GiB", GIB)


def gib(value, size: int = GIB) -> str:
    """Display only: bytes in ``size`` units (GiB unless told) with two decimals, '—' when missing."""
    return "—" if value is None or pd.isna(value) else f"{value / size:.2f}"
