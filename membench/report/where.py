"""Where LoRA's extra bytes live: LoRA and LoRA-FA side by side, module by module.

For each model, the LoRA / LoRA-FA pair at its headline workload (largest batch,
default knobs) is compared with :func:`membench.attribution.compare`; one figure
draws the model with the largest difference.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from membench.attribution import AttributionError, compare, top_findings
from membench.report.compare import GIB, default_knobs, row_key
from membench.report.load import ADAPTER, SETTING
from membench.results import read_result


def lora_pairs(frame: pd.DataFrame) -> list[tuple[str, dict, dict]]:
    """(model, LoRA result, LoRA-FA result) per model: same workload and adapters, largest batch, plain knobs."""
    runs = frame[frame["status"].isin(["ok", "oom"]) & frame["method"].isin(["lora", "lora_fa"])]
    if runs.empty:
        return []
    runs = runs.assign(_key=row_key(runs, (*SETTING, *ADAPTER)), _plain=default_knobs(runs))
    out = []
    for model, group in runs.groupby("model", sort=False):
        both = group.groupby("_key").filter(lambda g: set(g["method"]) == {"lora", "lora_fa"})
        if both.empty:
            continue
        best = both.sort_values(["_plain", "batch_size", "rank"], ascending=[False, False, True]).iloc[0]["_key"]
        chosen = both[both["_key"] == best].set_index("method")
        out.append((model, read_result(chosen.loc["lora", "path"]).to_dict(),
                    read_result(chosen.loc["lora_fa", "path"]).to_dict()))
    return out


def attribution_markdown(frame: pd.DataFrame, rows: int = 8) -> str:
    """Per model: the modules where LoRA and LoRA-FA differ most, with sentences."""
    from membench.report.render import markdown
    from membench.summary import describe_config

    parts = []
    for model, lora, lora_fa in lora_pairs(frame):
        try:
            table = compare(lora, lora_fa, by="module")
        except AttributionError:
            continue
        shown = table.head(rows)
        display = pd.DataFrame({
            "module (layers as *)": [f"`{m}`" for m in shown["module"]],
            "LoRA (MiB)": [f"{v / 2**20:,.1f}" for v in shown["bytes_a"]],
            "LoRA-FA (MiB)": [f"{v / 2**20:,.1f}" for v in shown["bytes_b"]],
            "difference (MiB)": [f"{v / 2**20:+,.1f}" for v in shown["difference"]],
            "tensors LoRA / LoRA-FA": [f"{a} / {b}" for a, b in zip(shown["tensors_a"], shown["tensors_b"],
                                                                    strict=True)],
        })
        parts += [f"## {model}: {describe_config(lora['config']).replace(' lora ', ' ')}\n",
                  "\n".join(f"- {line}" for line in top_findings(lora, lora_fa)) + "\n", markdown(display)]
    if not parts:
        return ""
    return "# Where LoRA's extra saved bytes live\n\n" + "\n".join(parts)


def attribution_figure(frame: pd.DataFrame, rows: int = 10) -> plt.Figure | None:
    """Horizontal bars: LoRA vs LoRA-FA saved bytes per module, for the model where they differ most."""
    best = None
    for model, lora, lora_fa in lora_pairs(frame):
        try:
            table = compare(lora, lora_fa, by="module")
        except AttributionError:
            continue
        gap = int(table["difference"].sum())
        if best is None or gap > best[0]:
            best = (gap, model, table, lora)
    if best is None:
        return None
    _, model, table, lora = best
    shown = table.head(rows).iloc[::-1]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.5))
    y = range(len(shown))
    ax.barh([i + 0.2 for i in y], shown["bytes_a"] / GIB, height=0.4, color="tab:blue", label="LoRA")
    ax.barh([i - 0.2 for i in y], shown["bytes_b"] / GIB, height=0.4, color="tab:red", label="LoRA-FA")
    ax.set_yticks(list(y), [f"{m} ({a}/{b})" for m, a, b in zip(shown["module"], shown["tensors_a"],
                                                                  shown["tensors_b"], strict=True)], fontsize=7)
    ax.set_xlabel("saved for backward (GiB)")
    ax.legend()
    workload = lora["config"]["workload"]
    ax.set_title(f"{model}, bs{workload['batch_size']} seq{workload['seq_len']}: the modules where LoRA and "
                 f"LoRA-FA differ most\n(tensors LoRA/LoRA-FA in brackets; layer indices as *)", fontsize=9)
    fig.tight_layout()
    return fig
