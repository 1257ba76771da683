"""``membench``: measure one fine-tuning configuration (or a Hydra multirun of them).

    membench                                   # roberta-large, LoRA-FA, auto backend
    membench model=llama-7b method=lora workload.batch_size=16 workload.seq_len=512 \
             method.rank=64 train.precision=bf16
    membench --config-dir ./my_conf model=my_model   # your own conf/model/*.yaml
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from membench import tracing
from membench.backends.base import BusyDeviceError
from membench.collector import freeze_what_is_loaded, skip_final_collection
from membench.config import RunConfig, register_configs
from membench.errors import ConfigError
from membench.parallel import torchrun
from membench.sweep import position

EXPERIMENT = re.compile(r"^experiment=")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped inside the package: works from a wheel

register_configs()
# PEFT reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps;
# the warning is about their interplay, not about anything a membench user can change.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Convert once, so every ``__post_init__`` check runs; unwrap OmegaConf's error wrapping."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as error:  # OmegaConf wraps errors raised in __post_init__
        cause = error.__cause__ or error.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(str(error)) from error


def job_number() -> Optional[int]:
    """This job's index in a multirun (from 0), or None for a single run."""
    hydra_config = HydraConfig.get()
    return hydra_config.job.num if hydra_config.mode == RunMode.MULTIRUN else None


def run_one(cfg: DictConfig, number: Optional[int] = None) -> tuple[str, str]:
    """Measure one config unless its result exists (:func:`membench.tracing.measure`: simulated runs
    with ``backend.trace=auto`` come from a cached trace, so a sweep pays one trace per structure).

    Returns:
        (state, line): ``ok``/``oom``/``error``/``skipped`` and the progress line printed for it.
    """
    run = to_run_config(cfg)
    if torchrun.launched_by_torchrun():
        return _run_under_torchrun(run)
    return measure_and_write(run, number)


def measure_and_write(run: RunConfig, number: Optional[int] = None) -> tuple[str, str]:
    """:func:`run_one` for a validated RunConfig (the sweeper evaluates jobs a cached trace answers with it)."""
    from membench.files import check_writable_dir
    from membench.results import write_result
    from membench.summary import describe_config, headline, summarize
    from membench.sweep import existing_result

    if not run.force and (done := existing_result(run)) is not None:
        line = (f"{position(number)}{describe_config(done.config)} → already measured ({done.status.state}), "
                f"skipped; force=true re-measures")
        print(line, flush=True)
        return "skipped", line
    check_writable_dir(run.results_dir, key="results_dir")  # before minutes of measuring, not after
    result = tracing.measure(run)  # simulate + backend.trace=auto: from a cached trace where one covers it
    path = write_result(result, run.results_dir)
    line = f"{position(number)}{headline(result)}"
    if number is None:
        print(summarize(result), flush=True)
        print(f"  result: {path}", flush=True)
    else:
        print(line, flush=True)
    return result.status.state, line


def _run_under_torchrun(run: RunConfig) -> tuple[str, str]:
    """One rank of ``torchrun -m membench``: always measures (every rank must take part, and ranks on
    other nodes cannot see rank 0's files); only global rank 0 writes and prints (membench.parallel.torchrun)."""
    from membench.files import check_writable_dir
    from membench.results import write_result
    from membench.summary import headline, summarize

    if torchrun.writes_results():
        check_writable_dir(run.results_dir, key="results_dir")
    result = torchrun.measure_under_torchrun(run)
    if result is None:
        return "ok", ""
    path = write_result(result, run.results_dir)
    print(summarize(result), flush=True)
    print(f"  result: {path}", flush=True)
    return result.status.state, headline(result)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def task(cfg: DictConfig) -> tuple[str, str]:
    """One Hydra job: one configuration."""
    skip_final_collection()  # also in a sweep's worker processes, which run jobs through here
    number = job_number()
    try:
        return run_one(cfg, number)
    except ConfigError as error:
        if number is not None:  # the sweeper validated configs; this one failed on the model's shape
            overrides = " ".join(HydraConfig.get().overrides.task)
            line = f"{position(number)}{overrides} → invalid: {error}"
            print(line, flush=True)
            return "invalid", line
        print(f"membench: error: {error}", file=sys.stderr)
        sys.exit(2)
    except BusyDeviceError as error:
        print(f"membench: refusing to measure: {error}", file=sys.stderr)
        sys.exit(3)


def main() -> None:
    """The ``membench`` command.

    ``experiment=NAME`` is shorthand for Hydra's ``experiment@_global_=NAME``: experiment files
    set keys anywhere in the config (the sweep grids live under ``hydra.sweeper``), and their first
    line is kept for the command that runs them rather than a ``# @package _global_`` header.
    """
    sys.argv = [EXPERIMENT.sub("experiment@_global_=", arg) for arg in sys.argv]
    freeze_what_is_loaded()  # torch, Hydra and membench, imported with this module
    skip_final_collection()
    task()


if __name__ == "__main__":
    main()
