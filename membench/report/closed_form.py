"""Analytic (closed-form) activation bytes next to the measured ones, per run.

:mod:`membench.analytic` predicts ``saved_tensor_bytes`` and ``activation_bytes`` from the
architecture alone; this table checks it against every result, and shows how far LoRA-FA is
from its physical minimum (what must be kept without recomputation).
"""

from __future__ import annotations

import warnings

import pandas as pd

from membench.report.compare import GIB
from membench.report.tables import METHOD_LABELS, setting_label
from membench.results import read_result

GOAL = 0.05  # issue goal: analytic within 5% of measured


def analytic_vs_measured(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run the model covers: measured, analytic, relative error (bytes are ints)."""
    from membench.analytic import estimate_config

    rows = []
    done = frame[(frame["status"] == "ok") & frame["saved_tensor_bytes"].notna()]
    for _, run in done.iterrows():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                estimate = estimate_config(read_result(run["path"]).config)
        except (NotImplementedError, ValueError) as error:  # a family the closed form does not cover
            rows.append({"run_id": run["run_id"], "model": run["model"], "method": run["method"],
                         "skipped": f"{type(error).__name__}: {error}"})
            continue
        rows.append({
            "run_id": run["run_id"], "model": run["model"], "method": run["method"], "rank": run["rank"],
            "setting": setting_label(run),
            "saved_measured": int(run["saved_tensor_bytes"]), "saved_analytic": estimate.saved_bytes,
            "saved_error": estimate.saved_bytes / run["saved_tensor_bytes"] - 1,
            "activation_measured": int(run["activation_bytes"]), "activation_analytic": estimate.activation_bytes,
            "activation_error": estimate.activation_bytes / run["activation_bytes"] - 1,
            "lora_fa_minimum": estimate.lora_fa_minimum_bytes,
        })
    return pd.DataFrame(rows)


def display(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty or "saved_measured" not in table:
        return pd.DataFrame()
    table = table.dropna(subset=["saved_measured"])
    rows = []
    for _, row in table.iterrows():
        over_minimum = row["saved_measured"] / row["lora_fa_minimum"] if row["method"] == "lora_fa" else None
        rows.append({
            "model": row["model"], "method": METHOD_LABELS.get(row["method"], row["method"]),
            "r": "—" if pd.isna(row["rank"]) else str(int(row["rank"])), "setting": row["setting"],
            "saved, measured (GiB)": f"{row['saved_measured'] / GIB:.3f}",
            "saved, analytic (GiB)": f"{row['saved_analytic'] / GIB:.3f}", "error": f"{row['saved_error']:+.2%}",
            "activations error": f"{row['activation_error']:+.2%}",
            "LoRA-FA minimum (GiB)": f"{row['lora_fa_minimum'] / GIB:.3f}",
            "LoRA-FA / minimum": "—" if over_minimum is None else f"{over_minimum:.2f}×",
        })
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> str:
    if table.empty or "saved_error" not in table or table["saved_error"].isna().all():
        return "No run the closed form covers."
    covered = table.dropna(subset=["saved_error"])
    worst = covered.loc[covered["saved_error"].abs().idxmax()]
    worst_act = covered.loc[covered["activation_error"].abs().idxmax()]
    skipped = len(table) - len(covered)
    return (f"Analytic vs measured over {len(covered)} runs: worst saved-tensor error {worst['saved_error']:+.3%} "
            f"({worst['model']} {worst['method']} {worst['setting']}), worst activation error "
            f"{worst_act['activation_error']:+.3%} (goal: within {GOAL:.0%})."
            + (f" {skipped} runs of families it does not cover were skipped." if skipped else ""))
