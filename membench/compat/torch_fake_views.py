"""Views of symbolic fake tensors, made with less size arithmetic: the same tensors, in less time.

While a trace records (:mod:`membench.trace`), every size is a sympy expression, and C++ calls back
into Python for each operation on one. :func:`membench.compat.memoized_symbolic_arithmetic` makes
each call cheaper; this module makes fewer of them where views are made, which was a quarter of
what was left (T5-large LoRA, sampled):

* **A view op answered from FakeTensorMode's dispatch cache.** torch makes the output with
  ``empty_strided`` at the view's sizes (computing, symbolically, a storage size it then drops) and
  then ``set_``\\s it onto the input's storage (computing, symbolically, whether it is contiguous
  and whether the storage must grow). :func:`cheap_fake_views` makes it with ``as_strided`` on the
  input, which sets the same sizes, strides and offset on the same storage (:func:`_view_of`).
* **``aten._unsafe_view``, which torch never caches** (it aliases its input but is not a view in
  its schema). Its Python reshape algorithm (``torch._refs._reshape_view_helper``) runs on every
  call, evaluating size guards as it goes; every linear layer makes one (the matmul decomposition
  folds batch and sequence, then unfolds them). :func:`cheap_fake_views` remembers, per input
  metadata and requested shape, the sizes, strides and offset torch's algorithm gave, and makes
  the next such view from them the cached way.

Why it is exact: a view is its input's storage with the output's sizes, strides and offset, dtype,
``requires_grad`` and conjugate/negative bits, which both ways set to the same values. A remembered
reshape is keyed by everything torch's algorithm reads (the input's sizes, strides, offset, dtype,
device and bits, the shape asked for, and whether guards are suppressed), so a repeat would evaluate
the same guards, which the first call already added. Neither way adds a guard: torch makes cached
outputs with guards suppressed. :func:`check_fake_views` compares both ways on views of every kind
(``python -m membench.compat``; a test runs it), and recording a trace stays identical field by
field (a test).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from membench.compat._checks import CompatError, incompatible, require

_NEED = "to make views of symbolic fake tensors with less size arithmetic (membench.compat.torch_fake_views)"


def _targets() -> tuple[Any, Any, Callable, dict]:
    """(fake_tensor, fake_impls, torch's cached-output builder, {view op: torch's implementation})."""
    from torch._subclasses import fake_impls, fake_tensor

    aten = torch.ops.aten
    build = require("torch", fake_tensor.FakeTensorMode, "FakeTensorMode._get_output_tensor_from_cache_entry",
                    ["self", "state", "entry", "key", "func", "args"], _NEED)
    for name in ("FakeTensor", "in_kernel_invocation_manager", "_SymIntOutputStub"):
        if not hasattr(fake_tensor, name):
            raise incompatible("torch", f"has no torch._subclasses.fake_tensor.{name}", _NEED)
    table = getattr(fake_impls, "op_implementations_dict", None)
    views = {}
    for op in (aten._unsafe_view.default, aten.view.default):
        implementation = table.get(op) if isinstance(table, dict) else None
        if implementation is None:
            raise incompatible("torch", f"has no fake implementation of {op} in fake_impls.op_implementations_dict",
                               _NEED)
        require("torch", fake_impls, f"fake_impls.{implementation.__name__}",
                ["fake_mode", "func", "a", "shape", "allow_copy"], _NEED)
        views[op] = implementation
    return fake_tensor, fake_impls, build, views


def _view_of(fake_tensor, mode, base, shape, stride, offset, dtype, requires_grad: bool, conj: bool, neg: bool,
             device):
    """A fake view of ``base``'s storage with these sizes, strides, offset, dtype and bits.

    Made with ``as_strided`` on the meta tensor: it shares the storage and sets sizes and strides
    without the ``set_`` torch's cache path calls, which also computes (symbolically) whether the
    view is contiguous and how large a storage it needs (116 against 22 microseconds for a 4-d
    view of symbolic sizes). Called within a fake op's dispatch, where autograd has already run,
    so the view has no autograd history; where it would, or where the dtype differs from the
    base's (``view_as_real``), it is made as torch's cache path makes it, less ``empty_strided``.
    """
    suppress = mode.shape_env.suppress_guards if mode.shape_env is not None else contextlib.nullcontext
    with fake_tensor.in_kernel_invocation_manager(mode), suppress():
        view = None
        if dtype is base.dtype:
            view = torch.as_strided(base, shape, stride, offset)
            if view.grad_fn is not None or view._is_view():
                view = None  # autograd recorded it: not within a fake op's dispatch
        if view is None:
            view = torch.empty((0,), dtype=dtype, device="meta")
            view.set_(base.untyped_storage(), offset, shape, stride)
        torch._C._set_conj(view, conj)
        torch._C._set_neg(view, neg)
        if requires_grad:
            view.requires_grad_(True)
    return fake_tensor.FakeTensor(mode, view, device)


def _cached_views(fake_tensor, build: Callable, counts: dict) -> Callable:
    """torch's cached-output builder, with view outputs made by :func:`_view_of` (counted in ``counts``)."""
    stub, fake, op_overload = fake_tensor._SymIntOutputStub, fake_tensor.FakeTensor, torch._ops.OpOverload
    strided = torch.strided

    def output(self, state, entry, key, func, args):
        metadata = entry.metadata
        if (entry.inplace_idx is not None or metadata is None or type(func) is not op_overload or not func.is_view
                or metadata.layout is not strided or type(args[entry.view_idx]) is not fake):
            return build(self, state, entry, key, func, args)  # everything but a plain view: torch's own code
        values = (*metadata.shape, *metadata.stride, metadata.storage_offset, metadata.storage_bytes)
        if not all(isinstance(value, (int, stub)) or value is None for value in values):
            return build(self, state, entry, key, func, args)  # torch raises for anything else
        extracted = [value.extract(key, state.shape_env) if isinstance(value, stub) else value for value in values]
        rank = len(metadata.shape)
        counts["cached"] += 1
        return _view_of(fake_tensor, self, args[entry.view_idx], tuple(extracted[:rank]),
                        tuple(extracted[rank:2 * rank]), extracted[2 * rank], metadata.dtype, metadata.requires_grad,
                        metadata.is_conj, metadata.is_neg, metadata.device)

    return output


def _expressions(values) -> tuple:
    """``values`` (ints, SymInts, nested lists) with every SymInt as its current sympy expression."""
    return tuple(_expressions(value) if isinstance(value, (list, tuple)) else
                 value.node.expr if isinstance(value, torch.SymInt) else value for value in values)


def _remembered_reshapes(fake_tensor, implementation: Callable, storage_id: Callable, counts: dict) -> Callable:
    """torch's fake ``view`` / ``_unsafe_view``, remembering each result's sizes, strides and offset.

    A repeat made from what was remembered is counted in ``counts``."""
    from torch.fx.experimental import _config
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake, strided = fake_tensor.FakeTensor, torch.strided
    made: dict[tuple, tuple] = {}

    def view(fake_mode, func, a, *shape, allow_copy: bool = False):
        if allow_copy or type(a) is not fake or a.layout is not strided or fake_mode.shape_env is None:
            return implementation(fake_mode, func, a, *shape, allow_copy=allow_copy)
        key = (func, a.dtype, a.fake_device, _expressions(a.shape), _expressions(a.stride()),
               _expressions((a.storage_offset(),)), _expressions(shape), a.requires_grad, a.is_conj(), a.is_neg(),
               ShapeEnv._suppress_guards_tls(), _config.backed_size_oblivious)
        known = made.get(key)
        if known is not None:
            counts["remembered"] += 1
            return _view_of(fake_tensor, fake_mode, a, *known)
        out = implementation(fake_mode, func, a, *shape, allow_copy=allow_copy)
        if type(out) is fake and out.layout is strided and storage_id(out.untyped_storage()) == storage_id(
                a.untyped_storage()):
            made[key] = (tuple(out.shape), tuple(out.stride()), out.storage_offset(), out.dtype, out.requires_grad,
                         out.is_conj(), out.is_neg(), out.fake_device)
        return out

    return view


@contextlib.contextmanager
def cheap_fake_views() -> Iterator[dict[str, int]]:
    """Within the block, fake view outputs are made as the module docstring says, for every fake mode.

    Yields how many views were made each way so far: ``{"cached": ..., "remembered": ...}``.

    The patches are on torch's class and op table, so they hold for every fake mode while the block
    runs (a recording runs on one thread); they are undone on exit, also after an error.
    """
    from membench.compat.torch_memory import storage_id

    fake_tensor, fake_impls, build, views = _targets()
    mode, table = fake_tensor.FakeTensorMode, fake_impls.op_implementations_dict
    counts = {"cached": 0, "remembered": 0}
    mode._get_output_tensor_from_cache_entry = _cached_views(fake_tensor, build, counts)
    for op, implementation in views.items():
        table[op] = _remembered_reshapes(fake_tensor, implementation, storage_id, counts)
    try:
        yield counts
    finally:
        mode._get_output_tensor_from_cache_entry = build
        table.update(views)


def _described(tensor: torch.Tensor, base: torch.Tensor) -> tuple:
    from membench.compat.torch_memory import storage_id

    return (str(tuple(tensor.shape)), str(tensor.stride()), str(tensor.storage_offset()), tensor.dtype,
            tensor.requires_grad, tensor.is_conj(), tensor.is_neg(), str(tensor.device), tensor._version,
            tensor._is_view(), type(tensor.grad_fn).__name__,
            storage_id(tensor.untyped_storage()) == storage_id(base.untyped_storage()))


def _views_both_ways() -> list[list]:
    """Each view op of a sample, run twice (a miss, then a hit) on a symbolic fake tensor: what it made, and the guards."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    context = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC])
    x = mode.from_tensor(torch.empty(6, 4, requires_grad=True), source=ConstantSource("x"), symbolic_context=context)
    z = mode.from_tensor(torch.empty(6, 4, dtype=torch.complex64), source=ConstantSource("z"),
                         symbolic_context=context)
    rows, n = x.shape
    aten = torch.ops.aten
    made = []
    with mode:
        folded = x * 2  # (B*S, N)-like: contiguous, not a leaf
        transposed = folded.t().contiguous()
        for base, make in ((x, lambda: x.t()), (x, lambda: x[1:]), (x, lambda: x.unsqueeze(0)),
                           (folded, lambda: folded.view(-1)), (folded, lambda: folded.view(rows, n, 1)),
                           (x, lambda: x.expand(3, rows, n)), (z, lambda: torch.view_as_real(z)), (z, lambda: z.conj()),
                           (folded, lambda: aten._unsafe_view.default(folded, [rows, n])),
                           (transposed, lambda: aten._unsafe_view.default(transposed, [n, rows, 1])),
                           (folded, lambda: aten._unsafe_view.default(folded, [rows * n])),
                           (x, lambda: x.transpose(0, 1)[1:, ::2]), (folded, lambda: folded.view(2, -1)),
                           (folded, lambda: aten._unsafe_view.default(folded, [2, -1]))):
            for _ in range(2):  # a miss, then a hit
                made.append(_described(make(), base))
    return made + [[str(guard.expr) for guard in mode.shape_env.guards]]


def check_fake_views() -> None:
    """Views made by :func:`cheap_fake_views` equal torch's, with the same guards (raises CompatError if not)."""
    _targets()
    plain = _views_both_ways()
    with cheap_fake_views() as counts:
        cheap = _views_both_ways()
    if not (counts["cached"] and counts["remembered"]):
        raise CompatError(f"torch {torch.__version__}: membench's sample made no view cheaply ({counts}): torch no "
                          f"longer answers views from its dispatch cache, or calls aten._unsafe_view another way ({_NEED})")
    if plain != cheap:
        first = next(index for index, (a, b) in enumerate(zip(plain, cheap)) if a != b)
        raise CompatError(f"torch {torch.__version__}: view {first} of membench's sample is {plain[first]!r} made by "
                          f"torch, {cheap[first]!r} made cheaply ({_NEED})")
