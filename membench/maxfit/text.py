"""Max-fit rows in words: budget labels, answers, one sentence per comparison and a Markdown table."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from membench.maxfit.config import GiB


def budget_label(nbytes: int) -> str:
    """``24 GiB`` for whole GiB, else two decimals in the largest unit (``1.91 MiB``)."""
    nbytes = int(nbytes)
    if nbytes % GiB == 0:
        return f"{nbytes // GiB} GiB"
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def fit_text(row: Any) -> str:
    """A row's answer in words: ``12``, ``none``, ``512 (the model's maximum)``, ..."""
    limited_by = row["limited_by"]
    if limited_by == "error":
        return "error"
    if _missing(row["max_fit"]):
        return "none"
    value = int(row["max_fit"])
    if limited_by == "model_max_length":
        return f"{value} (the model's maximum)"
    if limited_by == "search_cap":
        return f"at least {value} (search cap)"
    return str(value)


GROUP = ["model", "precision", "dimension", "fixed_batch_size", "fixed_seq_len", "target_len", "budget_bytes"]
NOUN = {"batch_size": "batch", "seq_len": "sequence length"}


def _ordered(group: pd.DataFrame) -> list:
    """lora_fa, then lora, then the other methods in file order: the report's comparison first."""
    methods = list(dict.fromkeys(group["method"]))
    first = [m for m in ("lora_fa", "lora") if m in methods]
    return [group[group["method"] == m].iloc[0] for m in first + [m for m in methods if m not in first]]


def _context(group: pd.DataFrame) -> str:
    row = group.iloc[0]
    parts = [str(row["model"]), str(row["precision"])]
    ranks = sorted({int(r) for r in group["rank"] if not _missing(r)})
    if ranks:
        parts.append("r=" + "/".join(map(str, ranks)))
    if row["dimension"] == "batch_size":
        parts.append(f"seq_len {int(row['fixed_seq_len'])}")
    else:
        parts.append(f"batch {int(row['fixed_batch_size'])}")
    if not _missing(row["target_len"]):
        parts.append(f"target_len {int(row['target_len'])}")
    if "world_size" in group.columns and not _missing(row["world_size"]):
        parts.append(f"per GPU of {int(row['world_size'])}")
    return ", ".join(parts)


def _group_keys(df: pd.DataFrame) -> list[str]:
    """GROUP, and ``world_size`` for a search over several world sizes (``maxfit.world_sizes``)."""
    return [*GROUP, "world_size"] if "world_size" in df.columns else GROUP


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["model", "dimension", "budget_bytes"] + (["world_size"] if "world_size" in df.columns else [])
    return df.sort_values(keys, kind="stable")


def _groups(df: pd.DataFrame):
    group = _group_keys(df)
    keys = df[group].astype(object).where(df[group].notna(), None)
    for _, index in keys.groupby(group, dropna=False, sort=False).groups.items():
        yield df.loc[index]


def sentences(df: pd.DataFrame) -> list[str]:
    """One sentence per model x dimension x fixed setting x budget, e.g.
    ``on a 24 GiB card, lora_fa fits batch 12 where lora fits 7, full none (llama-7b, bf16, r=64, seq_len 512)``.
    """
    out = []
    if df.empty:
        return out
    df = _sorted(df)
    for group in _groups(df):
        rows = _ordered(group)
        head, rest = rows[0], rows[1:]
        label = budget_label(head["budget_bytes"])
        card = f"on {'an' if label.startswith(('8', '11 ', '18 ')) else 'a'} {label} card"
        if rest and len({fit_text(r) for r in rows}) == 1:
            out.append(f"{card}, every method ({', '.join(r['method'] for r in rows)}) fits "
                       f"{NOUN[head['dimension']]} {fit_text(head)} ({_context(group)})")
            continue
        text = f"{card}, {head['method']} fits {NOUN[head['dimension']]} {fit_text(head)}"
        if rest:
            text += f" where {rest[0]['method']} fits {fit_text(rest[0])}"
            text += "".join(f", {r['method']} {fit_text(r)}" for r in rest[1:])
        out.append(f"{text} ({_context(group)})")
    return out


def markdown_table(df: pd.DataFrame) -> str:
    """A Markdown table: one line per model x dimension x fixed setting x budget, one column per method."""
    if df.empty:
        return "(no max-fit rows)"
    df = _sorted(df)
    methods = list(dict.fromkeys(df["method"]))
    gpus = "world_size" in df.columns
    lines = ["| model | precision | LoRA rank | searched | held fixed | " + ("GPUs | " if gpus else "")
             + "budget | " + " | ".join(methods) + " |",
             "|---|---|---|---|---|" + ("---|" if gpus else "") + "---|" + "---|" * len(methods)]
    for group in _groups(df):
        row = group.iloc[0]
        fixed = (f"seq_len {int(row['fixed_seq_len'])}" if row["dimension"] == "batch_size"
                 else f"batch {int(row['fixed_batch_size'])}")
        cells = []
        for method in methods:
            match = group[group["method"] == method]
            if match.empty:
                cells.append("")
                continue
            cells.append(fit_text(match.iloc[0]))
        ranks = "/".join(str(r) for r in sorted({int(r) for r in group["rank"] if not _missing(r)})) or "—"
        world = f"{int(row['world_size'])} | " if gpus else ""
        lines.append(f"| {row['model']} | {row['precision']} | {ranks} | {row['dimension']} | {fixed} | {world}"
                     f"{budget_label(row['budget_bytes'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fewest_gpus(df: pd.DataFrame, wanted: dict[str, int]) -> list[str]:
    """For a search over world sizes: per method, dimension and budget, the fewest GPUs on which the
    configured value (``wanted[dimension]``: workload.batch_size or workload.seq_len) fits, e.g.
    ``lora_fa: batch 1 fits 80 GiB per GPU from 8 GPUs (of 4/8/16 tried)``."""
    if df.empty or "world_size" not in df.columns:
        return []
    out = []
    keys = ["model", "method", "dimension", "budget_bytes"]
    for _, group in df.groupby(keys, sort=False):
        row = group.iloc[0]
        tried = sorted(int(w) for w in group["world_size"])
        value = wanted[row["dimension"]]
        fitting = sorted(int(r["world_size"]) for _, r in group.iterrows()
                         if not _missing(r["max_fit"]) and int(r["max_fit"]) >= value)
        answer = f"from {fitting[0]} GPU{'s' if fitting[0] > 1 else ''}" if fitting else "on none"
        out.append(f"{row['method']}: {NOUN[row['dimension']]} {value} fits {budget_label(row['budget_bytes'])} "
                   f"per GPU {answer} (of {'/'.join(map(str, tried))} tried; {row['model']}, {row['precision']})")
    return out
