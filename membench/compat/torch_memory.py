"""torch: storages, op schemas, global module hooks, AdamW's step counters, the allocator's history.

Also the classes torch documents only under private module paths.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn

from membench.compat._checks import incompatible, parameter_names, require

try:  # documented by torch, but only under these private paths
    from torch._ops import OpOverload
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError as _missing:
    raise incompatible("torch", f"cannot import {_missing.name or _missing}",
                       "for fake tensors and for the dispatch mode that counts every op's output") from _missing


# --- storages: identity and lifetime (allocator, tracker, saved_tensors) -------------------------

_STORAGE_NEED = "as the identity of a live storage, which views share (also for fake tensors)"


def storage_id(storage: torch.UntypedStorage) -> int:
    """``storage._cdata``: the address of the C++ storage; unique among live storages, shared by views.

    No public equivalent works for fake tensors (``data_ptr()`` is 0 for all of
    them). Costs one attribute read; the check is the ``except``, free until it fires.
    """
    try:
        return storage._cdata
    except AttributeError:
        raise incompatible("torch", "has no UntypedStorage._cdata", _STORAGE_NEED) from None


def when_storage_freed(storage: torch.UntypedStorage, callback: Callable, *args) -> None:
    """Call ``callback(*args)`` when ``storage`` dies.

    Relies on torch keeping one Python object per live storage (so it dies with
    the storage, not with a wrapper) and on that object taking weak references.
    """
    try:
        weakref.finalize(storage, callback, *args)
    except TypeError as error:
        raise incompatible("torch", f"storages take no weak references ({error})",
                           "to subtract a storage's bytes when it is freed") from None


def check_storage_identity() -> None:
    tensor = torch.empty(8)
    storage = tensor.untyped_storage()
    identity = storage_id(storage)
    if not isinstance(identity, int) or storage_id(tensor[2:].untyped_storage()) != identity:
        raise incompatible("torch", f"gives UntypedStorage._cdata={identity!r}, not one int shared by views",
                           _STORAGE_NEED)
    if tensor[2:].untyped_storage() is not storage:
        raise incompatible("torch", "makes a new Python object for each untyped_storage() call",
                           "to see a storage die when its tensors do (weakref.finalize)")
    freed = []
    when_storage_freed(storage, freed.append, True)
    del tensor, storage
    if freed != [True]:
        raise incompatible("torch", "kept a storage's Python object alive after its tensors died",
                           "to subtract a storage's bytes when it is freed")


# --- ATen op schemas (saved_tensors.OpOrigins) --------------------------------------------------

def op_returns_alias(op: OpOverload) -> bool:
    """Whether ``op`` returns a view of, or writes into, an input (``OpOverload._schema``): it made no storage."""
    return any(ret.alias_info is not None for ret in op._schema.returns)


def check_op_schema() -> None:
    need = "to tell ops that make storage from views and in-place ops"
    if not hasattr(torch.ops.aten.mm.default, "_schema"):
        raise incompatible("torch", "has no OpOverload._schema", need)
    if not op_returns_alias(torch.ops.aten.view.default) or op_returns_alias(torch.ops.aten.mm.default):
        raise incompatible("torch", "gives schemas without alias_info on view's return", need)


# --- global module hooks (saved_tensors.SavedTensorCounter) -------------------------------------

_HOOKS_NEED = "to know which module's forward saved each tensor"


def checked_module_hook_registrars() -> tuple[Callable, Callable]:
    module = nn.modules.module
    return (require("torch", module, "torch.nn.modules.module.register_module_forward_pre_hook", ["hook"],
                    _HOOKS_NEED),
            require("torch", module, "torch.nn.modules.module.register_module_forward_hook",
                    ["hook", "with_kwargs", "always_call"], _HOOKS_NEED))


@contextlib.contextmanager
def global_module_forward_hooks(before: Callable, after: Callable) -> Iterator[None]:
    """Call ``before(module, args)`` and ``after(module, args, output)`` around every module's forward while active.

    ``after`` runs also when the forward raises (``always_call``). Cost: the
    hooks fire for every module in the process, one Python call each.
    """
    register_pre, register = checked_module_hook_registrars()
    handles = [register_pre(before), register(after, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- AdamW's host step counters (membench.step) -------------------------------------------------

_STEP_NEED = "to leave AdamW's per-parameter step counters, which CUDA keeps on the host, out of device memory"


def adamw_host_step_counters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """AdamW's per-parameter ``step`` tensors (``optimizer.state[p]["step"]``) that CUDA keeps on the host.

    Unless fused or capturable, torch keeps each counter as a 0-dim CPU tensor
    even for CUDA parameters, so the GPU never sees them; the tracked CPU
    backends would count 512 B each. Other optimizers (PEFT's LoRA-FA keeps an
    int) have none. Reads optimizer state; changes nothing.
    """
    strict = isinstance(optimizer, torch.optim.Adam)  # AdamW subclasses Adam
    counters = []
    for group in optimizer.param_groups:
        if strict and not {"fused", "capturable"} <= group.keys():
            raise incompatible("torch", f"has AdamW param_groups without 'fused'/'capturable' (keys: {sorted(group)})",
                               _STEP_NEED)
        if group.get("fused") or group.get("capturable"):
            continue
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.dim() == 0:
                counters.append(step)
            elif strict and state:
                raise incompatible("torch", f"keeps AdamW's optimizer.state[p]['step'] as {type(step).__name__}, not a "
                                   "0-dim tensor", _STEP_NEED)
    return counters


def check_adamw_step_counters() -> None:
    require("torch", torch.optim, "torch.optim.AdamW", ["params", "lr"], _STEP_NEED, exact=False)
    names = parameter_names(torch.optim.AdamW) or []
    if not {"foreach", "fused", "capturable"} <= set(names):
        raise incompatible("torch", f"has torch.optim.AdamW({', '.join(names)}) without foreach/fused/capturable",
                           _STEP_NEED)
    weight = nn.Parameter(torch.zeros(2))
    weight.grad = torch.zeros(2)
    optimizer = torch.optim.AdamW([weight], foreach=False)
    optimizer.step()
    if [counter.device.type for counter in adamw_host_step_counters(optimizer)] != ["cpu"]:
        raise incompatible("torch", "keeps no per-parameter step counter on the host", _STEP_NEED)


# --- the caching allocator's history (membench.backends.cuda) -----------------------------------

_HISTORY_NEED = "to record the CUDA caching allocator's history for backend.memory_snapshot"


def checked_cuda_history_functions() -> tuple[Callable, Callable]:
    memory = torch.cuda.memory
    return (require("torch", memory, "torch.cuda.memory._record_memory_history",
                    ["enabled", "context", "stacks", "max_entries"], _HISTORY_NEED, exact=False),
            require("torch", memory, "torch.cuda.memory._dump_snapshot", ["filename"], _HISTORY_NEED, exact=False))


@contextlib.contextmanager
def record_cuda_memory_history(max_entries: int) -> Iterator[Callable[[str], None]]:
    """Record every allocation and free (with its stack) while active; yields ``dump(filename)``.

    Uses torch's private ``_record_memory_history``/``_dump_snapshot``, the
    ones https://pytorch.org/memory_viz reads. Earlier history in this process
    is cleared where torch can. Cost: a few KB of host memory per event, at most
    ``max_entries`` events. Recording stops on exit, also after an error.
    """
    record, dump = checked_cuda_history_functions()
    options: dict[str, Any] = {"max_entries": max_entries}
    if "clear_history" in (parameter_names(record) or []):
        options["clear_history"] = True  # this run's events only, not an earlier run's in this process
    record(**options)
    try:
        yield dump
    finally:
        record(enabled=None)


# --- autograd nodes: which module's forward made the node backward is running (membench.module_scope) --------

_NODE_NEED = "to name the module whose forward made the autograd node that a backward allocation belongs to"


def checked_autograd_node_functions() -> tuple[Callable[[], int], Callable[[], Any]]:
    """``torch._C._autograd._get_sequence_nr`` and ``torch._C._current_autograd_node``, checked.

    The first gives the sequence number the next autograd node of this thread will get (nodes are
    numbered in creation order); the second, inside backward, the node the engine is running (None
    outside backward). Both are private; :class:`torch.autograd.graph.Node` itself is public
    (``metadata``, ``next_functions``), and so is its ``_sequence_nr()`` method in its documentation.
    """
    next_number = getattr(getattr(torch._C, "_autograd", None), "_get_sequence_nr", None)
    current = getattr(torch._C, "_current_autograd_node", None)
    if not callable(next_number) or not callable(current):
        missing = "torch._C._autograd._get_sequence_nr" if not callable(next_number) else "torch._C._current_autograd_node"
        raise incompatible("torch", f"has no {missing}", _NODE_NEED)
    if not hasattr(torch.autograd.graph.Node, "_sequence_nr") or not hasattr(torch.autograd.graph.Node, "metadata"):
        raise incompatible("torch", "has no Node._sequence_nr() or Node.metadata", _NODE_NEED)
    return next_number, current
