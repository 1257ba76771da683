"""Where the saved-for-backward bytes of two runs differ: by module, or by the op that made them.

Works on result dicts (the parsed JSON of two result files, or ``Result.to_dict()``),
e.g. LoRA and LoRA-FA on the same model and workload::

    from membench.attribution import compare, top_findings
    table = compare(lora, lora_fa, by="module")   # one row per module pattern, bytes as ints
    for line in top_findings(lora, lora_fa):
        print(line)

Module patterns are shown without PEFT's wrapper prefix (``base_model.model.``)
and adapter name (``lora_A.default`` -> ``lora_A``), so a full fine-tuning run
and a LoRA run line up module for module. Bytes are integers in the tables;
GiB/MiB appear only in the sentences of :func:`top_findings`.
"""

from __future__ import annotations

import re
from typing import Any, Union

import pandas as pd

from membench.saved_tensors import ROOT

BY = ("module", "op")
PEFT_PREFIX = "base_model.model"
_ADAPTER_NAME = re.compile(r"(?<=\.)(lora_[A-Za-z_]+|modules_to_save)\.default(?![^.])")
METHOD_NAMES = {
    "full": "full fine-tuning", "full_recompute": "full fine-tuning + recompute",
    "lora": "LoRA", "lora_recompute": "LoRA + recompute",
    "lora_fa": "LoRA-FA", "lora_fa_recompute": "LoRA-FA + recompute",
}
UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
# What a module's saved bytes are, by the op that made them (for the sentences only).
OP_MEANINGS = {
    "aten.native_dropout": "dropout outputs and their masks",
    "aten._safe_softmax": "S×S attention probabilities",
    "aten._softmax": "S×S attention probabilities",
    "aten._log_softmax": "log-probabilities over the vocabulary, kept for the loss",
    "aten._scaled_dot_product_efficient_attention": "attention outputs and logsumexp",
    "aten._scaled_dot_product_flash_attention": "attention outputs and logsumexp",
    "aten._scaled_dot_product_cudnn_attention": "attention outputs and logsumexp",
    "aten._scaled_dot_product_flash_attention_for_cpu": "attention outputs and logsumexp",
    "aten._to_copy": "dtype copies",
}

Results = Union[dict, Any]  # a result dict, or a membench.results.Result


class AttributionError(ValueError):
    """A result without saved-tensor attribution (measured before membench recorded it, or failed before)."""


def _as_dict(result: Results) -> dict:
    return result if isinstance(result, dict) else result.to_dict()


def module_label(key: str) -> str:
    """A stored module pattern as shown: no PEFT wrapper prefix, no adapter name."""
    if key in (PEFT_PREFIX, "base_model"):
        return ROOT
    if key.startswith(PEFT_PREFIX + "."):
        key = key[len(PEFT_PREFIX) + 1:]
    return _ADAPTER_NAME.sub(r"\1", key)


def _short(label: str) -> str:
    """Shorter still, for sentences: ``model.layers.*.mlp`` -> ``layers.*.mlp``."""
    return label[len("model."):] if label.startswith("model.") else label


def _figures(result: dict, by: str) -> tuple[dict[str, int], dict[str, int]]:
    if by not in BY:
        raise ValueError(f"by={by!r}; choose one of: {', '.join(BY)}")
    metrics = result.get("metrics", {})
    nbytes = metrics.get(f"saved_bytes_by_{by}")
    if not nbytes:
        raise AttributionError(
            f"{result.get('run_id', 'result')} has no saved-tensor attribution by {by} (a result from before "
            "membench recorded it, or a run that failed before its measured forward); re-measure it with force=true"
        )
    counts = metrics.get(f"saved_tensors_by_{by}") or {}
    if by == "op":
        return dict(nbytes), dict(counts)
    merged_bytes: dict[str, int] = {}
    merged_counts: dict[str, int] = {}
    for key, value in nbytes.items():
        label = module_label(key)
        merged_bytes[label] = merged_bytes.get(label, 0) + value
        merged_counts[label] = merged_counts.get(label, 0) + counts.get(key, 0)
    return merged_bytes, merged_counts


def compare(result_a: Results, result_b: Results, by: str = "module") -> pd.DataFrame:
    """Saved-for-backward bytes of two runs side by side, one row per module pattern (or op).

    Args:
        result_a, result_b: Result dicts (parsed result JSON) or ``Result`` objects.
        by: ``module`` (the module that saved each storage) or ``op`` (the ATen op that made it).

    Returns:
        Columns ``module``/``op``, ``bytes_a``, ``bytes_b``, ``difference`` (a − b),
        ``tensors_a``, ``tensors_b`` (storage counts), all integers; sorted by
        the size of the difference, largest first (ties: by name). ``bytes_a`` and
        ``bytes_b`` each sum to the run's ``saved_tensor_bytes``. ``attrs`` holds
        both run ids and ``by``.

    Raises:
        AttributionError: a result has no attribution (e.g. an older result file).
    """
    a, b = _as_dict(result_a), _as_dict(result_b)
    bytes_a, counts_a = _figures(a, by)
    bytes_b, counts_b = _figures(b, by)
    keys = list(dict.fromkeys([*bytes_a, *bytes_b]))
    table = pd.DataFrame({
        by: keys,
        "bytes_a": [bytes_a.get(key, 0) for key in keys],
        "bytes_b": [bytes_b.get(key, 0) for key in keys],
        "tensors_a": [counts_a.get(key, 0) for key in keys],
        "tensors_b": [counts_b.get(key, 0) for key in keys],
    }).astype({"bytes_a": "int64", "bytes_b": "int64", "tensors_a": "int64", "tensors_b": "int64"})
    table.insert(3, "difference", table["bytes_a"] - table["bytes_b"])
    table = table.assign(_size=table["difference"].abs()).sort_values(["_size", by], ascending=[False, True])
    table = table.drop(columns="_size").reset_index(drop=True)
    table.attrs = {"a": a.get("run_id"), "b": b.get("run_id"), "by": by}
    return table


def _amount(nbytes: float) -> str:
    for name, size in UNITS:
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {name}" if name == "GiB" else f"{nbytes / size:.1f} {name}"
    return f"{int(nbytes)} B"


def run_label(result: dict) -> str:
    """``LoRA``, ``LoRA-FA``, ... from the config's method name."""
    name = result.get("config", {}).get("method", {}).get("name", "?")
    return METHOD_NAMES.get(name, name)


def _labels(a: dict, b: dict) -> tuple[str, str]:
    label_a, label_b = run_label(a), run_label(b)
    if label_a == label_b:
        return f"{label_a} ({a.get('run_id', 'a')})", f"{label_b} ({b.get('run_id', 'b')})"
    return label_a, label_b


def _main_op(result: dict, module: str) -> str | None:
    """The op that made most of ``module``'s saved bytes in ``result`` (None without the cross table)."""
    table = result.get("metrics", {}).get("saved_bytes_by_module_op") or {}
    ops: dict[str, int] = {}
    for key, by_op in table.items():
        if module_label(key) == module:
            for op, value in by_op.items():
                ops[op] = ops.get(op, 0) + value
    return max(ops, key=lambda op: (ops[op], op)) if ops else None


def _meaning(module: str, op: str | None, result: dict) -> str:
    """A plain-English guess at what the bytes are, from the module's role and the op that made them."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf == "lora_A":
        fp32 = result.get("config", {}).get("method", {}).get("adapter_dtype") == "fp32"
        if op == "aten._to_copy" and fp32:
            return "the fp32 copy of X each adapted layer saves for A's gradient"
        return "the input X each adapted layer saves for A's gradient"
    if leaf == "lora_B":
        return "the rank-r output of A that B's gradient needs"
    if leaf == "lora_dropout":
        return "the adapter input's dropout output and mask"
    if op in OP_MEANINGS:
        return OP_MEANINGS[op]
    if op in ("aten.mm", "aten.addmm", "aten.bmm"):
        return "matmul outputs kept as the next layer's input"
    return ""


def _detail(module: str, row: pd.Series, winner: dict, share: str) -> str:
    more_bytes, more_count = (row["bytes_a"], row["tensors_a"]) if row["difference"] > 0 else (
        row["bytes_b"], row["tensors_b"])
    less_bytes = row["bytes_b"] if row["difference"] > 0 else row["bytes_a"]
    if less_bytes == 0 and more_count:
        each = more_bytes / more_count
        size = f"{more_count} tensors × {_amount(each)}" if more_bytes % more_count == 0 else (
            f"{more_count} tensors, {_amount(each)} each on average")
    else:
        size = f"{_amount(more_bytes)} against {_amount(less_bytes)}"
    op = _main_op(winner, module)
    meaning = _meaning(module, op, winner)
    made = f", made by {op}" if op else ""
    return f"{size}{made}{': ' + meaning if meaning else ''}; {share} of the net difference"


def top_findings(result_a: Results, result_b: Results, n: int = 3) -> list[str]:
    """The ``n`` module patterns where the two runs' saved bytes differ most, as sentences with numbers.

    E.g. ``LoRA keeps 4.00 GiB more than LoRA-FA in `layers.*.mlp.down_proj.lora_A` (32 tensors × 128.0 MiB,
    made by aten._to_copy: the fp32 copy of X each adapted layer saves for A's gradient; 12% of the
    net difference)``. One sentence when nothing differs.

    Raises:
        AttributionError: a result has no attribution (e.g. an older result file).
    """
    a, b = _as_dict(result_a), _as_dict(result_b)
    table = compare(a, b, by="module")
    label_a, label_b = _labels(a, b)
    total = int(table["difference"].sum())
    differing = table[table["difference"] != 0]
    if differing.empty:
        return [f"{label_a} and {label_b} save the same {_amount(int(table['bytes_a'].sum()))} for backward, "
                "module for module."]
    findings = []
    for _, row in differing.head(n).iterrows():
        module = row["module"]
        more, less, winner = (label_a, label_b, a) if row["difference"] > 0 else (label_b, label_a, b)
        share = f"{abs(row['difference']) / abs(total):.0%}" if total else "part"
        findings.append(f"{more} keeps {_amount(abs(row['difference']))} more than {less} in `{_short(module)}` "
                        f"({_detail(module, row, winner, share)}).")
    return findings
