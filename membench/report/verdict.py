"""The verdict on LoRA-FA's claim: "up to 1.4x" less total memory than LoRA (arXiv 2308.03303).

For every workload where both LoRA and LoRA-FA ran, the ratio of peaks and of
activations, and whether the peak ratio reaches the claim. Then what moves the
ratio, read off the data: runs that differ in one knob only (adapter dtype,
adapter dropout, precision, attention implementation), and the share of
activations in LoRA's peak.

Why the share matters: peak = W + A (W = weights, gradients, optimizer state;
A = activations and the backward's working set). LoRA-FA removes part of A only,
so LoRA/LoRA-FA = (W + A_lora) / (W + A_lora_fa), which can approach the
activation ratio A_lora / A_lora_fa only when A dominates W.
"""

from __future__ import annotations

import pandas as pd

from membench.report.compare import row_key, side_by_side
from membench.report.load import ADAPTER, SETTING
from membench.report.tables import ratio, setting_label

CLAIM = 1.4
KNOBS = {"adapter_dtype": "adapter dtype", "lora_dropout": "adapter dropout", "precision": "precision",
         "attn_implementation": "attention"}


def pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """Workloads with both a LoRA and a LoRA-FA peak (recompute variants excluded)."""
    table = side_by_side(frame)
    if table.empty or "peak_lora" not in table or "peak_lora_fa" not in table:
        return pd.DataFrame()
    table = table.dropna(subset=["peak_lora", "peak_lora_fa"]).copy()
    table["reaches_claim"] = table["lora_over_lora_fa"] >= CLAIM
    return table.reset_index(drop=True)


def verdict_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One display row per LoRA/LoRA-FA pair."""
    rows = []
    for _, row in pairs(frame).iterrows():
        rows.append({
            "model": row["model"], "setting": setting_label(row), "r": str(row["rank"]),
            "LoRA/LoRA-FA peak": ratio(row["lora_over_lora_fa"], bool(row["oom_in_ratio"])),
            "LoRA/LoRA-FA reserved": ratio(row.get("reserved_lora_over_lora_fa")),
            "LoRA/LoRA-FA activations": ratio(row["act_lora_over_lora_fa"]),
            "activation share (LoRA)": "—" if pd.isna(row["activation_share_lora"])
            else f"{row['activation_share_lora']:.0%}",
            f"≥ {CLAIM}×": "yes" if row["reaches_claim"] else "no",
        })
    return pd.DataFrame(rows)


def headline(frame: pd.DataFrame) -> str:
    """One sentence: how often the claim holds, the range, and where the best case is."""
    table = pairs(frame)
    if table.empty:
        return "No configuration has both a LoRA and a LoRA-FA result; no verdict."
    hits = int(table["reaches_claim"].sum())
    best = table.loc[table["lora_over_lora_fa"].idxmax()]
    worst = table.loc[table["lora_over_lora_fa"].idxmin()]
    oom = " (LoRA predicted out of memory)" if best["oom_in_ratio"] else ""
    return (f"LoRA's peak is at least {CLAIM}× LoRA-FA's in {hits} of {len(table)} configurations. "
            f"The ratio ranges from {worst['lora_over_lora_fa']:.2f}× ({worst['model']}, {setting_label(worst)}, "
            f"r{worst['rank']}) to {best['lora_over_lora_fa']:.2f}× ({best['model']}, {setting_label(best)}, "
            f"r{best['rank']}{oom}); the median is {table['lora_over_lora_fa'].median():.2f}×.")


def reserved_effect(frame: pd.DataFrame) -> str:
    """Whether the ratio changes when taken on peak reserved memory (what decides an OOM) instead of allocated."""
    table = pairs(frame)
    if table.empty:
        return ""
    if "reserved_lora_over_lora_fa" not in table:
        return "No result has a reserved-memory figure (written before reserved memory was modelled)."
    table = table.dropna(subset=["reserved_lora_over_lora_fa"])
    if table.empty:
        return "No LoRA/LoRA-FA pair has reserved-memory figures (written before reserved memory was modelled)."
    change = (table["reserved_lora_over_lora_fa"] - table["lora_over_lora_fa"]).astype(float)
    hits = int((table["reserved_lora_over_lora_fa"] >= CLAIM).sum())
    worst = table.loc[change.abs().idxmax()]
    return (f"On peak reserved memory (the caching allocator's segments, fragmentation included) the ratio is "
            f"{table['reserved_lora_over_lora_fa'].min():.2f}–{table['reserved_lora_over_lora_fa'].max():.2f}× "
            f"(median {table['reserved_lora_over_lora_fa'].median():.2f}×) over {len(table)} configurations; it "
            f"moves from the allocated ratio by {change.min():+.2f} to {change.max():+.2f} (largest: {worst['model']}, "
            f"{setting_label(worst)}, r{worst['rank']}); reserved reaches {CLAIM}× in {hits} of them.")


def knob_effects(frame: pd.DataFrame) -> pd.DataFrame:
    """Pairs of runs that differ in exactly one knob: the ratio with each value of it."""
    table = pairs(frame)
    rows = []
    for knob, label in KNOBS.items():
        others = [c for c in (*SETTING, *ADAPTER) if c != knob]
        key = row_key(table, others)
        for _, group in table.groupby(key):
            if group[knob].nunique(dropna=False) < 2:
                continue
            first = group.iloc[0]
            values = "; ".join(f"{v if v is not None and not pd.isna(v) else '—'}: {r:.2f}×"
                               for v, r in zip(group[knob], group["lora_over_lora_fa"], strict=True))
            rows.append({"knob": label, "model": first["model"],
                         "setting": f"bs{first['batch_size']} seq{first['seq_len']} r{first['rank']}",
                         "LoRA/LoRA-FA by value": values})
    return pd.DataFrame(rows)


def share_effect(frame: pd.DataFrame) -> str:
    """How the ratio tracks the share of activations in LoRA's peak, in one sentence per band."""
    table = pairs(frame).dropna(subset=["activation_share_lora"])
    if table.empty:
        return ""
    bands = pd.cut(table["activation_share_lora"].astype(float), [0, 0.5, 0.7, 0.85, 1.0],
                   labels=["under 50%", "50–70%", "70–85%", "over 85%"])
    lines = []
    for band, group in table.groupby(bands, observed=True):
        lines.append(f"- activations {band} of LoRA's peak ({len(group)} configurations): LoRA/LoRA-FA "
                     f"{group['lora_over_lora_fa'].min():.2f}–{group['lora_over_lora_fa'].max():.2f}×, "
                     f"activation ratio {group['act_lora_over_lora_fa'].min():.2f}–"
                     f"{group['act_lora_over_lora_fa'].max():.2f}×")
    return "\n".join(lines)
