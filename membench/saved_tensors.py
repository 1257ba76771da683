"""Count the bytes autograd keeps for backward (what LoRA-FA is about), and say where they come from.

Every counted storage is attributed twice:

* to the **module** whose ``forward`` was running when autograd packed it: the
  innermost one, by its path in the model with layer indices collapsed to
  ``*`` (:func:`module_pattern`), so LLaMA's 32 layers add up under one key
  such as ``base_model.model.model.layers.*.self_attn.q_proj.lora_A``;
* to the **ATen op** that made the storage (``aten.mm``, ``aten._to_copy``,
  ``aten.native_dropout``, ...), as the backend reports it
  (:meth:`membench.backends.base.Backend.op_origins`). Storages that no op made
  during the forward (the batch, buffers) are :data:`BEFORE_FORWARD`.

Both breakdowns (and the module x op table) sum to
:attr:`SavedTensorCounter.total_bytes` exactly: they split the same set of storages.
"""

from __future__ import annotations

import contextlib
import re
import weakref
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from membench.allocator import returned_tensors, storage_key
from membench.compat import OpOverload, TorchDispatchMode, global_module_forward_hooks, op_returns_alias, storage_id

#: Op label of storages no op made during the counted forward (batch tensors, buffers).
BEFORE_FORWARD = "(before forward)"
#: Module label of tensors packed while no module's forward was running.
NO_MODULE = "(no module)"
#: Module label of the model itself (its path is the empty string).
ROOT = "(root)"

#: Looks up the op that made a live storage; None when unknown.
OriginLookup = Callable[[torch.UntypedStorage], Optional[OpOverload]]

_LAYER_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a whole path component made of digits


def module_pattern(name: str) -> str:
    """A module path with layer indices collapsed: ``encoder.layer.11.output`` -> ``encoder.layer.*.output``."""
    return _LAYER_INDEX.sub("*", name) if name else ROOT


def op_name(func: Optional[OpOverload]) -> str:
    """``aten.mm`` for ``aten.mm.default``; :data:`BEFORE_FORWARD` for None."""
    if func is None:
        return BEFORE_FORWARD
    return func if isinstance(func, str) else str(func.overloadpacket)  # a label such as events.RESIZE


def _no_origin(storage: torch.UntypedStorage) -> None:
    return None


class OpOrigins(TorchDispatchMode):
    """Remembers which op made each storage, for backends without an allocator model (``cuda``).

    Outputs that alias an input (views, in-place and ``out=`` ops) made no
    storage and are skipped, so a view of the batch stays :data:`BEFORE_FORWARD`.
    Entries hold a weak reference to their storage: a dead storage's address,
    reused by a new one, is not mistaken for it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[int, tuple[weakref.ref, OpOverload]] = {}
        self._aliases: dict[OpOverload, bool] = {}

    def origin(self, storage: torch.UntypedStorage) -> Optional[OpOverload]:
        entry = self._made.get(storage_id(storage))
        return entry[1] if entry is not None and entry[0]() is storage else None

    def _note(self, tensor: torch.Tensor, func: OpOverload) -> None:
        storage = tensor.untyped_storage()
        key = storage_id(storage)
        entry = self._made.get(key)
        if entry is None or entry[0]() is not storage:
            self._made[key] = (weakref.ref(storage), func)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = self._aliases.get(func)
        if aliases is None:
            aliases = self._aliases[func] = op_returns_alias(func)
        if aliases:
            return out
        for tensor in returned_tensors(out):
            self._note(tensor, func)
        return out


def largest_first(bytes_by_name: dict[str, int]) -> dict[str, int]:
    """``{name: bytes}`` ordered by bytes, largest first, then by name (the order results list them in)."""
    return dict(sorted(bytes_by_name.items(), key=lambda item: (-item[1], item[0])))


class SavedTensorCounter:
    """Sums the unique storages packed by autograd while active, in bytes, and attributes them
    (:meth:`forget_freed` then leaves out those that have died since).

    Parameters are excluded: they exist whether or not backward needs them.
    Bytes are the storages' exact sizes (no allocator rounding), so they can be
    counted by hand. Tensors saved inside a checkpointed region are not seen,
    because non-reentrant checkpointing installs its own inner hooks and drops
    them; that is exactly the saving recompute buys.

    Args:
        parameters: Tensors whose storages never count.
        model: The model whose module paths name the modules; None labels
            modules by class name.
        also_parameter: Tells storages that hold parameters too, though not in ``parameters``
            (FSDP2's gathered copies, :meth:`membench.backends.base.Backend.is_gathered`).
    """

    def __init__(self, parameters: list[torch.Tensor], model: Optional[nn.Module] = None,
                 also_parameter: Optional[Callable[[torch.UntypedStorage], bool]] = None) -> None:
        self._excluded = {storage_key(p) for p in parameters}
        self._also_parameter = also_parameter
        self._names: dict[int, str] = {}
        if model is not None:
            self._names = {id(module): name for name, module in model.named_modules()}
        # storage key -> (exact bytes, module path, op that made it)
        self._seen: dict[int, tuple[int, str, Optional[OpOverload]]] = {}
        self._alive: dict[int, weakref.ref] = {}  # storage key -> the storage, while it lives
        self._stack: list[str] = [NO_MODULE]
        self._origin: OriginLookup = _no_origin

    @property
    def total_bytes(self) -> int:
        return sum(entry[0] for entry in self._seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage_id(storage)
        if key not in self._excluded and (key not in self._seen or self._alive[key]() is not storage) and not (
                self._also_parameter is not None and self._also_parameter(storage)):
            self._count(key, storage)
        return tensor

    def _count(self, key: int, storage: torch.UntypedStorage) -> None:
        """Count ``storage`` (stored under ``key``) as saved by the innermost running module."""
        self._seen[key] = (storage.nbytes(), self._stack[-1], self._origin(storage))
        self._alive[key] = weakref.ref(storage)

    def _forget(self, key: int) -> None:
        del self._seen[key], self._alive[key]

    def forget_freed(self) -> None:
        """Forget counted storages that have died; call it when forward ends, before reading the totals.

        A graph built and dropped inside the forward (DoRA's weight norm of ``lora_B(lora_A(I))``,
        detached) packed them, but backward keeps none. (A later storage at the same address is never
        mistaken for a dead one: see ``_pack``.)
        """
        for key in [key for key, ref in self._alive.items() if ref() is None]:
            self._forget(key)

    def _aggregate(self, label: Callable[[tuple], str]) -> tuple[dict[str, int], dict[str, int]]:
        nbytes: dict[str, int] = {}
        count: dict[str, int] = {}
        for entry in self._seen.values():
            key = label(entry)
            nbytes[key] = nbytes.get(key, 0) + entry[0]
            count[key] = count.get(key, 0) + 1
        order = sorted(nbytes, key=lambda key: (-nbytes[key], key))
        return {key: nbytes[key] for key in order}, {key: count[key] for key in order}

    def _module_label(self) -> Callable[[tuple], str]:
        patterns: dict[str, str] = {}

        def label(entry: tuple) -> str:
            name = entry[1]
            if name not in patterns:
                patterns[name] = name if name == NO_MODULE else module_pattern(name)
            return patterns[name]

        return label

    def by_module(self) -> tuple[dict[str, int], dict[str, int]]:
        """({module pattern: bytes}, {module pattern: storages}), largest first."""
        return self._aggregate(self._module_label())

    def by_op(self) -> tuple[dict[str, int], dict[str, int]]:
        """({op: bytes}, {op: storages}), largest first."""
        return self._aggregate(lambda entry: op_name(entry[2]))

    def by_module_and_op(self) -> dict[str, dict[str, int]]:
        """{module pattern: {op: bytes}}: which ops made each module's saved bytes."""
        module = self._module_label()
        table: dict[str, dict[str, int]] = {}
        for entry in self._seen.values():
            ops = table.setdefault(module(entry), {})
            op = op_name(entry[2])
            ops[op] = ops.get(op, 0) + entry[0]
        totals = {key: sum(ops.values()) for key, ops in table.items()}
        return {key: dict(sorted(table[key].items(), key=lambda item: (-item[1], item[0])))
                for key in sorted(table, key=lambda key: (-totals[key], key))}

    def kept_by_function_objects(self, root) -> dict[str, int]:
        """{function: bytes} that custom autograd functions keep as plain ``ctx`` attributes.

        ``ctx.tensors = (A, ...)`` (bitsandbytes' 8-bit matmul keeps its input that way) is not
        ``save_for_backward``, so the saved-tensor hooks never see it, yet it stays allocated until
        backward: the allocator model counts it in activations and the peak, and this names it.
        Walks the graph from ``root`` (the loss's ``grad_fn``); storages of parameters, of model
        tensors and of tensors the hooks counted are left out, each storage is counted once.
        """
        kept: dict[str, int] = {}
        seen = set(self._seen) | self._excluded
        stack, visited = [root], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in visited:
                continue
            visited.add(id(node))
            stack.extend(next_node for next_node, _ in node.next_functions)
            if not isinstance(node, torch.autograd.function.BackwardCFunction):
                continue
            for value in vars(node).values():
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    if not isinstance(tensor, torch.Tensor):
                        continue
                    key = storage_id(tensor.untyped_storage())
                    if key not in seen:
                        seen.add(key)
                        name = type(node).__name__
                        kept[name] = kept.get(name, 0) + tensor.untyped_storage().nbytes()
        return largest_first(kept)

    @contextlib.contextmanager
    def counting(self, origin: Optional[OriginLookup] = None) -> Iterator["SavedTensorCounter"]:
        """Count one forward pass from zero (storage keys are only unique among live storages).

        Args:
            origin: Tells which op made a live storage (see ``Backend.op_origins``); None: unknown.
        """
        self._seen, self._alive = {}, {}
        self._origin = origin or _no_origin
        stack = self._stack = [NO_MODULE]
        names = self._names

        def enter(module: nn.Module, args) -> None:
            name = names.get(id(module))
            stack.append(type(module).__name__ if name is None else name)

        def leave(module: nn.Module, args, output) -> None:
            if len(stack) > 1:
                stack.pop()

        try:
            with global_module_forward_hooks(enter, leave), \
                    torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield self
        finally:
            self._origin = _no_origin
