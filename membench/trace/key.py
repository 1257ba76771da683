"""The cache key of a trace: everything in a run's identity except the sizes a trace leaves symbolic."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from membench.compat import installed_version
from membench.config import BITSANDBYTES_OPTIMIZERS, RunConfig
from membench.devices import device_profile
from membench.identity import recorded_config

#: Bump when the layout of :class:`membench.trace.record.Trace` or what it means changes.
TRACE_FORMAT_VERSION = 4  # 2: Trace.classes (residue classes); 3: Trace.conditions; 4: the LoRA rank R
#: Workload fields a trace keeps symbolic (B, S, T).
SYMBOLIC_FIELDS = ("batch_size", "seq_len", "target_len")
#: Method fields out of the key: the rank is the symbol R (a trace whose adapters could not be made R
#: wide holds for its own rank only: :attr:`membench.trace.record.Trace.validity`), and alpha sets
#: only the scale ``alpha / rank``, a value PEFT's forward multiplies by whatever it is.
RANK_FIELDS = ("rank", "alpha")
#: Backend knobs that say how a result is computed, not what it is.
HOW_NOT_WHAT = ("trace", "trace_symbols")
#: Backend knobs a simulated step's allocation log does not depend on, except through the cuBLAS
#: workspaces (hashed instead, as bytes): the card's capacity decides only the OOM verdict, and the
#: allocator settings only the reserved-memory replay, both made per run when a trace is evaluated.
#: So one trace answers every card with the same workspaces (compute capability 9.x and newer; older).
DEVICE_FIELDS = ("device", "device_memory_gib", "compute_capability", "alloc_conf")
#: The parts of membench whose code decides what a simulated step allocates (hashed into the key).
_SIMULATION_CODE = ("*.py", "backends/*.py", "compat/*.py", "trace/*.py")
_PACKAGE = Path(__file__).resolve().parent.parent
_code_digest: Optional[str] = None


def code_digest() -> str:
    """A digest of membench's simulation code, so a cached trace never outlives the code that recorded it."""
    global _code_digest
    if _code_digest is None:
        digest = hashlib.sha256()
        for pattern in _SIMULATION_CODE:
            for path in sorted(_PACKAGE.glob(pattern)):
                digest.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _code_digest = digest.hexdigest()[:16]
    return _code_digest


def fake_device(run: RunConfig) -> str:
    """The fake tensor device ``simulate`` will use for ``run`` (as :class:`SimulateBackend` resolves it)."""
    wanted = run.backend.fake_device
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


def key_fields(run: RunConfig) -> dict:
    """What the key hashes: the recorded simulate config without B, S, T, rank and alpha, plus versions and the fake device."""
    config = recorded_config(run, "simulate")
    for name in SYMBOLIC_FIELDS:
        config["workload"].pop(name, None)
    for name in RANK_FIELDS:
        config["method"].pop(name, None)
    for name in HOW_NOT_WHAT + DEVICE_FIELDS:
        config["backend"].pop(name, None)
    fields = {"config": config, "torch": torch.__version__, "transformers": installed_version("transformers"),
              "peft": installed_version("peft"), "trace_format": TRACE_FORMAT_VERSION, "membench_code": code_digest(),
              "fake_device": fake_device(run), "workspace_bytes": device_profile(run.backend).runtime_overhead_bytes}
    if run.train.optimizer in BITSANDBYTES_OPTIMIZERS:  # its optimizer code decides the state (other runs' keys unchanged)
        fields["bitsandbytes"] = installed_version("bitsandbytes")
    return fields


def trace_key(run: RunConfig) -> str:
    """``<model>--<method>--<precision>--<digest>``: equal for runs that differ only in B, S, T and the LoRA rank (and alpha)."""
    canonical = json.dumps(key_fields(run), sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:20]
    return "--".join([run.model.name, run.method.name, run.train.precision, digest])
