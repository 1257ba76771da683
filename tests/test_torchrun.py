"""``torchrun -m membench``: who writes the result, and the checks before anything is built (no GPU needed)."""

from __future__ import annotations

import pytest

from conftest import tiny
from membench.errors import ConfigError
from membench.parallel.launch import combine
from membench.parallel.torchrun import check_launch, launched_by_torchrun, rank_of, writes_results
from membench.results import Result, Status

NODE_1_RANK_9 = {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16"}


def test_only_global_rank_0_writes_also_on_other_nodes():
    assert not launched_by_torchrun({}) and writes_results({})  # a plain membench process writes
    assert launched_by_torchrun(NODE_1_RANK_9) and rank_of(NODE_1_RANK_9) == 9
    assert not writes_results(NODE_1_RANK_9)
    assert not writes_results({"RANK": "8", "LOCAL_RANK": "0", "WORLD_SIZE": "16"})  # node 1's first process
    assert writes_results({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "16"})


@pytest.mark.parametrize(
    ("overrides", "backend", "expected"),
    [
        ((), "cuda", "torchrun started 16 processes but parallel.strategy=none"),
        (("parallel.strategy=fsdp2", "parallel.world_size=8"), "cuda",
         "parallel.world_size=8 but torchrun started 16 processes"),
        (("parallel.strategy=fsdp2", "parallel.world_size=16"), "simulate", "run it without torchrun"),
    ],
)
def test_a_launch_that_does_not_match_the_config_is_refused(overrides, backend, expected):
    with pytest.raises(ConfigError, match=expected):
        check_launch(tiny("tiny-llama", "full", *overrides, backend="simulate"), backend, NODE_1_RANK_9)
    check_launch(tiny("tiny-llama", "full", "parallel.strategy=fsdp2", "parallel.world_size=16"), "cuda", NODE_1_RANK_9)


def _rank(peak: int, state: str = "ok") -> Result:
    return Result("run", {}, Status(state, None if state == "ok" else "backward", None if state == "ok" else "boom"),
                  {"peak_allocated_bytes": peak, "weight_bytes": 7}, {"backend": "cuda"})


def test_the_combined_result_is_rank_0s_with_every_rank_and_the_maximum_peak():
    combined = combine([_rank(100), _rank(300), _rank(200)])
    assert combined.metrics["peak_allocated_bytes"] == 300 and combined.metrics["weight_bytes"] == 7
    assert [entry["peak_allocated_bytes"] for entry in combined.env["ranks"]] == [100, 300, 200]
    failed = combine([_rank(100), _rank(50, "oom")])
    assert (failed.status.state, failed.status.phase) == ("oom", "backward")
