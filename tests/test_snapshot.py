"""backend.memory_snapshot: the CUDA allocator's history, written beside the result; checked without a GPU.

A stand-in for torch.cuda answers what CudaBackend asks, and the model runs on
the CPU, so the whole pipeline (record -> run -> dump -> stop) runs for real.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import membench.runner
from conftest import TINY_MODELS, run_config, tiny
from membench.backends.cuda import SNAPSHOT_MAX_ENTRIES, CudaBackend
from membench.errors import ConfigError
from membench.results import write_result
from membench.identity import recorded_config, result_id
from membench.plan import plan
from membench.runner import execute, measure

GiB = 1 << 30


@pytest.fixture
def gpu(monkeypatch):
    """A pretend idle GPU whose allocator history calls are recorded in ``calls``; tensors stay on the CPU."""
    calls: list[tuple] = []
    memory = torch.cuda.memory

    def record_memory_history(enabled="all", context="all", stacks="all", max_entries=0, device=None,
                              clear_history=False):
        calls.append(("record", enabled, max_entries, clear_history))

    def dump_snapshot(filename="dump_snapshot.pickle"):
        calls.append(("dump", filename))
        with open(filename, "wb") as handle:
            pickle.dump({"segments": [], "device_traces": [[]]}, handle)

    for name, value in {
        "is_available": lambda: True, "current_device": lambda: 0,
        "memory_allocated": lambda device=None: 0, "memory_reserved": lambda device=None: 0,
        "max_memory_allocated": lambda device=None: 0, "max_memory_reserved": lambda device=None: 0,
        "mem_get_info": lambda device=None: (79 * GiB, 80 * GiB), "get_device_name": lambda device=None: "Pretend GPU",
        "get_device_properties": lambda device=None: SimpleNamespace(name="Pretend GPU", total_memory=80 * GiB),
        "reset_peak_memory_stats": lambda device=None: None, "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(memory, "_record_memory_history", record_memory_history)
    monkeypatch.setattr(memory, "_dump_snapshot", dump_snapshot)
    return calls


def pretend_cuda_backend() -> CudaBackend:
    backend = CudaBackend()
    backend.device = torch.device("cpu")  # the real step, on the CPU; the counters come from the stand-in
    return backend


def test_snapshot_is_recorded_dumped_and_stopped_in_order(gpu, tmp_path):
    run = tiny("tiny-llama", "lora", "backend.memory_snapshot=true", f"results_dir={tmp_path}", backend="cuda")
    result = execute(plan(run), pretend_cuda_backend())
    assert result.status.state == "ok", result.status
    snapshot = tmp_path / f"{result.run_id}.snapshot.pickle"
    assert gpu == [("record", "all", SNAPSHOT_MAX_ENTRIES, True), ("dump", str(tmp_path / f".tmp-{snapshot.name}")),
                   ("record", None, 0, False)]
    assert result.env["memory_snapshot"] == str(snapshot)
    assert "memory_snapshot_error" not in result.env
    assert pickle.loads(snapshot.read_bytes())["segments"] == []
    json_path = write_result(result, tmp_path)
    assert json_path.name.removesuffix(".json") == snapshot.name.removesuffix(".snapshot.pickle")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([json_path.name, snapshot.name])  # no temp file
    assert json.loads(json_path.read_text())["config"]["backend"]["memory_snapshot"] is True
    # Saved-tensor attribution on the cuda path (a dispatch mode, no allocator model) still adds up.
    metrics = result.metrics
    assert sum(metrics["saved_bytes_by_op"].values()) == metrics["saved_tensor_bytes"] > 0
    assert sum(metrics["saved_bytes_by_module"].values()) == metrics["saved_tensor_bytes"]
    assert "aten.mm" in metrics["saved_bytes_by_op"]


@pytest.mark.parametrize(("model", "method"), [*((model, "lora") for model in TINY_MODELS),
                                               ("tiny-t5", "full"), ("tiny-llama", "lora_recompute")])
def test_cuda_attribution_matches_the_allocator_model(gpu, model, method):
    """The dispatch mode the cuda backend uses attributes exactly as the cpu backend's allocator model does."""
    on_cuda = execute(plan(tiny(model, method, backend="cuda")), pretend_cuda_backend()).metrics
    # Raw CPU kernels on both sides: the pretend GPU runs the CPU's dropout and attention.
    on_cpu = measure(tiny(model, method, "backend.cuda_semantics=false", backend="cpu")).metrics
    for field in ("saved_tensor_bytes", "saved_bytes_by_module", "saved_bytes_by_op", "saved_bytes_by_module_op"):
        assert on_cuda[field] == on_cpu[field], field


def test_snapshot_is_written_on_oom(gpu, tmp_path, monkeypatch):
    """An OOM is when the snapshot matters most: it is still dumped, and recording still stops."""
    import membench.step

    def oom_step(self, *args, **kwargs):
        self.progress.phase = "backward"
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(membench.step.MeasuredLoop, "step", oom_step)
    run = tiny("tiny-llama", "lora", "backend.memory_snapshot=true", f"results_dir={tmp_path}", backend="cuda")
    result = execute(plan(run), pretend_cuda_backend())
    assert (result.status.state, result.status.phase) == ("oom", "backward")
    assert [call[0] for call in gpu] == ["record", "dump", "record"]
    assert gpu[-1][1] is None
    assert Path(result.env["memory_snapshot"]).is_file()


def test_a_failed_dump_keeps_the_result(gpu, tmp_path, monkeypatch):
    def full_disk(filename="dump_snapshot.pickle"):
        gpu.append(("dump", filename))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", full_disk)
    run = tiny("tiny-llama", "lora", "backend.memory_snapshot=true", f"results_dir={tmp_path}", backend="cuda")
    result = execute(plan(run), pretend_cuda_backend())
    assert result.status.state == "ok"
    assert result.env["memory_snapshot"] is None
    assert "No space left on device" in result.env["memory_snapshot_error"]
    assert gpu[-1] == ("record", None, 0, False)  # recording stopped all the same


def test_no_snapshot_no_recording(gpu, tmp_path):
    result = execute(plan(tiny("tiny-llama", "lora", f"results_dir={tmp_path}", backend="cuda")),
                     pretend_cuda_backend())
    assert result.status.state == "ok"
    assert gpu == []
    assert "memory_snapshot" not in result.env
    assert "memory_snapshot" not in result.config["backend"]


@pytest.mark.parametrize("backend", ["simulate", "cpu"])
def test_snapshot_without_a_gpu_opens_in_memory_viz(backend, tmp_path):
    """simulate and cpu write the caching-allocator model's snapshot; torch's own viewer code reads it."""
    from torch.cuda import _memory_viz

    result = measure(tiny("tiny-llama", "lora", "backend.memory_snapshot=true", f"results_dir={tmp_path}",
                          backend=backend))
    assert result.status.state == "ok"
    path = Path(result.env["memory_snapshot"])
    assert path.parent == tmp_path and path.name.endswith(".snapshot.pickle")
    snapshot = pickle.loads(path.read_bytes())
    assert sorted(snapshot) == ["allocator_settings", "device_traces", "segments"]
    trace = snapshot["device_traces"][0]
    allocs = [event for event in trace if event["action"] == "alloc"]
    assert {event["category"] for event in allocs} >= {"parameter", "activation", "gradient", "optimizer state",
                                                       "temporary"}
    # Frames: the module the allocation was made for and the op that made it, then step and phase.
    by_phase: dict[str, set[str]] = {}
    for event in allocs:
        made, step = event["frames"][0], event["frames"][1]
        if step["filename"].startswith("measured"):
            by_phase.setdefault(step["name"], set()).add(f"{made['filename']} {made['name']}")
    layer = "base_model.model.model.layers.0"
    assert f"{layer}.self_attn.q_proj.lora_B.default aten.mm" in by_phase["forward"]
    assert f"{layer}.mlp.act_fn aten.silu" in by_phase["forward"]
    # backward: the module whose forward made the autograd node (grad of SiLU, grads of LoRA's B)
    assert f"{layer}.mlp.act_fn aten.silu_backward" in by_phase["backward"]
    assert f"{layer}.self_attn.q_proj.lora_B.default aten.mm" in by_phase["backward"]
    assert any(frame.startswith("(no module) ") for frame in by_phase["optimizer_step"])  # AdamW's temporaries
    # Naming modules changes no figure.
    plain = measure(tiny("tiny-llama", "lora", f"results_dir={tmp_path}", backend=backend))
    for figure in ("peak_allocated_bytes", "peak_reserved_bytes", "phase_peak_bytes", "saved_tensor_bytes"):
        assert result.metrics[figure] == plain.metrics[figure], figure
    for page in (_memory_viz.trace_plot(snapshot), _memory_viz.segment_plot(snapshot)):
        assert isinstance(page, str) and "<script" in page
    assert "segment" in _memory_viz.segsum(snapshot).lower()
    # The final segments agree with the trace (the viewer walks back from them) and with the reserved peak.
    assert 0 < sum(s["total_size"] for s in snapshot["segments"]) <= result.metrics["peak_reserved_bytes"]


def test_snapshot_leaves_other_run_ids_alone():
    """The option is recorded only when on: ids of runs without it are what they were before it existed."""
    assert result_id(tiny("tiny-llama", "lora", backend="cuda")) == "tiny-llama--lora--r8--bs2-seq16--fp32--cuda--98295970"
    assert result_id(tiny("tiny-llama", "lora", backend="cpu")) == "tiny-llama--lora--r8--bs2-seq16--fp32--cpu--88622d7d"
    assert result_id(tiny("tiny-llama", "lora", backend="simulate")) == \
        "tiny-llama--lora--r8--bs2-seq16--fp32--simulate-h100-80gb--6f7266e4"
    assert result_id(run_config("backend.name=simulate")) == \
        "roberta-large--lora_fa--r8--bs32-seq128--fp32--simulate-h100-80gb--fc068075"
    plain = tiny("tiny-llama", "lora", backend="cuda")
    snapshot = tiny("tiny-llama", "lora", "backend.memory_snapshot=true", backend="cuda")
    assert "memory_snapshot" not in recorded_config(plain, "cuda")["backend"]
    assert recorded_config(snapshot, "cuda")["backend"]["memory_snapshot"] is True
    assert result_id(snapshot) != result_id(plain)  # a snapshot run (slower steps) does not replace a plain one
