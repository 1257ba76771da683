"""A run's identity: the config as recorded in its result, and the run id (file stem) derived from it.

The id ends in a hash of the config's *identity fields*, chosen by explicit, versioned rules
so that adding a config field never renames existing results:

* :data:`V1_FIELDS` lists, per config section, the fields identity version 1 hashes (the
  fields that existed when the rule was frozen). They are hashed whenever recorded.
* Any other field enters the hash only when its value differs from its dataclass default:
  a new field with a default renames nothing, a run that sets it gets its own id.
* ``results_dir`` and ``force`` (:data:`OUTPUT_ONLY`) never do, and backend knobs a backend
  ignores (:data:`IRRELEVANT_BACKEND_KEYS`) are not recorded for it, so they never do either.
* Backend knobs that choose how a result is computed, not what it is
  (:data:`UNRECORDED_BACKEND_KEYS`: ``backend.trace``, whose ``auto`` and ``off`` give the same
  bytes, and ``backend.trace_symbols``), are never recorded, so never hashed.

A change to what existing fields mean would need ``IDENTITY_VERSION = 2`` and a new list;
version 1 hashes no version marker, which is what keeps every committed id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Optional

from membench.config import RunConfig

IDENTITY_VERSION = 1
#: The fields the version-1 hash covers, per section of the recorded config.
V1_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("name", "model_type", "task", "hf_config", "config_path", "attn_implementation", "target_modules",
              "exclude_modules"),
    "method": ("name", "kind", "gradient_checkpointing", "rank", "alpha", "target_modules", "lora_dropout",
               "adapter_dtype", "lorafa_optimizer"),
    "workload": ("batch_size", "seq_len", "target_len", "warmup_steps", "measured_steps", "seed"),
    "train": ("precision", "optimizer", "optimizer_impl", "lr"),
    "backend": ("name", "device", "cuda_semantics", "fake_device"),
}
#: RunConfig fields that say where output goes, not what was measured.
OUTPUT_ONLY = ("results_dir", "force")
#: Backend knobs that do not affect a backend: not recorded for it, so never part of its id.
IRRELEVANT_BACKEND_KEYS = {"cuda": ("device", "fake_device", "cuda_semantics"), "cpu": ("device", "fake_device")}
#: Backend knobs that choose how the same result is computed: never recorded, never part of any id.
UNRECORDED_BACKEND_KEYS = ("trace", "trace_symbols")
#: Fields added after results were committed: recorded only when set, so a result of a run that leaves
#: them at their defaults is the same file, byte for byte apart from provenance, as one written before.
RECORDED_WHEN_SET = {"backend": ("memory_snapshot",), "model": ("quantization_skip_modules",)}


def recorded_config(run: RunConfig, backend_name: str) -> dict:
    """The config as stored in the result: every field, resolved backend, no output-only fields.

    The backend knobs ``backend_name`` ignores and :data:`UNRECORDED_BACKEND_KEYS` are left out, and
    :data:`RECORDED_WHEN_SET` (``backend.memory_snapshot`` among them) are recorded only when set (results
    written before they existed do not have them).
    """
    config = dataclasses.asdict(run)
    for key in OUTPUT_ONLY:
        config.pop(key)
    backend = config["backend"]
    backend["name"] = backend_name
    for key in IRRELEVANT_BACKEND_KEYS.get(backend_name, ()):
        backend.pop(key)
    for key in UNRECORDED_BACKEND_KEYS:
        backend.pop(key, None)
    for section, names in RECORDED_WHEN_SET.items():
        defaults = _defaults(getattr(run, section))
        for name in names:
            if config[section].get(name) == defaults[name]:
                config[section].pop(name, None)
    return config


#: Config sections added after identity version 1. A record of a run that other files hash for their
#: names (membench-maxfit's and membench-fit's settings) leaves such a section out while it holds its
#: defaults, so those names do not change either.
LATER_SECTIONS = ("parallel",)


def settings_record(run: RunConfig) -> dict:
    """``run`` as membench-maxfit and membench-fit record it: every field but the output-only ones, and a
    section of :data:`LATER_SECTIONS` only when it is not at its defaults."""
    config = dataclasses.asdict(run)
    for key in OUTPUT_ONLY:
        config.pop(key)
    for key in LATER_SECTIONS:
        if config.get(key) == _as_recorded(getattr(RunConfig(), key)):
            config.pop(key)
    return config


def settings_digest(settings: dict[str, Any]) -> str:
    """The digest membench-fit and membench-maxfit name their files by (the same search overwrites its own file).

    ``settings`` with each run reduced to its :func:`identity_fields`, by the run ids' rules: a
    config field added later, at its default, renames no file (files are read by content, so
    ``settings`` itself keeps every field).
    """
    if "runs" in settings:
        settings = {**settings, "runs": [identity_fields(run) for run in settings["runs"]]}
    return config_digest(settings)


def _defaults(instance: Any) -> dict[str, Any]:
    """Each field's default value in ``instance``'s dataclass (fields without one are left out)."""
    defaults = {}
    for field in dataclasses.fields(instance):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def identity_fields(config: dict[str, Any], schema: Optional[RunConfig] = None) -> dict[str, Any]:
    """The part of a recorded config that the run id hashes (see the module docstring).

    Args:
        config: A recorded config (:func:`recorded_config`, or a result file's ``config``).
        schema: The RunConfig the config came from, whose dataclasses give the defaults of
            fields outside :data:`V1_FIELDS`; ``None`` uses the default ``RunConfig()``.

    Returns:
        ``config`` in its recorded nesting, without output-only fields and without the fields
        outside :data:`V1_FIELDS` that hold their default.
    """
    schema = RunConfig() if schema is None else schema
    top_defaults = _defaults(schema)
    identity: dict[str, Any] = {}
    for key, value in config.items():
        if key in OUTPUT_ONLY:
            continue
        section = getattr(schema, key, None)
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            # Field by field, so a new section (or a new field in one) behaves like any new field.
            frozen, defaults = V1_FIELDS.get(key, ()), _defaults(section)
            kept = {name: item for name, item in value.items()
                    if name in frozen or name not in defaults or item != _as_recorded(defaults[name])}
            if kept or key in V1_FIELDS:
                identity[key] = kept
        elif key in V1_FIELDS or key not in top_defaults or value != _as_recorded(top_defaults[key]):
            identity[key] = value
    return identity


def _as_recorded(value: Any) -> Any:
    """A default as ``dataclasses.asdict`` records it (a nested dataclass becomes a dict)."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def config_digest(config: dict[str, Any]) -> str:
    """Short stable hash of a JSON-able dict: equal dicts give equal digests."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def run_id(config: dict[str, Any], backend_label: str, schema: Optional[RunConfig] = None) -> str:
    """Readable, unique file stem: model--method--shape--precision--backend--hash.

    Args:
        config: The recorded config.
        backend_label: ``cuda``, ``cpu`` or ``simulate-<device>`` (:func:`backend_label`).
        schema: The RunConfig behind ``config``, for the defaults of fields outside
            :data:`V1_FIELDS` (see :func:`identity_fields`).
    """
    method = config["method"]
    workload = config["workload"]
    label = method["name"]
    if method["kind"] != "full":
        label += f"--r{method['rank']}"
    shape = f"bs{workload['batch_size']}-seq{workload['seq_len']}"
    if workload.get("target_len"):
        shape += f"-tgt{workload['target_len']}"
    digest = config_digest(identity_fields(config, schema))
    return "--".join([config["model"]["name"], label, shape, config["train"]["precision"], backend_label, digest])


def _label(backend_name: str, device: Optional[str]) -> str:
    return f"simulate-{device}" if backend_name == "simulate" else backend_name


def backend_label(run: RunConfig, backend_name: str) -> str:
    """The backend part of the run id: ``simulate-<device>`` for simulation, else the backend's name."""
    return _label(backend_name, run.backend.device)


def recorded_run_id(config: dict[str, Any]) -> str:
    """The run id of a result, recomputed from its recorded ``config`` alone.

    A result file whose name differs from this was written under other identity rules.
    """
    backend = config["backend"]
    return run_id(config, _label(backend["name"], backend.get("device")))


def result_id(run: RunConfig) -> str:
    """The run id (file stem) this config's result will have."""
    from membench.backends import resolve_name  # imports torch; recorded_config and run_id do not need it

    name = resolve_name(run.backend)
    return run_id(recorded_config(run, name), backend_label(run, name), schema=run)
