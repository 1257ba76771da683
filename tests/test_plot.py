"""membench-plot: a run's measured step as a memory timeline (allocated, reserved, bytes by category)."""

from __future__ import annotations

from conftest import tiny
from membench.plot import main, record_timeline
from membench.reserved import CATEGORIES
from membench.results import write_result
from membench.runner import measure


def test_timeline_of_a_result_is_drawn(tmp_path):
    result = measure(tiny("tiny-llama", "lora", backend="simulate"))
    path = write_result(result, tmp_path)
    timeline = record_timeline(result.config)
    assert [phase for phase, _, _ in timeline.phases] == ["forward", "backward", "optimizer_step"]
    assert timeline.peak_reserved == result.metrics["peak_reserved_bytes"]
    for index, allocated in enumerate(timeline.allocated):
        stacked = sum(timeline.stacks[category][index] for category in CATEGORIES)
        assert stacked <= allocated <= timeline.reserved[index]  # unsplit blocks count whole in allocated
    assert timeline.stacks["workspace"][0] > 0 and max(timeline.stacks["activation"]) > 0
    output = tmp_path / "timeline.png"
    assert main([str(path), str(path), "-o", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
