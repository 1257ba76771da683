"""The files ``membench-maxfit`` writes (``<stem>.json`` and ``<stem>.csv``) and reads back."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from membench.files import write_atomic
from membench.identity import settings_digest
from membench.maxfit.rows import COLUMNS, INT_COLUMNS
from membench.results import provenance

SCHEMA_VERSION = 1
KIND = "membench-maxfit"


def write_maxfit(rows: list[dict[str, Any]], directory: str | Path, settings: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``rows`` to ``<stem>.json`` and ``<stem>.csv`` in ``directory``, each atomically.

    The stem names the model, precision and backend and hashes ``settings`` (the fixed
    configs, budgets, dimensions, cap), so the same search overwrites its own files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else {"model": "none", "precision": "none", "backend": "none"}
    stem = "--".join(["maxfit", str(first["model"]), str(first["precision"]), str(first["backend"]),
                      settings_digest(settings)])
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    document = {"schema_version": SCHEMA_VERSION, "kind": KIND, "settings": settings, "rows": rows,
                "env": provenance()}  # each row names its backend
    write_atomic(json_path, json.dumps(document, indent=2) + "\n")
    extra = [key for key in dict.fromkeys(key for row in rows for key in row) if key not in COLUMNS]  # world_size
    frame = _typed(pd.DataFrame(rows, columns=COLUMNS + extra))  # nullable integers: 512, not 512.0
    write_atomic(csv_path, frame.to_csv(index=False))
    return json_path, csv_path


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    for column in INT_COLUMNS:
        frame[column] = pd.array(
            [None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v) for v in frame[column]],
            dtype="Int64")
    return frame[COLUMNS + [c for c in frame.columns if c not in COLUMNS]]


def load_maxfit(directory: str | Path) -> pd.DataFrame:
    """Every row of the ``*.json`` files ``membench-maxfit`` wrote to ``directory``.

    A file that is not valid JSON or not a maxfit file of this schema is skipped with a
    warning naming it. Integer columns use pandas' nullable ``Int64``.
    """
    rows = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            document = json.loads(path.read_text())
            if not isinstance(document, dict) or document.get("kind") != KIND:
                raise ValueError("not a membench-maxfit file")
            if document.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"schema_version {document.get('schema_version')!r}; expected {SCHEMA_VERSION}")
            if not isinstance(document.get("rows"), list) or not all(isinstance(r, dict) for r in document["rows"]):
                raise ValueError("'rows' is not a list of rows")
        except (OSError, UnicodeDecodeError, ValueError) as error:
            warnings.warn(f"{path}: skipped, not a readable maxfit file: {error}", stacklevel=2)
            continue
        rows.extend(document["rows"])
    return _typed(pd.DataFrame(rows, columns=COLUMNS) if not rows else pd.DataFrame(rows))
