"""The ``membench-maxfit`` command: one run per method from the command line, search, write, print."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd
from omegaconf import DictConfig

from membench.config import ADAPTER_ONLY_KEYS, RunConfig
from membench.errors import ConfigError
from membench.files import check_writable_dir
from membench.identity import settings_record
from membench.maxfit.config import MaxFitConfig, register_maxfit_configs
from membench.maxfit.files import _typed, write_maxfit
from membench.maxfit.rows import cuda_available_or_raise, maxfit_rows, uses_trace
from membench.maxfit.search import search_backend
from membench.maxfit.text import budget_label, fewest_gpus, markdown_table, sentences

#: Method keys that only adapter methods accept (RunConfig rejects them for method.kind=full).
NOTE = ("budget = the most max_memory_allocated may reach; the CUDA context, the allocator's "
        "reserve/fragmentation and a card's nominal-vs-usable gap are not included: leave that headroom.")
NOTE_BY = {"allocated": NOTE,
           "reserved": ("budget = the most reserved memory (the caching allocator's segments, fragmentation "
                        "included; max_memory_reserved on a GPU) may reach; the CUDA context (about 0.5 GiB) and a "
                        "card's nominal-vs-usable gap are not included: leave that headroom.")}


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def method_runs(methods: Sequence[str], overrides: Sequence[str], compose: Callable[..., DictConfig],
                available: Sequence[str]) -> list[RunConfig]:
    """One RunConfig per method name: the command line's overrides with ``method=<name>``.

    Adapter-only keys (``method.rank`` ...) are dropped for full fine-tuning, and
    ``method.lorafa_optimizer`` for methods other than LoRA-FA, so one command line serves all.
    """
    from membench.cli import to_run_config

    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ConfigError(f"maxfit.methods entry {unknown[0]!r} is not a method; "
                          f"choose from: {', '.join(sorted(available))}")
    rest = [o for o in overrides if _override_key(o) != "method" and not _override_key(o).startswith("maxfit.")]
    runs = []
    for name in dict.fromkeys(methods):
        kind = compose(config_name="maxfit", overrides=[o for o in rest if not _override_key(o).startswith("method.")]
                       + [f"method={name}"]).method.kind
        dropped = (ADAPTER_ONLY_KEYS if kind == "full" else ()) + (("method.lorafa_optimizer",) if kind != "lora_fa"
                                                                   else ())
        cfg = compose(config_name="maxfit",
                      overrides=[o for o in rest if _override_key(o) not in dropped] + [f"method={name}"])
        run = to_run_config(cfg)
        runs.append(RunConfig(**{f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)}))
    return runs


def with_world_sizes(runs: list[RunConfig], world_sizes: Optional[Sequence[int]]) -> list[RunConfig]:
    """Each run once per world size (``maxfit.world_sizes``, in order; None: the runs as they are).

    Raises:
        ConfigError: world sizes with ``parallel.strategy=none``, or one the run's options refuse.
    """
    if world_sizes is None:
        return runs
    if not runs[0].parallel.enabled:
        raise ConfigError(f"maxfit.world_sizes={list(world_sizes)} needs parallel.strategy=fsdp2 (or ddp) on the "
                          "command line: it says how the model is spread over the GPUs")
    return [dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, world_size=size))
            for run in runs for size in dict.fromkeys(world_sizes)]


def run_maxfit(cfg: DictConfig, overrides: Sequence[str], compose: Callable[..., DictConfig],
               available_methods: Sequence[str], out=sys.stdout) -> tuple[list[dict[str, Any]], Path, Path]:
    """The whole command: validate, search every method, write the files, print the table."""
    from membench.cli import to_run_config

    settings: MaxFitConfig = to_run_config(cfg.maxfit)  # the maxfit section alone: method=... may not suit all
    budgets = settings.budgets()
    runs = with_world_sizes(method_runs(settings.methods, overrides, compose, available_methods),
                            settings.world_sizes)
    if settings.verify:
        cuda_available_or_raise()
    check_writable_dir(settings.output, key="maxfit.output")  # the search takes minutes; fail before it
    started = time.perf_counter()
    how = search_backend(runs[0]) + (" (evaluating traces)" if uses_trace(runs[0]) else "")
    gpus = f"; world sizes {', '.join(map(str, settings.world_sizes))}" if settings.world_sizes else ""
    print(f"membench-maxfit: {runs[0].model.name}, methods {', '.join(dict.fromkeys(r.method.name for r in runs))}"
          f"{gpus}; "
          f"budgets {', '.join(budget_label(b) for b in budgets)}; searching with {how}",
          file=out, flush=True)
    rows = maxfit_rows(runs, settings.dimensions, budgets, search_cap=settings.search_cap,
                       verify_on_cuda=settings.verify, confirm=settings.confirm,
                       log=lambda line: print(line, file=out, flush=True), by=settings.by)
    elapsed = time.perf_counter() - started
    recorded = {"runs": [settings_record(r) for r in runs], "budgets_bytes": budgets,
                "dimensions": list(settings.dimensions), "search_cap": settings.search_cap,
                "verify": settings.verify,
                # by=allocated searches keep the file names they had before maxfit.by existed
                **({"by": settings.by} if settings.by != "allocated" else {})}
    json_path, csv_path = write_maxfit(rows, settings.output, recorded)
    frame = _typed(pd.DataFrame(rows))
    fewest = fewest_gpus(frame, {"batch_size": runs[0].workload.batch_size, "seq_len": runs[0].workload.seq_len})
    print("", markdown_table(frame), "", *sentences(frame), *([""] + fewest if fewest else []), "",
          NOTE_BY[settings.by], sep="\n", file=out)
    total = sum(row["new_probes"] for row in rows)
    print(f"{total} probes in {elapsed:.1f} s; wrote {json_path} and {csv_path}", file=out, flush=True)
    return rows, json_path, csv_path


def main() -> None:
    """Entry point of ``membench-maxfit`` (a Hydra app on conf/maxfit.yaml)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from membench.backends.base import BusyDeviceError
    from membench.cli import CONF_DIR
    from membench.collector import freeze_what_is_loaded, skip_final_collection

    freeze_what_is_loaded()  # torch, Hydra and membench, imported by now
    skip_final_collection()
    register_maxfit_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="maxfit")
    def app(cfg: DictConfig) -> None:
        overrides = list(HydraConfig.get().overrides.task)
        available = GlobalHydra.instance().config_loader().get_group_options("method")
        try:
            run_maxfit(cfg, overrides, hydra.compose, available)
        except ConfigError as error:
            print(f"membench-maxfit: error: {error}", file=sys.stderr)
            sys.exit(2)
        except BusyDeviceError as error:
            print(f"membench-maxfit: refusing to measure: {error}", file=sys.stderr)
            sys.exit(3)

    app()


if __name__ == "__main__":
    main()
