"""The simulation predicts the H100's measured peaks (membench/data/h100_reference.csv) within 1%.

These simulate full-size models (up to LLaMA-7B) on fake tensors: seconds
each, no memory. They are the check that CI can run without a GPU.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
from pathlib import Path

import pytest

from conftest import run_config
import membench
from membench.files import read_commented_csv
from membench.runner import measure

GiB = 1 << 30
TOLERANCE = 0.01
REFERENCE = Path(membench.__file__).parent / "data" / "h100_reference.csv"



@contextlib.contextmanager
def strided_t5_bias_mask():
    """transformers as the reference ran it: T5's SDPA mask without the ``.contiguous()`` added later.

    Built from the installed source minus that one call, so the rest of the function is today's.
    """
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.create_position_bias_mask
    source = textwrap.dedent(inspect.getsource(original))
    assert "return position_bias_mask.contiguous()" in source, "transformers changed; revisit this emulation"
    namespace: dict = {}
    exec(source.replace("return position_bias_mask.contiguous()", "return position_bias_mask"),  # noqa: S102
         sdpa_attention.__dict__, namespace)
    sdpa_attention.create_position_bias_mask = namespace["create_position_bias_mask"]
    try:
        yield
    finally:
        sdpa_attention.create_position_bias_mask = original


EMULATIONS = {"": contextlib.nullcontext, "strided-t5-bias-mask": strided_t5_bias_mask}


def reference_rows():
    for row in read_commented_csv(REFERENCE):
        yield pytest.param(row["case"], row["overrides"].split(), row["h100_peak_gib"], row["emulate"],
                           id=row["case"], marks=pytest.mark.slow)


@pytest.mark.parametrize(("case", "overrides", "h100", "emulate"), list(reference_rows()))
def test_simulation_matches_h100(case, overrides, h100, emulate):
    with EMULATIONS[emulate]():
        result = measure(run_config(*overrides, "backend.name=simulate", "backend.device=h100-80gb"))
    peak = result.metrics["peak_allocated_bytes"]
    capacity = result.env["device_total_memory_bytes"]
    if h100 == "oom":
        assert result.status.state == "oom"
        assert peak > capacity
        return
    assert result.status.state == "ok", result.status.message
    error = peak / GiB / float(h100) - 1
    assert abs(error) <= TOLERANCE, f"{case}: simulated {peak / GiB:.2f} GiB vs H100 {h100} GiB ({error:+.1%})"
