"""analytic.md: the symbolic walk and Korthikanti's closed form next to the measured activations, per run.

Two models from :mod:`membench.analytic`, checked against every finished result:

* the symbolic walk of the forward pass (:func:`membench.analytic.estimate`), which counts
  each saved tensor op by op. It is compared with the kernels the result ran (a CPU build of
  torch saves different bytes in three kernels: :func:`membench.analytic.measured_kernels`),
  and is expected to be exact; the difference is in bytes, and the bytes a CPU-built run
  misses against CUDA are a column of their own;
* Korthikanti et al.'s closed form ``s b h (34 + 5 a s / h)`` per layer with LoRA terms
  (:func:`membench.analytic.korthikanti_for_run`), the formula papers quote, as a ratio to the
  measured saved-tensor bytes.

It also shows how far LoRA-FA is from its physical minimum (what must be kept without recomputation).
"""

from __future__ import annotations

import json

import warnings
from pathlib import Path

import pandas as pd

from membench.report.compare import GIB
from membench.report.tables import METHOD_LABELS, setting_label
from membench.results import read_result

KORTHIKANTI_COLUMNS = ("model", "method", "runs", "formula / measured (min)", "formula / measured (max)")

KORTHIKANTI_EXPLANATION = (
    "Korthikanti et al.'s s·b·h·(34 + 5·a·s/h) bytes per layer (arXiv 2205.05198; LoRA adds each adapted "
    "layer's cast copy of X and the r-wide XA, LoRA-FA only XA; recompute keeps each layer's input) is a "
    "formula for a GPT layer: a 4h GeLU MLP, dropout everywhere, attention that materialises the s×s "
    "probabilities, and nothing outside the layers. It overstates runs with fused (SDPA) attention, which "
    "keeps no s×s tensor, and models without dropout (LLaMA: no masks); it understates what it leaves out: "
    "the loss's fp32 log-probabilities (n·V·4 bytes for a causal LM), embeddings and head, fp32 norm "
    "statistics and RMSNorm copies, autocast casts, LLaMA's wider gated MLP (2·I inputs, I ≠ 4h), T5's "
    "cross-attention and relative bias. Under recompute it counts only the layer inputs, while the head and "
    "loss stay, so its ratio there is lowest. The symbolic walk counts all of these op by op."
)


def _kernels_difference(run, the_plan, kernels: str, walk) -> int:
    """Bytes a result measured with CPU kernels misses against CUDA's (0 for CUDA results)."""
    from membench.analytic import estimate

    if kernels == "cuda":
        return 0
    return estimate(run, "cuda", the_plan).saved_bytes - walk.saved_bytes


def analytic_vs_measured(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run: measured, the walk, their difference in bytes, Korthikanti's formula (ints)."""
    from membench.analytic import estimate, korthikanti_for_run, measured_kernels, run_from_config
    from membench.plan import plan

    rows = []
    # A plan builds a meta model (about a second for a 7B); what the walk reads from it (the HF config,
    # the adapted layers) depends on the model, the method and the weight dtype, never on the workload.
    plans: dict[str, object] = {}
    done = frame[(frame["status"] == "ok") & frame["saved_tensor_bytes"].notna()]
    for _, row in done.iterrows():
        result = read_result(row["path"])
        kernels = measured_kernels(result.env)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run = run_from_config(result.config)
                key = json.dumps([result.config["model"], result.config["method"], run.train.precision],
                                 sort_keys=True)
                the_plan = plans[key] if key in plans else plans.setdefault(key, plan(run))
                walk = estimate(run, kernels, the_plan)
                difference = _kernels_difference(run, the_plan, kernels, walk)
                formula = korthikanti_for_run(run, the_plan)
        except (NotImplementedError, ValueError) as error:  # a family the walk does not cover
            rows.append({"run_id": row["run_id"], "model": row["model"], "method": row["method"],
                         "skipped": f"{type(error).__name__}: {error}"})
            continue
        saved, activation = int(row["saved_tensor_bytes"]), int(row["activation_bytes"])
        rows.append({
            "run_id": row["run_id"], "model": row["model"], "method": row["method"], "rank": row["rank"],
            "setting": setting_label(row), "kernels": kernels,
            "saved_measured": saved, "saved_analytic": walk.saved_bytes,
            "saved_difference": walk.saved_bytes - saved,
            "activation_measured": activation, "activation_analytic": walk.activation_bytes,
            "activation_difference": walk.activation_bytes - activation,
            "cuda_minus_cpu_kernels": difference,
            "korthikanti": formula, "korthikanti_ratio": formula / saved,
            "lora_fa_minimum": walk.lora_fa_minimum_bytes,
        })
    return pd.DataFrame(rows)


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The per-run table: the walk's difference in bytes, Korthikanti's ratio, LoRA-FA against its minimum."""
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
            "walk − measured, saved (B)": str(int(row["saved_difference"])),
            "walk − measured, activations (B)": str(int(row["activation_difference"])),
            "CUDA − CPU kernels (B)": str(int(row["cuda_minus_cpu_kernels"])),
            "Korthikanti / measured": f"{row['korthikanti_ratio']:.2f}",
            "LoRA-FA minimum (GiB)": f"{row['lora_fa_minimum'] / GIB:.3f}",
            "LoRA-FA / minimum": "—" if over_minimum is None else f"{over_minimum:.2f}×",
        })
    return pd.DataFrame(rows)


def korthikanti_by_method(table: pd.DataFrame) -> pd.DataFrame:
    """Korthikanti's formula over the measured saved bytes, per model and method: the range over runs."""
    if table.empty or "korthikanti_ratio" not in table:
        return pd.DataFrame(columns=KORTHIKANTI_COLUMNS)
    covered = table.dropna(subset=["korthikanti_ratio"])
    rows = []
    for (model, method), group in covered.groupby(["model", "method"], sort=True):
        rows.append(dict(zip(KORTHIKANTI_COLUMNS, (
            model, METHOD_LABELS.get(method, method), str(len(group)),
            f"{group['korthikanti_ratio'].min():.2f}", f"{group['korthikanti_ratio'].max():.2f}"))))
    return pd.DataFrame(rows, columns=KORTHIKANTI_COLUMNS)


def summary(table: pd.DataFrame) -> str:
    """How exact the walk is, and the range of Korthikanti's ratio."""
    if table.empty or "saved_difference" not in table or table["saved_difference"].isna().all():
        return "No run the symbolic walk covers."
    covered = table.dropna(subset=["saved_difference"])
    off = covered[(covered["saved_difference"] != 0) | (covered["activation_difference"] != 0)]
    skipped = len(table) - len(covered)
    if off.empty:
        exact = (f"The symbolic walk equals the measured saved-tensor and activation bytes to the byte in all "
                 f"{len(covered)} runs.")
    else:
        listed = "; ".join(f"{r.run_id}: {int(r.saved_difference):+d} B saved, {int(r.activation_difference):+d} B "
                           f"activations" for r in off.itertuples())
        exact = (f"The symbolic walk equals the measured bytes in {len(covered) - len(off)} of {len(covered)} runs; "
                 f"it differs in: {listed}.")
    cpu = covered[covered["kernels"] == "cpu"]
    kernels = ""
    if not cpu.empty:
        short = cpu[cpu["cuda_minus_cpu_kernels"] != 0]
        kernels = (f" {len(cpu)} runs used CPU kernels (a CPU build of torch); compared with the walk for those "
                   f"kernels. On CUDA, {len(short)} of them would save more, by up to "
                   f"{int(cpu['cuda_minus_cpu_kernels'].max())} bytes (\"CUDA − CPU kernels\": fp32 LayerNorm "
                   f"statistics, fp32 softmax under bf16 autocast, the efficient kernel's log-sum-exp padded to "
                   f"32 rows; see membench/analytic/walk.py).")
    ratios = covered["korthikanti_ratio"]
    formula = (f" Korthikanti's formula gives {ratios.min():.2f}× to {ratios.max():.2f}× the measured saved "
               f"bytes.")
    return exact + kernels + formula + (f" {skipped} runs of families the walk does not cover were skipped."
                                        if skipped else "")


def analytic_markdown(table: pd.DataFrame) -> str:
    """The whole of analytic.md from :func:`analytic_vs_measured`'s table: the walk, then Korthikanti's formula."""
    from membench.report.render import markdown

    shown = display(table)
    if shown.empty:
        return ""
    return "\n".join([
        "# Activation bytes: the symbolic walk and Korthikanti's formula vs measured\n",
        summary(table) + "\n",
        "## The symbolic walk of the forward pass vs measured\n",
        "Differences are in bytes (walk − measured). \"LoRA-FA minimum\" is what must be kept without "
        "recomputation (membench/analytic/minimum.py).\n",
        markdown(shown),
        "## Korthikanti et al.'s formula vs measured\n",
        KORTHIKANTI_EXPLANATION + "\n",
        markdown(korthikanti_by_method(table)),
    ])


def write_analytic(frame: pd.DataFrame, out: Path) -> list[Path]:
    """analytic.md and analytic.tex in ``out`` (nothing when no run is covered)."""
    from membench.files import write_atomic
    from membench.report.render import latex

    table = analytic_vs_measured(frame)
    text = analytic_markdown(table)
    if not text:
        return []
    shown = display(table)
    write_atomic(out / "analytic.md", text)
    write_atomic(out / "analytic.tex", latex(shown, "Symbolic walk and Korthikanti's formula vs measured saved-tensor "
                                                  "bytes", "tab:analytic"))
    return [out / "analytic.md", out / "analytic.tex"]
