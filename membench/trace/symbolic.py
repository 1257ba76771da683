"""Recording one simulated step with the batch size, sequence lengths and LoRA rank symbolic.

The step is membench's own (:func:`membench.runner._measure` on a :class:`SymbolicBackend`):
the same model, method, optimizer and measured loop as ``simulate``, on fake tensors whose
batch dimensions are ``SymInt``s of a ``ShapeEnv``, and whose LoRA matrices are ``R x in`` and
``out x R`` for a fourth symbol R (:func:`symbolic_rank`). Every storage's ``nbytes()`` is then a
sympy expression in the symbols. Pitfalls this module avoids (see the project's trace notes):

* The Python dispatcher is on for the whole step (kept alive, one guard object), else
  C++ kernels read concrete sizes and specialise the symbols.
* The symbols are bounded (``2 <= dim <= MAX_DIM``): an unbounded symbol misses shortcuts
  (a full slice stays a view only when its bound is known).
* Nothing compares a ``SymInt`` during the step: the tracker keeps its running totals on the
  hint values (the recorded run's own sizes), and the saved-tensor counter, which sorts by
  size, counts hints while keeping each storage's symbolic size on the side.
* Size arithmetic is memoized (:func:`membench.compat.memoized_symbolic_arithmetic`): the
  step repeats the same few hundred operations on symbols some hundred thousand times.
* Views are made with less size arithmetic (:func:`membench.compat.cheap_fake_views`): a cached
  view's output with ``as_strided`` instead of torch's ``empty_strided`` and ``set_``, and a repeated
  ``aten._unsafe_view`` (one per linear layer, which torch never caches) from the sizes, strides and
  offset its reshape algorithm gave the first time (a T5-large LoRA recording: about a fifth less time).
* An in-place foreach op (the optimizer's ``_foreach_lerp_``, ``_foreach_addcdiv_``, ...) on lists of
  tensors of one dtype, device and size expression each is not run on the fake tensors
  (:func:`inplace_foreach_without_effect`): it returns nothing and allocates nothing, and its meta
  kernel would only check, on symbolic sizes, that equal sizes are equal (a quarter of recording
  a LoRA step's time).
* ``aten.dropout`` with ``p == 0`` returns its input, as ATen does, not the clone that torch's
  Python decomposition (which the dispatcher runs) makes (:func:`membench.compat.dropout_keeps_its_input_like_cpp`).
* Whatever guards the step did add are checked afterwards (:func:`validity`): a guard that
  only bounds a symbol narrows the trace's validity box; one periodic in a single symbol
  (:mod:`membench.trace.periodic`) limits it to residue classes; a polynomial inequality in the
  symbols (bitsandbytes' fused 4-bit kernel takes at most 1536 rows: ``B*S <= 1536``) becomes a
  condition the trace's workloads must meet; any other is :class:`TraceNotGeneral`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import sympy
import torch
from torch import nn
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.utils._sympy.value_ranges import bound_sympy

from membench.allocator import allocator_bytes
from membench.backends.simulate import SimulateBackend
from membench.backends.tracker import AllocationTracker
from membench.compat import (FakeTensorMode, cheap_fake_views, dropout_keeps_its_input_like_cpp,
                             memoized_symbolic_arithmetic, when_storage_freed)
from membench.events import ALLOC
from membench.saved_tensors import SavedTensorCounter
from membench.trace import periodic
from membench.trace.coverage import DIMS, MIN_SYMBOLIC

#: Upper bound declared for every symbolic size (batch size, sequence lengths, LoRA rank).
MAX_DIM = 1 << 20


class TraceNotGeneral(Exception):
    """The symbolic step took a size-dependent path a trace cannot express: simulate directly."""


def hint(value) -> int:
    """The concrete value of an int or backed ``SymInt`` (its hint), without adding a guard."""
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    return int(value)


def expression(value) -> sympy.Expr:
    """The sympy expression of a ``SymInt`` (an Integer for a plain int)."""
    if isinstance(value, torch.SymInt):
        return value.node.expr
    return sympy.Integer(int(value))


class At(int):
    """Allocated bytes (on hints) that also remember where in the event log they were read."""

    index: int

    def __new__(cls, value: int, index: int) -> "At":
        self = super().__new__(cls, value)
        self.index = index
        return self

    def __reduce__(self):  # copies (dataclasses.asdict) are plain ints
        return int, (int(self),)

    def __sub__(self, other):
        if isinstance(other, At):
            return Span(int(self) - int(other), other.index, self.index)
        return int(self) - other


class Span(int):
    """A difference of two :class:`At` values: allocated at ``end`` minus allocated at ``start``."""

    start: int
    end: int

    def __new__(cls, value: int, start: int, end: int) -> "Span":
        self = super().__new__(cls, value)
        self.start, self.end = start, end
        return self

    def __reduce__(self):
        return int, (int(self),)


def inplace_foreach_without_effect(func, args: tuple, kwargs: Optional[dict]) -> bool:
    """Whether ``func(*args, **kwargs)`` is an in-place foreach op that a fake step may skip.

    Such an op (``aten::_foreach_<op>_``, which returns nothing) writes into its first list's tensors,
    so on fake tensors it allocates nothing and changes nothing but values, which fake tensors do not
    have. Its meta kernel checks that the lists match; that holds without running it when every list
    has, position by position, tensors of the same type, dtype, device and size expressions (compared
    as expressions: no guard). A tensor argument that is not in a list (a scalar tensor), keyword
    arguments, or a fake tensor that tracks a constant value (whose value the op would change) make
    it run as usual.
    """
    schema = func._schema
    if kwargs or schema.returns or not (schema.name.startswith("aten::_foreach_") and schema.name.endswith("_")):
        return False
    lists = []
    for argument in args:
        if isinstance(argument, torch.Tensor):
            return False
        if isinstance(argument, (list, tuple)) and argument and isinstance(argument[0], torch.Tensor):
            lists.append(argument)
    if not lists:
        return False
    first = lists[0]
    for tensors in lists:
        if len(tensors) != len(first):
            return False
        for tensor, reference in zip(tensors, first):
            if (type(tensor) is not type(reference) or getattr(tensor, "constant", None) is not None
                    or tensor.dtype != reference.dtype or tensor.device != reference.device
                    or tensor.dim() != reference.dim()
                    or any(expression(size) != expression(other) for size, other in zip(tensor.shape, reference.shape))):
                return False
    return True


class SymbolicTracker(AllocationTracker):
    """The allocator model, logging each storage's symbolic size and counting its hint."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if inplace_foreach_without_effect(func, args, kwargs):
            return None
        return super().__torch_dispatch__(func, types, args, kwargs)

    def track(self, tensor: torch.Tensor, func=None) -> None:
        new = self.new_storage(tensor)
        if new is None:
            return
        storage, key = new
        nbytes = storage.nbytes()  # a SymInt: logged as is, never compared
        size = allocator_bytes(hint(nbytes))
        self._live[key] = size
        if func is not None:
            self._origin[key] = func
        if self.events is not None:
            self.events.append((ALLOC, key, nbytes, func))
        self.allocated += size
        if self.allocated > self.peak:
            self.peak = self.allocated
        when_storage_freed(storage, self._release, key)


class SymbolicSavedCounter(SavedTensorCounter):
    """Counts saved storages on hints (its sorting adds no guard) and keeps their symbolic sizes.

    Attributes:
        symbolic: storage key -> (size expression, module path, op) for the last counted forward.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.symbolic: dict[int, tuple] = {}

    def _count(self, key: int, storage: torch.UntypedStorage) -> None:
        super()._count(key, storage)
        nbytes, module, op = self._seen[key]
        self._seen[key] = (hint(nbytes), module, op)
        self.symbolic[key] = (expression(nbytes), module, op)

    def _forget(self, key: int) -> None:
        super()._forget(key)
        del self.symbolic[key]

    @contextlib.contextmanager
    def counting(self, origin=None) -> Iterator["SavedTensorCounter"]:
        self.symbolic = {}
        with super().counting(origin) as counter:
            yield counter


class SymbolicBackend(SimulateBackend):
    """``simulate`` with a shape environment: the batch's dimensions are symbols hinted by the run's sizes.

    Args:
        hints: The concrete (B, S, T, R) of the recorded run; T is the decoder length (seq2seq) or S,
            R the LoRA rank (0 for full fine-tuning).
        seq2seq: Whether a second batch tensor's length is T (labels of a seq2seq model).
        adapters: Whether the method trains LoRA adapters, whose matrices :meth:`build` makes R wide
            where :func:`symbolic_rank` can; otherwise the trace holds for the recorded rank only.
        symbolic: The sizes to leave symbolic, letters of ``"BSTR"``; the others stay the hint's
            value, and the trace holds for that value only. A sweep that varies only the batch size
            records ``"B"``: fewer symbols, less symbolic arithmetic (``backend.trace_symbols``). T is
            always symbolic for a model with no decoder (no tensor has it, and the run's T is its S).

    Attributes:
        rank_symbolic: Whether :meth:`build` made the adapters' rank the symbol R.
    """

    def __init__(self, profile, cuda_semantics: bool, fake_device: str, hints: tuple[int, int, int, int],
                 seq2seq: bool, adapters: bool = False, symbolic: str = "".join(DIMS)) -> None:
        super().__init__(profile, cuda_semantics, fake_device)
        self.tracker = SymbolicTracker(self.device.type)
        # No duck sizing: B, S, T and R stay four symbols even when their hints are equal.
        self.shape_env = ShapeEnv(duck_shape=False)
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=False, shape_env=self.shape_env)
        self.seq2seq = seq2seq
        self.adapters = adapters
        self.rank = hints[3]
        self.hints = hints
        kept = {name for name in DIMS if name in symbolic or (name == "T" and not seq2seq)}
        self.rank_symbolic = False
        self._batches = 0
        # A rank below MIN_SYMBOLIC would be specialised like any size 1: R then stands for it and stays unused.
        template = self.fake_mode.from_tensor(
            torch.empty((*hints[:3], max(self.rank, MIN_SYMBOLIC)), device="meta"), source=ConstantSource("workload"),
            symbolic_context=StatelessSymbolicContext(dynamic_sizes=[
                DimDynamic.DYNAMIC if name in kept else DimDynamic.STATIC for name in DIMS]))
        self.dims = tuple(template.shape)
        self.symbols = {name: expression(dim) for name, dim in zip(DIMS, self.dims) if name in kept}
        with self.fake_mode:
            for name, dim in zip(DIMS, self.dims):
                if name in self.symbols:
                    torch._check(dim <= MAX_DIM)
        if any(not isinstance(symbol, sympy.Symbol) for symbol in self.symbols.values()):
            raise TraceNotGeneral(f"batch dimensions {hints} were specialised, not made symbolic")

    def build(self, factory, parallelize=None) -> nn.Module:
        model = super().build(factory, parallelize)
        if self.adapters and self.rank >= MIN_SYMBOLIC and "R" in self.symbols:
            self.rank_symbolic = symbolic_rank(model, self.rank, self.dims[3], self.fake_mode)
        return model

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        batch, seq, target = self.dims[:3]
        length = target if self.seq2seq and self._batches > 0 else seq
        self._batches += 1
        wanted = (batch, length)[:tensor.dim()]
        if tensor.dim() > 2 or tuple(tensor.shape) != tuple(hint(dim) for dim in wanted):
            raise TraceNotGeneral(f"a batch tensor of shape {tuple(tensor.shape)} is not (batch, length)")
        with self.fake_mode:
            return torch.empty(wanted, dtype=tensor.dtype, device=self.device)

    def allocated(self) -> At:
        events = self.tracker.events
        return At(self.tracker.allocated, 0 if events is None else len(events))

    @contextlib.contextmanager
    def session(self, tensors: list[torch.Tensor]) -> Iterator[None]:
        dispatcher = torch._C._EnablePythonDispatcher()  # noqa: F841 - an RAII guard: alive for the step
        with (memoized_symbolic_arithmetic(self.shape_env), dropout_keeps_its_input_like_cpp(), cheap_fake_views(),
              super().session(tensors)):
            yield
        del dispatcher

    def validity(self) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, tuple[int, ...]]], tuple]:
        """The set of (B, S, T, R) in which the recorded step is the step of every size.

        Returns:
            ``(ranges, classes, conditions)``: a box {name: (lowest, highest)}; {name: (modulus,
            residues)} for the sizes a periodic guard splits by residue class
            (:mod:`membench.trace.periodic`); and the polynomial inequalities in several sizes the
            step's path depends on (:func:`polynomial_condition`), in symbols named B, S, T and R.

        Raises:
            TraceNotGeneral: a guard the step added is neither implied by bounds on single symbols,
                nor periodic in one symbol, nor a polynomial inequality.
        """
        ranges = {}
        for name, value in zip(DIMS, self.hints):
            symbol = self.symbols.get(name)
            if symbol is None:  # left concrete: the trace holds for this value only
                ranges[name] = (value, value)
                continue
            if symbol in self.shape_env.replacements:
                raise TraceNotGeneral(f"{name} was specialised to {self.shape_env.replacements[symbol]}")
            bound = self.shape_env.var_to_range[symbol]
            ranges[name] = (max(MIN_SYMBOLIC, int(bound.lower)), min(MAX_DIM, int(bound.upper)))
        if not self.rank_symbolic:  # R is unused: any rank (full fine-tuning has none), or the recorded one only
            ranges["R"] = (self.rank, self.rank) if self.adapters else (0, MAX_DIM)
        var_ranges = {symbol: self.shape_env.var_to_range[symbol] for symbol in self.symbols.values()}
        names = {symbol: name for name, symbol in self.symbols.items()}
        rename = {symbol: size_symbol(name) for name, symbol in self.symbols.items()}
        classes: dict[str, tuple[int, tuple[int, ...]]] = {}
        conditions: list[sympy.Basic] = []
        for guard in self.shape_env.guards:
            implied = bound_sympy(guard.expr, var_ranges)
            if implied.is_singleton() and bool(implied.lower) is True:
                continue
            symbol = next(iter(guard.expr.free_symbols)) if len(guard.expr.free_symbols) == 1 else None
            modulus = periodic.period(guard.expr, symbol) if symbol in names else None
            if modulus is not None:
                name = names[symbol]
                periodic.combine(classes, name, modulus,
                                 periodic.residues(guard.expr, symbol, modulus, ranges[name][0]))
            elif polynomial_condition(guard.expr, tuple(names)):
                condition = guard.expr.xreplace(rename)
                if condition not in conditions:
                    conditions.append(condition)
            else:
                raise TraceNotGeneral("the step depends on the workload's sizes beyond bounds: guard "
                                      f"{guard.expr.xreplace(rename)}")
        return ranges, classes, tuple(conditions)


#: PEFT's LoRA variants (``LoraLayer.lora_variant``) whose forward reads the adapter weights and the
#: scale but never the rank itself: DoRA on linear layers (``DoraLinearVariant``).
RANK_FREE_VARIANTS = ("DoraLinearVariant",)


def symbolic_rank(model: nn.Module, rank: int, symbol: torch.SymInt, fake_mode) -> bool:
    """Make every LoRA matrix of ``model`` ``symbol`` wide instead of ``rank``, in place; False if one cannot be.

    PEFT builds each adapted layer's A as ``nn.Linear(in, r)`` (weight ``r x in``) and B as
    ``nn.Linear(r, out)`` (weight ``out x r``), and reads ``r`` afterwards only to initialise the
    weights and for the scale ``alpha / r``, a value the forward multiplies by whatever it is. So
    once A and B are replaced by fake parameters ``R x in`` and ``out x R`` (same dtype, device and
    ``requires_grad``), the step is the step of every rank, as far as its guards say.

    PEFT's ``ParamWrapper`` (fused MoE experts, ``target_parameters``) stacks one pair per expert,
    ``r x experts`` rows, and splits them again with ``reshape(experts, -1, ...)``: its matrices
    become ``R x experts`` rows. Only when every adapter of every LoRA layer is a pair of that form
    (no embedding or convolution adapter, no second rank, no LoRA variant but DoRA's, which reads
    only the weights and the scale) is anything replaced: one matrix left ``rank`` wide would tie
    the trace to that rank.
    """
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    replacements: list[tuple[nn.Linear, tuple]] = []
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        if any(len(getattr(layer, name, ())) for name in ("lora_embedding_A", "lora_embedding_B")):
            return False
        for adapter, adapter_rank in layer.r.items():
            variant = getattr(layer, "lora_variant", {}).get(adapter)
            if variant is not None and type(variant).__name__ not in RANK_FREE_VARIANTS:
                return False
            first, second = layer.lora_A[adapter], layer.lora_B[adapter]
            if adapter_rank != rank or type(first) is not nn.Linear or type(second) is not nn.Linear:
                return False
            # PEFT's ParamWrapper (fused MoE experts) stacks one rank-r pair per expert: r x experts rows,
            # which its forward splits again with reshape(experts, -1, ...).
            experts = layer.num_experts if isinstance(layer, ParamWrapper) else 1
            if first.weight.shape[0] != rank * experts or second.weight.shape[1] != rank * experts:
                return False
            replacements += [(first, (symbol * experts, first.weight.shape[1])),
                             (second, (second.weight.shape[0], symbol * experts))]
    if not replacements:
        return False
    with fake_mode:
        for linear, shape in replacements:
            old = linear.weight
            linear.weight = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                         requires_grad=old.requires_grad)
    return True


def size_symbol(name: str) -> sympy.Symbol:
    """The symbol a trace stores for size ``name`` (B, S, T or R) in its polynomials and conditions."""
    return sympy.Symbol(name, integer=True, positive=True)


def polynomial_condition(guard: sympy.Basic, symbols: tuple[sympy.Symbol, ...]) -> bool:
    """Whether ``guard`` is an inequality between polynomials in ``symbols`` (no division, no modulo).

    Such a guard cuts the sizes into regions on whose every point the step takes the same path
    (``B*S <= 1536``), so a trace answers the region its hints lie in. An equality is refused: it
    would hold on a curve, not a region, and a trace of it would answer almost nothing.
    """
    if not isinstance(guard, sympy.core.relational.Relational) or isinstance(guard, sympy.Eq):
        return False
    if not guard.free_symbols or not guard.free_symbols <= set(symbols):
        return False
    return (guard.lhs - guard.rhs).is_polynomial(*symbols)
