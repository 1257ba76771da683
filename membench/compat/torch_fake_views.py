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
reshape is keyed by everything torch's algorithm reads (the shape environment, the input's sizes,
strides, offset, dtype, device and bits, the shape asked for, whether guards are suppressed, and
``backed_size_oblivious``), so a repeat would evaluate the same guards, which the first call already
added. Neither way adds a guard: torch makes cached outputs with guards suppressed.
:func:`check_fake_views` compares both ways on views of every kind (``python -m membench.compat``;
a test runs it).

What differs: a remembered reshape holds the first call's ``SymInt`` objects where torch would
hold the caller's or new ones, of the same expressions. Sizes derived from them later are the
same polynomials, sometimes written in another form (``2048*B*T`` against
``2048*T*(B - 1) + 2048*T``), since torch's dispatch cache keys sizes by object identity. A
recording with and without this module gives the same trace, every size the same polynomial
(a test); without the remembered reshapes, identical field by field.
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
    from torch.fx.experimental import _config
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    if not callable(getattr(ShapeEnv, "_suppress_guards_tls", None)) or not hasattr(_config, "backed_size_oblivious"):
        raise incompatible("torch", "has no ShapeEnv._suppress_guards_tls or fx.experimental._config."
                           "backed_size_oblivious (what a reshape's guards depend on)", _NEED)
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
    so the view has no autograd history. Where it would have one, where the dtype differs from the
    base's (``view_as_real``), or where the base's storage was freed (``resize_(0)``, which ``set_``
    grows back and ``as_strided`` would not), it is made with ``set_`` as torch's cache path makes
    it, less ``empty_strided``.
    """
    suppress = mode.shape_env.suppress_guards if mode.shape_env is not None else contextlib.nullcontext
    with fake_tensor.in_kernel_invocation_manager(mode), suppress():
        view = None
        storage = base.untyped_storage()
        nbytes = storage.nbytes()
        if dtype is base.dtype and not (type(nbytes) is int and nbytes == 0):
            view = torch.as_strided(base, shape, stride, offset)
            if view.grad_fn is not None or view._is_view():
                view = None  # autograd recorded it: not within a fake op's dispatch
        if view is None:
            view = torch.empty((0,), dtype=dtype, device="meta")
            view.set_(storage, offset, shape, stride)
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
            return build(self, state, entry, key, func, args)  # anything unexpected: torch's own code decides
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
        shape_env = fake_mode.shape_env  # symbols of one name in two environments are different sizes
        key = (id(shape_env), func, a.dtype, a.fake_device, _expressions(a.shape), _expressions(a.stride()),
               _expressions((a.storage_offset(),)), _expressions(shape), a.requires_grad, a.is_conj(), a.is_neg(),
               ShapeEnv._suppress_guards_tls(), _config.backed_size_oblivious)
        known = made.get(key)
        if known is not None:
            counts["remembered"] += 1
            return _view_of(fake_tensor, fake_mode, a, *known[:-1])
        out = implementation(fake_mode, func, a, *shape, allow_copy=allow_copy)
        if type(out) is fake and out.layout is strided and storage_id(out.untyped_storage()) == storage_id(
                a.untyped_storage()):
            made[key] = (tuple(out.shape), tuple(out.stride()), out.storage_offset(), out.dtype, out.requires_grad,
                         out.is_conj(), out.is_neg(), out.fake_device, shape_env)  # kept alive: its id stays its own
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
    try:
        mode._get_output_tensor_from_cache_entry = _cached_views(fake_tensor, build, counts)
        for op, implementation in views.items():
            table[op] = _remembered_reshapes(fake_tensor, implementation, storage_id, counts)
        yield counts
    finally:
        mode._get_output_tensor_from_cache_entry = build
        table.update(views)


def _described(tensor: torch.Tensor, base: torch.Tensor) -> tuple:
    from membench.compat.torch_memory import storage_id

    hints = tuple(size.node.hint if isinstance(size, torch.SymInt) else size for size in tensor.shape)
    return (str(tuple(tensor.shape)), hints, str(tensor.stride()), str(tensor.storage_offset()),
            str(base.untyped_storage().nbytes()), tensor.dtype,
            tensor.requires_grad, tensor.is_conj(), tensor.is_neg(), str(tensor.device), tensor._version,
            tensor._is_view(), type(tensor.grad_fn).__name__,
            storage_id(tensor.untyped_storage()) == storage_id(base.untyped_storage()))


def _views_both_ways() -> list[list]:
    """Each view op of a sample, run twice (a miss, then a hit) on symbolic fake tensors: what it made, and the guards."""
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
        bumped = x * 3
        bumped.add_(1)  # its views share its version counter
        freed = x * 4
        freed.untyped_storage().resize_(0)  # set_ grows a freed storage back for a view of it
        for base, make in ((bumped, lambda: bumped.view(-1)), (freed, lambda: freed.view(-1))):
            for _ in range(2):
                made.append(_described(make(), base))
    # Another shape environment, whose symbols have the same names and other values (6 x 4 there, 5 x 3 here).
    other = FakeTensorMode(shape_env=ShapeEnv())
    y = other.from_tensor(torch.empty(5, 3, requires_grad=True), source=ConstantSource("x"),
                          symbolic_context=context)
    with other:
        for _ in range(2):
            folded_y = y * 2
            made.append(_described(aten._unsafe_view.default(folded_y, [y.shape[0] * y.shape[1]]), folded_y))
    return made + [[str(guard.expr) for guard in mode.shape_env.guards + other.shape_env.guards]]


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
