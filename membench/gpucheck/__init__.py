"""``membench-gpucheck``: the GPU check kit. One command, one folder, at most 8 minutes on one H100/H200.

    membench-gpucheck                      # results/gpu/<device-key>/ (e.g. results/gpu/nvidia-h200/)
    membench-gpucheck --quick              # one check per model family
    membench-gpucheck --dry-run            # list the checks, their cost and coverage (no GPU needed)
    membench-gpucheck --out DIR --budget-s 300

It reads the idle card (capacity, ``mem_get_info``, cuBLAS workspaces: :mod:`membench.gpucheck.card`),
then runs every check of :data:`membench.gpucheck.checks.CHECKS` three times, each in a fresh process
(``python -m membench.cli``): on ``cuda``, and on ``simulate`` with fake CPU and fake CUDA tensors.
One check also runs with ``backend.memory_snapshot=true``. It writes ``runs/<backend>/`` (result
JSONs), ``snapshots/``, ``logs/``, ``summary.json`` (per check, measured against predicted peak
allocated, peak reserved, activations and step time, in bytes and %; segment counts and cudaMalloc
retries where both sides have them; the card; versions; the probes' dicts),
``validation.md`` (:mod:`membench.report.validate`'s tables) and ``README.md``. A budget guard
(``--budget-s``, 420 s by default) starts no job whose estimated cost no longer fits, records it as
``skipped: budget``, and kills anything still running when the time is up. Without a visible CUDA GPU
it refuses with exit status 2 (``--dry-run`` excepted).

Reserved memory: check ``llama-7b-lora_fa-bf16-expandable`` repeats the LLaMA-7B LoRA-FA reference
with ``backend.alloc_conf=expandable_segments:True`` on both sides, and the ``snapshot-replay`` probe
(:mod:`membench.gpucheck.probes`) replays the snapshot check's real allocator trace through the
caching-allocator model and lists the allocation sizes the simulated log misses
(:mod:`membench.gpucheck.snapshot_diff`).

**Adding a GPU check (later issues do it here, and only here).**

* A configuration to compare with simulate: append a :class:`~membench.gpucheck.checks.Check` to
  :data:`~membench.gpucheck.checks.CHECKS` (name, Hydra overrides, why, estimated cuda seconds).
  Its coverage is computed from the config; the tests require every method, precision, attention
  implementation and model family to stay covered.
* Anything else (a two-GPU FSDP2 run, a quantised model, the reserved-memory model against
  ``max_memory_reserved``): register a function with :func:`~membench.gpucheck.checks.probe`::

      @probe("fsdp2-two-gpu", "FSDP2 sharded peaks against simulate", estimated_s=60, gpus=2)
      def fsdp2(context):  # context.out, context.python, context.remaining_s, context.run(argv, timeout_s)
          status, output = context.run([context.python, "-m", "torch.distributed.run", ...], context.remaining_s)
          return {"exit_status": status, ...}  # goes into summary.json under probes.fsdp2-two-gpu

  Put GPU work in a subprocess (``context.run``), so no probe shares a CUDA process with another run.
  Probes run after the checks, in registration order; one that needs more GPUs than are visible, or
  more seconds than are left, is recorded as skipped with the reason. A probe module must be imported
  by this package (add its import below) to be registered.
"""

from membench.gpucheck.checks import CHECKS, PROBES, Check, Probe, ProbeContext, coverage, probe
from membench.gpucheck.run import device_key, main
from membench.gpucheck import probes  # noqa: E402,F401 - registers snapshot-replay
from membench.gpucheck import parallel_probe  # noqa: E402,F401 - registers fsdp2-two-gpu

__all__ = ["CHECKS", "PROBES", "Check", "Probe", "ProbeContext", "coverage", "device_key", "main", "probe"]
