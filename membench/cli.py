"""``membench``: measure one fine-tuning configuration (or a Hydra multirun of them).

    membench                                   # roberta-large, LoRA-FA, auto backend
    membench model=llama-7b method=lora workload.batch_size=16 workload.seq_len=512 \
             method.rank=64 train.precision=bf16
    membench --config-dir ./my_conf model=my_model   # your own conf/model/*.yaml
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from membench.backends.base import BusyDeviceError
from membench.config import RunConfig, register_configs
from membench.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

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


def run_one(cfg: DictConfig) -> None:
    from membench.results import write_result
    from membench.runner import measure
    from membench.summary import summarize

    run = to_run_config(cfg)
    result = measure(run)
    path = write_result(result, run.results_dir)
    print(summarize(result), flush=True)
    print(f"  result: {path}", flush=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_one(cfg)
    except ConfigError as error:
        print(f"membench: error: {error}", file=sys.stderr)
        sys.exit(2)
    except BusyDeviceError as error:
        print(f"membench: refusing to measure: {error}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
