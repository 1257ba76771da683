"""ModuleScope names the module of every op, in forward (the running module) and backward (the node's module)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from membench.compat import TorchDispatchMode
from membench.module_scope import ModuleScope


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.act = nn.GELU()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU())])  # called past the ModuleList

    def forward(self, x):
        return self.blocks[0](self.act(self.a(x)) * 2)  # the multiplication is Net's own node


class Where(TorchDispatchMode):
    """Records (op, module) for every op."""

    def __init__(self, scope: ModuleScope) -> None:
        super().__init__()
        self.scope, self.seen = scope, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((func.overloadpacket.__name__, self.scope.current()))
        return func(*args, **(kwargs or {}))


def ops(seen, module):
    return [op for op, where in seen if where == module]


def test_forward_and_backward_ops_are_named_by_module():
    net, scope = Net(), ModuleScope()
    x = torch.randn(3, 4, requires_grad=True)
    with scope.active(), Where(scope) as where:
        loss = net(x).sum()
        forward = list(where.seen)
        where.seen.clear()
        loss.backward()
    assert ops(forward, "a") == ["t", "addmm"]
    assert ops(forward, "act") == ["gelu"]
    assert ops(forward, "Net") == ["mul"]  # the outermost module is named by its class
    assert ops(forward, "blocks.0.0") == ["t", "addmm"] and ops(forward, "blocks.0.1") == ["relu", "detach"]
    assert ops(forward, None) == ["sum"]  # outside every module
    backward = where.seen
    assert "threshold_backward" in ops(backward, "blocks.0.1")
    assert "mm" in ops(backward, "blocks.0.0")
    assert "gelu_backward" in ops(backward, "act")
    assert "mul" in ops(backward, "Net")  # Net's node lies behind blocks.0's: the walk goes past tagged nodes
    assert "mm" in ops(backward, "a")
    assert any(where is not None and "AccumulateGrad" in where for _, where in backward)


def test_a_failing_forward_leaves_the_scope_usable():
    class Boom(nn.Module):
        def forward(self, x):
            raise KeyError("boom")

    scope = ModuleScope()
    with scope.active():
        with pytest.raises(KeyError):
            nn.Sequential(Boom())(torch.zeros(1))
        assert scope.current() is None
        with Where(scope) as where:
            nn.Linear(2, 2)(torch.zeros(1, 2))
    assert ops(where.seen, "Linear") == ["t", "addmm"]
    assert scope.current() is None


def test_no_grad_forward_tags_nothing():
    net, scope = Net(), ModuleScope()
    with scope.active(), torch.no_grad(), Where(scope) as where:
        net(torch.randn(3, 4))
    assert ops(where.seen, "a") == ["t", "addmm"]


def test_recompute_inside_backward_keeps_the_full_paths():
    """A checkpointed block's forward runs again inside backward with nothing on the stack."""
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.act = nn.Linear(8, 8), nn.GELU()

        def forward(self, x):
            return self.act(self.lin(x))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for layer in self.layers:
                x = checkpoint(layer, x, use_reentrant=False)
            return x

    scope = ModuleScope()
    with scope.active(), Where(scope) as where:
        loss = Stack()(torch.randn(3, 8, requires_grad=True)).sum()
        where.seen.clear()
        loss.backward()
    # The recompute stops once it has what backward needs: each block's addmm (GELU's input)
    assert {module for op, module in where.seen if op == "addmm"} == {"layers.0.lin", "layers.1.lin"}
    assert {module for op, module in where.seen if op == "gelu_backward"} == {"layers.0.act", "layers.1.act"}
