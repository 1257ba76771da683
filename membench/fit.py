"""``membench-fit``: what fits on which GPU, for each method, from symbolic traces in seconds.

    membench-fit model=llama-7b train.precision=bf16 workload.seq_len=2048 workload.batch_size=2
    membench-fit model=llama-7b fit.devices=[gpu-24gb,h100-80gb] fit.methods=[lora,lora_fa]

For each method of ``fit.methods`` and each GPU profile of ``fit.devices`` (default: every profile
in :data:`membench.devices.DEVICES`), the largest batch size at ``workload.seq_len`` and the largest
sequence length at ``workload.batch_size`` (``fit.dimensions``). It is :func:`membench.maxfit.maxfit_rows`
(the same search, evaluated from each method's trace, ``backend.trace=auto``) with one budget per
profile: the card's capacity less its CUDA context (``total_memory_bytes - cuda_context_bytes``),
which peak reserved memory (``fit.by=reserved``, the default, as membench-maxfit's) or
``max_memory_allocated`` (``fit.by=allocated``) may reach. ``fit.confirm`` (default ``once``) simulates one answer
directly at n and n + 1. Writes ``fit--<model>--<precision>--<hash>.json``, ``.csv`` and ``.md`` to
``fit.output`` (``results/fit``); ``membench-report`` includes the markdown as ``fit.md``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from membench.config import (BackendConfig, MethodConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig,
                             WorkloadConfig, check_choice, check_positive, register_configs)
from membench.devices import DEVICES, DeviceProfile
from membench.errors import ConfigError
from membench.files import check_writable_dir, write_atomic
from membench.identity import settings_digest, settings_record
from membench.results import provenance
from membench.maxfit.config import CONFIRM, DIMENSIONS
from membench.maxfit.text import budget_label

SCHEMA_VERSION = 1
KIND = "membench-fit"
COLUMNS = ["model", "method", "rank", "precision", "device", "device_name", "budget_bytes", "by",
           "seq_len", "max_batch_size", "batch_limited_by", "peak_bytes_at_max_batch_size",
           "batch_size", "max_seq_len", "seq_limited_by", "peak_bytes_at_max_seq_len",
           "trace", "confirmed", "error"]


@dataclass
class FitConfig:
    """The ``fit`` section of ``conf/fit.yaml``."""

    devices: Optional[list[str]] = None
    methods: list[str] = field(default_factory=lambda: ["full", "lora", "lora_fa", "lora_recompute",
                                                        "lora_fa_recompute"])
    confirm: str = "once"
    search_cap: int = 65536
    output: str = "results/fit"
    by: str = "reserved"
    dimensions: list[str] = field(default_factory=lambda: list(DIMENSIONS))

    def __post_init__(self) -> None:
        from membench.maxfit.probe import BY

        check_choice("fit.confirm", self.confirm, CONFIRM)
        check_choice("fit.by", self.by, BY)
        if not self.dimensions:
            raise ConfigError(f"fit.dimensions=[] names nothing to search; choose from: {', '.join(DIMENSIONS)}")
        for name in self.dimensions:
            check_choice("fit.dimensions entry", name, DIMENSIONS)
        check_positive("fit.search_cap", self.search_cap)
        if not self.methods:
            raise ConfigError("fit.methods=[] names no method; e.g. [full, lora, lora_fa, lora_recompute]")
        if self.devices is not None:
            if not self.devices:
                raise ConfigError(f"fit.devices=[] names no GPU; choose from: {', '.join(DEVICES)}")
            for key in self.devices:
                if key not in DEVICES:
                    raise ConfigError(f"fit.devices entry {key!r} is not a GPU profile; choose from: "
                                      f"{', '.join(DEVICES)}")


@dataclass
class FitRunConfig(RunConfig):
    """Root schema of ``conf/fit.yaml``: ``conf/config.yaml`` plus a ``fit`` section (as MaxFitRunConfig)."""

    model: ModelConfig = MISSING
    method: MethodConfig = MISSING
    workload: WorkloadConfig = MISSING
    train: TrainConfig = MISSING
    backend: BackendConfig = MISSING
    parallel: ParallelConfig = MISSING
    results_dir: str = MISSING
    force: bool = MISSING
    fit: FitConfig = field(default_factory=FitConfig)


def register_fit_configs() -> None:
    from membench.maxfit.config import register_maxfit_configs

    register_configs()
    register_maxfit_configs()  # fit composes each method's run through conf/maxfit.yaml, as maxfit does
    ConfigStore.instance().store(name="fit_schema", node=FitRunConfig)


def device_budget(profile: DeviceProfile) -> int:
    """What the searched figure may reach on ``profile``: its capacity less the CUDA context."""
    return profile.usable_bytes


def fit_rows(runs: Sequence[RunConfig], devices: Sequence[str], *, confirm: str = "once", search_cap: int = 65536,
             log: Optional[Callable[[str], None]] = None, by: str = "reserved",
             dimensions: Sequence[str] = DIMENSIONS) -> list[dict[str, Any]]:
    """One row per method (``runs``) x device: the largest batch and the largest sequence that fit.

    ``by``: the figure that must stay within the budget (``reserved``, falling back to allocated where a
    result has none, or ``allocated``); ``dimensions``: which searches to run (a skipped one's cells are None).
    """
    from membench.maxfit import maxfit_rows
    from membench.plan import plan

    per_device = {key: [dataclasses.replace(run, backend=dataclasses.replace(run.backend, name="simulate",
                                                                              device=key)) for run in runs]
                  for key in devices}
    for device_runs in per_device.values():  # every configuration is valid before any trace is recorded
        for run in device_runs:
            plan(run)
    rows, confirmed = [], False
    for key, device_runs in per_device.items():
        profile = DEVICES[key]
        found = maxfit_rows(device_runs, list(dimensions), [device_budget(profile)], search_cap=search_cap,
                            confirm="off" if confirm == "once" and confirmed else confirm, by=by)
        confirmed = confirmed or any(row["confirmed"] for row in found)
        skipped = dict.fromkeys(("max_fit", "limited_by", "peak_bytes_at_max_fit", "trace", "confirmed", "error"))
        for run in device_runs:
            mine = {row["dimension"]: row for row in found if row["method"] == run.method.name}
            batch, seq = mine.get("batch_size", skipped), mine.get("seq_len", skipped)
            rows.append({
                "model": run.model.name, "method": run.method.name, "rank": run.method.rank,
                "precision": run.train.precision, "device": key, "device_name": profile.name,
                "budget_bytes": device_budget(profile), "by": by,
                "seq_len": run.workload.seq_len, "max_batch_size": batch["max_fit"],
                "batch_limited_by": batch["limited_by"], "peak_bytes_at_max_batch_size": batch["peak_bytes_at_max_fit"],
                "batch_size": run.workload.batch_size, "max_seq_len": seq["max_fit"],
                "seq_limited_by": seq["limited_by"], "peak_bytes_at_max_seq_len": seq["peak_bytes_at_max_fit"],
                "trace": batch["trace"] or seq["trace"],
                "confirmed": bool(batch["confirmed"] or seq["confirmed"]) or None,
                "error": batch["error"] or seq["error"],
            })
            if log:
                log(f"  {run.method.name} on {key}: batch {_cell(rows[-1], 'batch')} at seq {run.workload.seq_len}, "
                    f"seq {_cell(rows[-1], 'seq')} at batch {run.workload.batch_size}")
    return rows


def _cell(row: dict[str, Any], which: str) -> str:
    value = row["max_batch_size" if which == "batch" else "max_seq_len"]
    limited_by = row[f"{which}_limited_by"]
    if limited_by is None and value is None:
        return "—"  # not searched (fit.dimensions)
    if limited_by == "error":
        return "error"
    if value is None:
        return "none"
    return {"memory": str(value), "model_max_length": f"{value} (model max)",
            "search_cap": f"≥{value} (cap)"}.get(limited_by, str(value))


FIGURE = {"reserved": "peak reserved memory (the caching allocator's segments: what runs out)",
          "allocated": "`max_memory_allocated`"}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table: one line per method x GPU."""
    if not rows:
        return ""
    first = rows[0]
    lines = [f"## {first['model']} ({first['precision']}): what fits\n",
             "Largest batch at the sequence length shown and largest sequence length at the batch shown whose "
             f"simulated {FIGURE[first.get('by', 'allocated')]} stays within the GPU's capacity less its CUDA "
             "context (membench-fit; from symbolic traces).\n",
             "| method | rank | GPU | budget | max batch | at seq | max seq | at batch |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['rank'] if row['rank'] is not None else ''} | {row['device']} | "
                     f"{budget_label(row['budget_bytes'])} | {_cell(row, 'batch')} | {row['seq_len']} | "
                     f"{_cell(row, 'seq')} | {row['batch_size']} |")
    return "\n".join(lines) + "\n"


def write_fit(rows: list[dict[str, Any]], directory: str | Path, settings: dict[str, Any]) -> list[Path]:
    """``<stem>.json``, ``.csv`` and ``.md`` in ``directory``, each through :func:`membench.files.write_atomic`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else {"model": "none", "precision": "none"}
    stem = "--".join(["fit", str(first["model"]), str(first["precision"]), settings_digest(settings)])
    paths = [directory / f"{stem}.{suffix}" for suffix in ("json", "csv", "md")]
    write_atomic(paths[0], json.dumps({"schema_version": SCHEMA_VERSION, "kind": KIND, "settings": settings,
                                       "rows": rows, "env": {"backend": "simulate", **provenance()}},
                                      indent=2) + "\n")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("rank", "budget_bytes", "seq_len", "max_batch_size", "peak_bytes_at_max_batch_size",
                   "batch_size", "max_seq_len", "peak_bytes_at_max_seq_len"):
        frame[column] = pd.array([None if v is None or v != v else int(v) for v in frame[column]], dtype="Int64")
    write_atomic(paths[1], frame.to_csv(index=False))
    write_atomic(paths[2], markdown(rows))
    return paths


def load_fit_documents(directory: str | Path) -> list[dict[str, Any]]:
    """Every ``membench-fit`` JSON document in ``directory``, by file name (foreign or unreadable files skipped)."""
    documents = []
    for path in sorted(Path(directory).glob("fit--*.json")):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and document.get("kind") == KIND and isinstance(document.get("rows"), list):
            documents.append(document)
    return documents


def load_fit_markdown(directory: str | Path) -> str:
    """The tables of every ``membench-fit`` JSON file in ``directory`` (skipping foreign files), for the report."""
    return "\n".join(markdown(document["rows"]) for document in load_fit_documents(directory))


def by_card_markdown(directory: str | Path, order: Sequence[str] = ()) -> str:
    """One table over every ``membench-fit`` file in ``directory``: the largest batch per model, method and GPU.

    Models named in ``order`` come first, in that order, then the rest by name; "—" means not even
    batch 1 fits (or the batch was not searched).
    """
    rows = [row for document in load_fit_documents(directory) for row in document["rows"]]
    if not rows:
        return ""
    devices = list(dict.fromkeys(row["device"] for row in rows))
    cells: dict[tuple, dict[str, str]] = {}
    for row in rows:
        cell = _cell(row, "batch")
        cells.setdefault((row["model"], row["method"], row["seq_len"]), {})[row["device"]] = \
            "—" if cell in ("none", "—") else cell
    rank = {model: index for index, model in enumerate(order)}
    # stable: each model's methods keep the files' order
    keys = sorted(cells, key=lambda key: (rank.get(key[0], len(rank)), key[0]))
    lines = ["| model | method | seq | " + " | ".join(devices) + " |",
             "|---|---|---:|" + "---:|" * len(devices)]
    for model, method, seq in keys:
        by_device = cells[(model, method, seq)]
        lines.append(f"| {model} | {method} | {seq} | " + " | ".join(by_device.get(d, "") for d in devices) + " |")
    return "\n".join(lines) + "\n"


def run_fit(cfg: DictConfig, overrides: Sequence[str], compose: Callable[..., DictConfig],
            available_methods: Sequence[str], out=sys.stdout) -> tuple[list[dict[str, Any]], list[Path]]:
    """The whole command: validate everything, search every method x GPU, write, print."""
    from membench.cli import to_run_config
    from membench.maxfit import method_runs

    settings: FitConfig = to_run_config(cfg.fit)
    runs = method_runs(settings.methods, [o for o in overrides if not o.lstrip("+~").startswith("fit.")],
                       compose, available_methods)
    if runs[0].backend.name not in ("auto", "simulate"):
        raise ConfigError(f"backend.name={runs[0].backend.name} does not apply: membench-fit simulates "
                          "(from traces); drop backend.name or use backend.name=simulate")
    devices = list(settings.devices or DEVICES)
    check_writable_dir(settings.output, key="fit.output")
    started = time.perf_counter()
    print(f"membench-fit: {runs[0].model.name} ({runs[0].train.precision}), methods "
          f"{', '.join(r.method.name for r in runs)}; GPUs {', '.join(devices)}", file=out, flush=True)
    rows = fit_rows(runs, devices, confirm=settings.confirm, search_cap=settings.search_cap,
                    log=lambda line: print(line, file=out, flush=True), by=settings.by,
                    dimensions=settings.dimensions)
    recorded = {"runs": [settings_record(r) for r in runs], "devices": devices, "search_cap": settings.search_cap,
                "by": settings.by, "dimensions": list(settings.dimensions)}
    paths = write_fit(rows, settings.output, recorded)
    print("", markdown(rows), sep="\n", file=out)
    print(f"{time.perf_counter() - started:.1f} s; wrote {', '.join(str(p) for p in paths)}", file=out, flush=True)
    return rows, paths


def main() -> None:
    """Entry point of ``membench-fit`` (a Hydra app on conf/fit.yaml)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from membench.cli import CONF_DIR
    from membench.collector import freeze_what_is_loaded, skip_final_collection

    freeze_what_is_loaded()  # torch, Hydra and membench, imported by now
    skip_final_collection()
    register_fit_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="fit")
    def app(cfg: DictConfig) -> None:
        overrides = list(HydraConfig.get().overrides.task)
        available = GlobalHydra.instance().config_loader().get_group_options("method")
        try:
            run_fit(cfg, overrides, hydra.compose, available)
        except ConfigError as error:
            print(f"membench-fit: error: {error}", file=sys.stderr)
            sys.exit(2)

    app()


register_fit_configs()
