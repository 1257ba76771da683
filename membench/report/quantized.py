"""QLoRA and DoRA in the report: does LoRA-FA's saving carry over to a 4-bit base, and what does DoRA cost?

Read off the runs, workload by workload (model, precision, batch, sequence, rank): LoRA/LoRA-FA on the
bf16 base against QLoRA/QLoRA-FA on the NF4 base, and DoRA's peak and saved bytes over LoRA's.

DoRA's extra saved tensors per adapted layer (PEFT's ``DoraLinearVariant.forward``, dropout 0; input
M x K, output M x N): ``(magnitude / ||W + sBA||) - 1`` multiplies the base layer's output, and the
quotient multiplies the LoRA branch's output, so autograd keeps both M x N outputs (base dtype and
adapter dtype) and two N-vectors in the adapter dtype (the detached column norm, and the quotient).
:func:`dora_extra_saved_bytes` is that count; tests/test_quantization.py checks it on one layer.
"""

from __future__ import annotations

import pandas as pd

from membench.report.compare import side_by_side
from membench.report.tables import METHOD_LABELS

GIB = 1 << 30
METHODS = ("lora", "lora_fa", "qlora", "qlora_fa", "dora", "qlora_recompute", "qdora")


def dora_extra_saved_bytes(tokens: int, out_features: int, base_bytes: int, adapter_bytes: int) -> int:
    """Bytes DoRA keeps for backward beyond LoRA in one adapted linear layer (module docstring)."""
    return tokens * out_features * (base_bytes + adapter_bytes) + 2 * out_features * adapter_bytes


def has_quantized(frame: pd.DataFrame) -> bool:
    return bool({"qlora", "qlora_fa", "dora", "qdora"} & set(frame["method"]))


def _gib(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{value / GIB:.2f}"


def quantized_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per workload: each method's peak (GiB), the two LoRA/LoRA-FA ratios and DoRA's cost."""
    table = side_by_side(frame)
    if table.empty:
        return pd.DataFrame()
    rows = []
    for _, row in table.iterrows():
        peaks = {m: row.get(f"peak_{m}") for m in METHODS}
        statuses = {m: row.get(f"status_{m}") for m in METHODS}
        shown = {METHOD_LABELS.get(m, m): _gib(peaks[m]) + (" (OOM)" if statuses[m] == "oom" else "")
                 for m in METHODS if f"peak_{m}" in table}

        def ratio(a, b):
            ok = all(statuses.get(m) == "ok" for m in (a, b))
            return f"{peaks[a] / peaks[b]:.2f}×" if ok and not pd.isna(peaks[a]) else "—"

        dora_cost = (f"+{(peaks['dora'] - peaks['lora']) / GIB:.2f}"
                     if statuses.get("dora") == "ok" and statuses.get("lora") == "ok" else "—")
        rows.append({"model": row["model"], "seq": row["seq_len"], "batch": row["batch_size"], **shown,
                     "LoRA/LoRA-FA": ratio("lora", "lora_fa"), "QLoRA/QLoRA-FA": ratio("qlora", "qlora_fa"),
                     "DoRA − LoRA (GiB)": dora_cost})
    return pd.DataFrame(rows).sort_values(["model", "seq", "batch"]).reset_index(drop=True)


def _ratios(table: pd.DataFrame, a: str, b: str) -> pd.Series:
    """Peak ratios where both ran to the end: ok, or predicted out of memory (simulate's peak runs past the card)."""
    ran = table.get(f"status_{a}").isin(["ok", "oom"]) & table.get(f"status_{b}").isin(["ok", "oom"])
    return (table[f"peak_{a}"] / table[f"peak_{b}"])[ran].dropna()


def section(frame: pd.DataFrame) -> str:
    """The verdict's section on 4-bit bases and DoRA, with numbers."""
    table = side_by_side(frame)
    needed = {"peak_lora", "peak_lora_fa", "peak_qlora", "peak_qlora_fa"}
    if table.empty or not needed <= set(table):
        return ""
    plain, four_bit = _ratios(table, "lora", "lora_fa"), _ratios(table, "qlora", "qlora_fa")
    both = table.index.intersection(plain.index).intersection(four_bit.index)
    lines = ["## On a 4-bit base (QLoRA) and with DoRA\n"]
    if len(both):
        saved_plain = (table.loc[both, "peak_lora"] - table.loc[both, "peak_lora_fa"]) / GIB
        saved_4bit = (table.loc[both, "peak_qlora"] - table.loc[both, "peak_qlora_fa"]) / GIB
        over = int(table.loc[both, [f"status_{m}" for m in ("lora", "lora_fa", "qlora", "qlora_fa")]]
                   .eq("oom").any(axis=1).sum())
        lines.append(
            f"LoRA-FA's saving carries over to an NF4 base: over {len(both)} workload{'s' if len(both) != 1 else ''} "
            f"({over} with a run predicted beyond the card, whose simulated peak goes on past its capacity), "
            f"QLoRA/QLoRA-FA is {four_bit[both].min():.2f}–{four_bit[both].max():.2f}× (median "
            f"{four_bit[both].median():.2f}×) against LoRA/LoRA-FA's {plain[both].min():.2f}–{plain[both].max():.2f}× "
            f"(median {plain[both].median():.2f}×). The bytes saved are the same to within "
            f"{(saved_4bit - saved_plain).abs().max() * 1024:.0f} MiB (median {saved_plain.median():.2f} GiB): "
            "quantising the base shrinks the weights, not what autograd keeps, so the ratio grows as the "
            "weights shrink. "
            f"QLoRA reaches the paper's 1.4× in {int((four_bit[both] >= 1.4).sum())} of {len(both)}, LoRA in "
            f"{int((plain[both] >= 1.4).sum())}.\n")
        rescued = int(((table["status_qlora_fa"] == "ok") & (table["status_qlora"] == "oom")).sum())
        fit_all = int((table[[f"status_{m}" for m in ("qlora", "qlora_fa")]] == "ok").all(axis=1).sum())
        device = frame["device_name"].dropna().iloc[0] if frame["device_name"].notna().any() else "the card"
        lines.append(f"On the {device}, QLoRA-FA fits {rescued} workload{'s' if rescued != 1 else ''} where QLoRA "
                     f"runs out of memory; both fit {fit_all}.\n")
        weights = (table.loc[both, "peak_lora"] - table.loc[both, "peak_qlora"]) / GIB
        lines.append(f"QLoRA's peak is {weights.min():.2f}–{weights.max():.2f} GiB below LoRA's (the 4-bit weights; "
                     "the activations are unchanged).\n")
    if {"peak_dora", "peak_lora"} <= set(table):
        ok = (table["status_dora"] == "ok") & (table["status_lora"] == "ok")
        cost = (table["peak_dora"] / table["peak_lora"])[ok].dropna()
        if len(cost):
            lines.append(
                f"DoRA costs {cost.min():.2f}–{cost.max():.2f}× LoRA's peak (median {cost.median():.2f}×, where both "
                f"fit); it runs out of the card in {int(((table['status_dora'] == 'oom') & (table['status_lora'] == 'ok')).sum())} "
                "workloads where LoRA fits. "
                "Per adapted layer with M tokens and N outputs it keeps M·N·(base + adapter bytes) + 2·N·adapter "
                "bytes more than LoRA: the base layer's output and the LoRA branch's output, which its magnitude "
                "scaling multiplies, plus the column norm and the magnitude quotient (PEFT's DoraLinearVariant; "
                "checked on one layer by tests/test_quantization.py).\n")
    return "\n".join(lines)


def stacked_by_batch(frame: pd.DataFrame):
    """Peak against batch per method: weights, gradients + optimizer state and activations stacked, per model and seq."""
    import matplotlib.pyplot as plt
    import numpy as np

    from membench.report.figures import COLORS

    runs = frame[frame["method"].isin(METHODS) & frame["status"].isin(["ok", "oom"])]
    panels = runs[["model", "seq_len"]].drop_duplicates().sort_values(["model", "seq_len"]).values.tolist()
    if not panels:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.text(0.5, 0.5, "no QLoRA or DoRA runs", ha="center", va="center")
        ax.set_axis_off()
        return fig
    columns = min(2, len(panels))
    grid_rows = -(-len(panels) // columns)
    fig, grid = plt.subplots(grid_rows, columns, figsize=(6.4 * columns, 4.0 * grid_rows), squeeze=False)
    axes = [[ax for row in grid for ax in row]]
    for ax in axes[0][len(panels):]:
        ax.set_axis_off()
    parts = (("weight_bytes", "weights", "0.35"), ("state", "gradients + optimizer state", "0.65"),
             ("activation_bytes", "activations", None))
    for ax, (model, seq) in zip(axes[0], panels):
        panel = runs[(runs["model"] == model) & (runs["seq_len"] == seq)]
        methods = [m for m in METHODS if m in set(panel["method"])]
        batches = sorted(panel["batch_size"].unique())
        width = 0.8 / max(len(methods), 1)
        for index, method in enumerate(methods):
            rows = panel[panel["method"] == method].set_index("batch_size").reindex(batches)
            values = {"weight_bytes": rows["weight_bytes"], "activation_bytes": rows["activation_bytes"],
                      "state": rows["gradient_bytes"].fillna(0) + rows["optimizer_state_bytes"].fillna(0)}
            x = np.arange(len(batches)) + (index - (len(methods) - 1) / 2) * width
            bottom = np.zeros(len(batches))
            for key, label, shade in parts:
                height = values[key].fillna(0).to_numpy(dtype=float) / GIB
                ax.bar(x, height, width, bottom=bottom, color=COLORS.get(method, "tab:gray"),
                       alpha=1.0 if shade is None else float(shade), edgecolor="white", linewidth=0.3,
                       label=f"{METHOD_LABELS.get(method, method)}" if shade is None else None)
                bottom += height
            ax.scatter(x, rows["peak_allocated_bytes"].to_numpy(dtype=float) / GIB, marker="_", s=60, color="black",
                       zorder=3)
        capacity = panel["device_total_memory_bytes"].dropna()
        if len(capacity):
            ax.axhline(float(capacity.iloc[0]) / GIB, color="black", linestyle="--", linewidth=0.8)
            ax.text(-0.45, float(capacity.iloc[0]) / GIB, f" {panel['device_name'].dropna().iloc[0]}", fontsize=7,
                    va="bottom")
        ax.set_xticks(np.arange(len(batches)), [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel("GiB")
        ax.set_title(f"{model}, seq {seq}", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("Peak by method and batch: weights (light), gradients + optimizer (mid), activations (full); "
                 "black tick: peak", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return fig

