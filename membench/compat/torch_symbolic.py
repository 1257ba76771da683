"""torch's symbolic sizes: the sympy classes they are written in, and a faster way to build them.

* :func:`sympy_integer_divisions`: :mod:`membench.trace.periodic` proves a shape guard periodic by
  rewriting torch's integer divisions with ``sympy.floor``; it has to know which classes they are.
  They live in torch's private ``torch.utils._sympy.functions``.
* :func:`memoized_symbolic_arithmetic`: recording a trace repeats the same size arithmetic on
  ``SymNode`` (private ``torch.fx.experimental.sym_node``) hundreds of thousands of times.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Iterator

from membench.compat._checks import incompatible

#: The integer divisions of two arguments (numerator, divisor) a symbolic size or guard may hold.
DIVISION_NAMES = ("FloorDiv", "Mod", "PythonMod", "CeilDiv", "CleanDiv")


def sympy_integer_divisions() -> dict[type, str]:
    """torch's division classes -> their name in :data:`DIVISION_NAMES`; CompatError if one is gone."""
    from torch.utils._sympy import functions

    found = {}
    for name in DIVISION_NAMES:
        cls = getattr(functions, name, None)
        if not isinstance(cls, type):
            raise incompatible("torch", f"has no torch.utils._sympy.functions.{name}",
                               "to prove a shape guard periodic (membench.trace.periodic)")
        found[cls] = name
    return found


#: SymNode's binary operations :func:`memoized_symbolic_arithmetic` memoizes. Each one's result is a
#: function of its operands' expressions, hints and types alone (torch's ``binary_magic_impl``); ``mod``
#: is left out because it also reads the shape environment's value ranges, which narrow as guards are added.
MEMOIZED_OPERATIONS = ("add", "sub", "mul", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "sym_max", "sym_min",
                       "int_floordiv")


def _operation_attribute(name: str) -> str:
    return f"_{name}_" if name in ("and", "or") else f"_{name}"  # torch's names, a trailing _ after a keyword


def symbolic_binary_operations() -> dict[str, Callable]:
    """SymNode's attribute -> torch's implementation, for :data:`MEMOIZED_OPERATIONS`; CompatError if one changed.

    Also checks what :func:`memoized_symbolic_arithmetic` reads without calling: ``SymNode.expr``
    is ``self._expr`` until the shape environment's ``_replacements_version_counter`` moves, and
    ``maybe_as_int`` and ``wrap_int`` exist.
    """
    from torch.fx.experimental.sym_node import SymNode

    found = {}
    for name in MEMOIZED_OPERATIONS:
        attribute = _operation_attribute(name)
        operation = getattr(SymNode, attribute, None)
        if operation is None or getattr(inspect.unwrap(operation), "__name__", None) != "binary_magic_impl":
            raise incompatible("torch", f"has no SymNode.{attribute} built by binary_magic_impl",
                               "to memoize symbolic size arithmetic while recording a trace (membench.trace.symbolic)")
        found[attribute] = operation
    try:
        expr_source = inspect.getsource(SymNode.expr.fget)
    except (AttributeError, TypeError, OSError):
        expr_source = ""
    if "_replacements_version_counter" not in expr_source or "return self._expr" not in expr_source:
        raise incompatible("torch", "has no SymNode.expr that returns self._expr until the shape environment's "
                           "_replacements_version_counter moves", "to memoize symbolic size arithmetic")
    for name in ("maybe_as_int", "wrap_int"):
        if not callable(getattr(SymNode, name, None)):
            raise incompatible("torch", f"has no SymNode.{name}", "to memoize symbolic size arithmetic")
    return found


@contextlib.contextmanager
def memoized_symbolic_arithmetic(shape_env) -> Iterator[None]:
    """Within the block, SymNode arithmetic on ``shape_env``'s symbols returns one node per distinct operation.

    Why: a symbolic step spends most of its time in size arithmetic that C++ calls back into Python
    for (every fake tensor's numel, strides, storage size and contiguity, as sympy expressions), and
    almost all of it repeats: recording RoBERTa-base's step makes about 168,000 such operations on
    780 distinct operand pairs. torch builds a new node each time. The same goes for the int
    constants C++ wraps into nodes (``wrap_int``) and for ``maybe_as_int``, asked of every size.

    What it keeps exact: the memo key is everything torch's ``binary_magic_impl`` reads from its
    operands (operation, current expressions, hints, Python types, the summation flag), so the node
    it returns is the node torch would build. Nothing in a node changes after it is made but its
    cached replacement of the expression, which depends on the shape environment, not on the node.
    A wrapped int is a node of that int alone; ``maybe_as_int`` is a function of the expression.
    While the shape environment has replaced no symbol (its version counter at 0, as through a
    recording that stays general), a node's current expression is its own ``_expr``, read without
    the checks ``SymNode.expr`` makes; after a replacement, ``expr`` is asked. Operands of another
    shape environment, a proxy-tracing mode (``make_fx``), translation validation (which gives
    each node an FX node of its own) and hints that are themselves symbolic go to torch unmemoized.
    """
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    from torch.fx.experimental.sym_node import SymNode
    from torch.fx.experimental.validator import translation_validation_enabled

    originals = symbolic_binary_operations()
    if translation_validation_enabled():
        yield
        return
    memo: dict[tuple, Any] = {}
    as_int: dict[Any, Any] = {}
    wrapped: dict[int, Any] = {}
    plain = (int, bool, float, type(None))
    missing = object()
    original_as_int, original_wrap_int = SymNode.maybe_as_int, SymNode.wrap_int

    def memoized(attribute: str, operation: Callable) -> Callable:
        @functools.wraps(operation)
        def apply(self, other):
            if (type(other) is not SymNode or self.shape_env is not shape_env or other.shape_env is not shape_env
                    or type(self._hint) not in plain or type(other._hint) not in plain or get_proxy_mode() is not None):
                return operation(self, other)
            unreplaced = shape_env._replacements_version_counter == 0
            key = (attribute, self._expr if unreplaced else self.expr, other._expr if unreplaced else other.expr,
                   self.pytype, other.pytype, self._hint, other._hint,
                   self._optimized_summation, other._optimized_summation)
            node = memo.get(key)
            if node is None:
                node = memo[key] = operation(self, other)
            return node
        return apply

    @functools.wraps(original_as_int)
    def maybe_as_int(self):
        if self.shape_env is not shape_env or shape_env._replacements_version_counter != 0:
            return original_as_int(self)
        value = as_int.get(self._expr, missing)
        if value is missing:
            value = as_int[self._expr] = original_as_int(self)
        return value

    @functools.wraps(original_wrap_int)
    def wrap_int(self, num):
        if self.shape_env is not shape_env or type(num) is not int:
            return original_wrap_int(self, num)
        node = wrapped.get(num)
        if node is None:
            node = wrapped[num] = original_wrap_int(self, num)
        return node

    replaced = {**{attribute: memoized(attribute, operation) for attribute, operation in originals.items()},
                "maybe_as_int": maybe_as_int, "wrap_int": wrap_int}
    originals = {**originals, "maybe_as_int": original_as_int, "wrap_int": original_wrap_int}
    for attribute, function in replaced.items():
        setattr(SymNode, attribute, function)
    try:
        yield
    finally:
        for attribute, function in originals.items():
            setattr(SymNode, attribute, function)
        memo.clear()
        as_int.clear()
        wrapped.clear()


@contextlib.contextmanager
def dropout_keeps_its_input_like_cpp() -> Iterator[None]:
    """Within the block, ``aten.dropout`` with ``p == 0`` or ``train=False`` returns its input, as the C++ kernel does.

    Why: a trace records with the Python dispatcher on, and there torch's Python decomposition of
    ``aten.dropout`` (``torch._decomp.decompositions.dropout``) answers ``input.clone()`` for that
    case, where ATen's ``dropout`` (``ATen/native/Dropout.cpp``) returns the input itself. Eager
    attention calls ``F.dropout(weights, p=0.0)`` on its S x S probabilities: the symbolic step
    then allocated, and the next matmul saved, a copy that a direct step never makes. Any other
    ``p`` goes to the decomposition as before.
    """
    op, originals = dropout_kernels()

    def keeps_input(original: Callable) -> Callable:
        @functools.wraps(original)
        def dropout(input, p, train):
            if p == 0 or not train:
                return input
            return original(input, p, train)
        return dropout

    for key, original in originals.items():
        op.py_kernels[key] = keeps_input(original)
    op._dispatch_cache.clear()
    try:
        yield
    finally:
        op.py_kernels.update(originals)
        op._dispatch_cache.clear()


def dropout_kernels() -> tuple[Any, dict]:
    """(``aten.dropout.default``, its Python kernels that clone for ``p == 0``); CompatError if that changed."""
    import torch
    from torch._C import DispatchKey

    op = torch.ops.aten.dropout.default
    kernels = getattr(op, "py_kernels", None)
    found = {key: kernels[key] for key in (DispatchKey.CompositeImplicitAutograd, DispatchKey.Autograd)
             if isinstance(kernels, dict) and key in kernels}
    try:
        sources = [inspect.getsource(kernel) for kernel in found.values()]
    except (TypeError, OSError):
        sources = []
    if len(found) != 2 or not hasattr(op, "_dispatch_cache") or not all("input.clone()" in source for source in sources):
        raise incompatible("torch", "has no Python kernels of aten.dropout (CompositeImplicitAutograd, Autograd) "
                           "that answer input.clone() for p == 0", "to make a symbolic step's dropout keep its "
                           "input as ATen's does (membench.trace.symbolic)")
    return op, found
