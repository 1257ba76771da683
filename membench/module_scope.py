"""Which module an allocation belongs to, in forward and in backward.

The allocation log (:mod:`membench.events`) can carry, for each allocation, the path of the
module it was made for (``base_model.model.model.layers.3.self_attn.q_proj``): the snapshot's frames
show it (:func:`membench.reserved.annotated_snapshot`), as PyTorch's own snapshots show the Python
stack. What "the module" means:

* **forward** (and a checkpointed block's recompute inside backward): the innermost module whose
  ``forward`` is running, from global forward hooks;
* **backward**: the module whose forward made the autograd node the engine is running. When a
  module's forward returns, every node created since it started (autograd numbers nodes in creation
  order) that its outputs reach and no inner module claimed is tagged with its path in
  ``Node.metadata``; backward reads the tag of the running node. The walk passes through nodes an
  inner module tagged (the caller's own nodes may lie behind them), so it costs the nesting depth
  times the nodes;
* **elsewhere** (the optimizer, gradient accumulation into ``.grad``, code between modules):
  ``None``, or the running node's name (``torch::autograd::AccumulateGrad``).

Costs one Python call per module call, the walks, and one call per allocation; only runs that
write a snapshot pay it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from membench.allocator import returned_tensors
from membench.compat import checked_autograd_node_functions, global_module_forward_hooks

TAG = "membench.module"  # key in Node.metadata


class ModuleScope:
    """Module paths for the allocations made while :meth:`active`; :meth:`current` is the one now.

    Paths are ``named_modules()`` names of the outermost module called (the PEFT model, so no model is
    given up front; the outermost module itself is named by its class). A module that is not one of
    its submodules is named by its class under its caller's path.
    """

    def __init__(self) -> None:
        self._next_number, self._running_node = checked_autograd_node_functions()
        self._stack: list[tuple[nn.Module, str, int]] = []  # (module, path, first node number)
        self._names: dict[int, str] = {}  # id(module) -> its path in the outermost module called
        # held so that none of its modules dies while its ids are keys above: a module made later
        # could otherwise reuse a dead one's id and take its path
        self._root: Optional[nn.Module] = None

    def _path(self, module: nn.Module) -> str:
        if not self._stack and id(module) not in self._names:
            # the outermost module called: paths are its named_modules(). A checkpointed block's
            # recompute (inside backward, the stack empty) keeps the names of the model around it.
            self._root, self._names = module, {id(child): name for name, child in module.named_modules()}
        name = self._names.get(id(module))
        if name is not None:
            return name or type(module).__name__
        return f"{self._stack[-1][1]}.{type(module).__name__}"  # not a submodule of the outermost one

    def _enter(self, module: nn.Module, args) -> None:
        self._stack.append((module, self._path(module), self._next_number()))

    def _leave(self, module: nn.Module, args, output) -> None:
        if not self._stack or self._stack[-1][0] is not module:
            return  # a forward that raised inside an inner module; the stack unwinds to here
        _, path, first = self._stack.pop()
        if not torch.is_grad_enabled():
            return
        last = self._next_number()
        pending = [t.grad_fn for t in returned_tensors(output) if t.grad_fn is not None]
        seen: set[int] = set()
        while pending:
            node = pending.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if not first <= node._sequence_nr() < last:
                continue  # made before this forward (an input's graph) or not numbered (AccumulateGrad)
            metadata = node.metadata
            if TAG not in metadata:  # else an inner module's node; nodes behind it may still be ours
                metadata[TAG] = path
            pending.extend(next_node for next_node, _ in node.next_functions)

    def current(self) -> Optional[str]:
        """The module path of an allocation made now (see the module docstring); None where there is none."""
        if self._stack:
            return self._stack[-1][1]
        node = self._running_node()
        if node is None:
            return None
        return node.metadata.get(TAG) or node.name()

    @contextlib.contextmanager
    def active(self) -> Iterator["ModuleScope"]:
        try:
            with global_module_forward_hooks(self._enter, self._leave):
                yield self
        finally:
            self._stack.clear()
            self._root, self._names = None, {}
