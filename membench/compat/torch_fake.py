"""FakeTensorMode's dispatch cache, keyed faster: the same key, built without the per-tensor dataclass.

A simulated step is about 100,000 fake-tensor ops, and most are answered from FakeTensorMode's
dispatch cache. Building the cache key is the largest single cost of a hit: for every tensor
argument torch makes a ``TensorMetadata`` dataclass, then walks its fields with ``dataclasses.fields``
and ``isinstance`` tests to flatten it into the key (about a third of a direct simulation's time on
T5-large LoRA, in cProfile). :func:`fast_fake_cache_keys` flattens a strided fake tensor argument
straight into the same values, in the same order (a symbolic size through torch's own
``_CacheKeyState.convert_sym_int``, as torch does); every other argument goes to torch's own code.

The key is the same list, value for value, so every hit, miss and bypass is the one torch would
make: :func:`check_fake_cache_keys` compares both on tensors of every kind the fast path takes and
some it must leave to torch (a test runs it; ``python -m membench.compat`` too).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator

import torch

from membench.compat._checks import CompatError, incompatible, require

#: The fields of torch's ``TensorMetadata``, in the order its ``_flatten_into`` appends them; the fast
#: path appends the same values in this order.
TENSOR_METADATA_FIELDS = ("dtype", "shape", "stride", "device", "layout", "memory_format", "storage_offset",
                          "storage_bytes", "requires_grad", "is_quantized", "is_conj", "is_neg", "is_inference",
                          "is_sparse", "is_coalesced", "dense_dim", "sparse_dim")
#: Arguments torch's ``_prep_args_for_hash`` keys as ``(type(arg), arg)``: its last branch.
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
_NEED = "to build FakeTensorMode's dispatch-cache keys faster, value for value (membench.compat.torch_fake)"


def _targets() -> tuple[Any, Callable, Callable]:
    from torch._subclasses import fake_tensor

    mode = fake_tensor.FakeTensorMode
    original = require("torch", mode, "FakeTensorMode._prep_args_for_hash",
                       ["self", "result", "args", "state", "id_hashed_objects"], _NEED)
    fields = tuple(field.name for field in dataclasses.fields(fake_tensor.TensorMetadata))
    if fields != TENSOR_METADATA_FIELDS:
        raise incompatible("torch", f"has TensorMetadata fields {fields}", _NEED)
    from torch._prims_common import suggest_memory_format

    return fake_tensor, original, suggest_memory_format


def _fast_prep_args_for_hash(original: Callable, fake_tensor_class: type, suggest_memory_format: Callable) -> Callable:
    strided, symint = torch.strided, torch.SymInt

    def prep(self, result: list, args, state, id_hashed_objects: list) -> None:
        if isinstance(args, (list, tuple, dict)):
            result.append(type(args))
            result.append(f"length_{len(args)}")
        if isinstance(args, dict):
            prep(self, result, args.keys(), state, id_hashed_objects)
            prep(self, result, args.values(), state, id_hashed_objects)
            return
        append = result.append

        def size(value) -> None:  # an element of the shape or stride tuple, as torch's loop keys it
            if type(value) is int:
                append(int)
                append(value)
            elif type(value) is symint:
                state.convert_sym_int(result, value)
            else:
                original(self, result, iter((value,)), state, id_hashed_objects)

        def field(value) -> None:  # storage_offset, storage_bytes: TensorMetadata._flatten_into's scalar fields
            if type(value) is symint:
                state.convert_sym_int(result, value)
            else:
                append(value)

        for arg in args:
            kind = type(arg)
            if kind is fake_tensor_class and arg.fake_mode is self and arg.constant is None and arg.layout is strided:
                # torch's extract_tensor_metadata, in its order (suggest_memory_format may guard on symbolic sizes)
                memory_format = suggest_memory_format(arg)
                if arg._has_symbolic_sizes_strides or not arg.is_contiguous(memory_format=memory_format):
                    memory_format = None
                shape, stride = arg.shape, arg.stride()
                append(arg.dtype)
                append(torch.Size)
                append(f"length_{len(shape)}")
                for value in shape:
                    size(value)
                append(tuple)
                append(f"length_{len(stride)}")
                for value in stride:
                    size(value)
                append(arg.device)
                append(strided)
                append(memory_format)
                field(arg.storage_offset())
                field(arg.untyped_storage().nbytes())
                for value in (arg.requires_grad, arg.is_quantized, arg.is_conj(), arg.is_neg(), arg.is_inference(),
                              False, None, None, None):  # is_sparse, is_coalesced, dense_dim, sparse_dim
                    append(value)
            elif kind in _PLAIN:
                append(kind)
                append(arg)
            elif kind is list or kind is tuple or kind is dict:
                prep(self, result, arg, state, id_hashed_objects)
            else:  # anything else (SymInts, other tensors, graph modules, bypasses): torch's own code
                # An iterator, not a tuple: torch keys a tuple's type and length first, an iterator's not.
                original(self, result, iter((arg,)), state, id_hashed_objects)

    return prep


@contextlib.contextmanager
def fast_fake_cache_keys() -> Iterator[None]:
    """Within the block, FakeTensorMode builds its dispatch-cache keys with :func:`_fast_prep_args_for_hash`.

    The patch is on the class, so it holds for every fake mode while the block runs (a simulated
    step runs on one thread); it is undone on exit, also after an error.
    """
    fake_tensor, original, suggest_memory_format = _targets()
    mode = fake_tensor.FakeTensorMode
    mode._prep_args_for_hash = _fast_prep_args_for_hash(original, fake_tensor.FakeTensor, suggest_memory_format)
    try:
        yield
    finally:
        mode._prep_args_for_hash = original


def _sample_arguments(fake_mode) -> list:
    """Arguments of every kind the fast path flattens, and some it must leave to torch."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    with fake_mode:
        plain = torch.empty(3, 5, requires_grad=True)
        with torch.inference_mode():
            inference = torch.empty(2)
        tensors = [plain, plain.t(), plain[1:, 2:], torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last),
                   torch.empty(0, 7, dtype=torch.bool), torch.empty((), dtype=torch.bfloat16), inference,
                   torch.empty(4, dtype=torch.complex64).conj(), torch.empty(2, 2).expand(3, 2, 2)]
    symbolic_mode = type(fake_mode)(shape_env=ShapeEnv())
    symbolic = symbolic_mode.from_tensor(torch.empty(4, 6), source=ConstantSource("sizes"), symbolic_context=(
        StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC])))
    image = symbolic_mode.from_tensor(torch.empty(2, 3, 4, 5), source=ConstantSource("image"), symbolic_context=(
        StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * 4)))
    with symbolic_mode:
        concrete = torch.empty(2, 3)  # a size-free tensor in a symbolic mode
        symbolic_view = symbolic.view(-1)[:5]  # concrete sizes, symbolic storage
        graded = torch.empty(symbolic.shape, requires_grad=True)
        symbolic_tensors = [symbolic, symbolic.t(), symbolic[1:], graded, image,
                            image.to(memory_format=torch.channels_last), image.permute(0, 2, 3, 1)]
    # One list per kind: repeated sizes within one key are back-references to their first place.
    return [tensors, [(tensor, 1, 2.0, None, [True, "x", torch.float16]) for tensor in tensors],
            {"dim": 1, "keepdim": False, "dtype": torch.float32, "device": torch.device("cpu")},
            [torch.strided, torch.contiguous_format], [symbolic, 3, concrete, symbolic_view, symbolic.shape[0]],
            [torch.empty(2)], symbolic_tensors, [symbolic.shape[1], *symbolic_tensors[:4], [symbolic_view, 2]]]


def check_fake_cache_keys() -> None:
    """The fast key equals torch's, value for value, on :func:`_sample_arguments`, and adds the same guards.

    Each way keys its own copy of the sample, in shape environments of its own, so a guard one way
    adds and the other does not shows in the environments' guard lists. Raises CompatError if not.
    """
    fake_tensor, original, suggest_memory_format = _targets()
    fast = _fast_prep_args_for_hash(original, fake_tensor.FakeTensor, suggest_memory_format)
    keys: dict[Callable, list] = {}
    guards: dict[Callable, list] = {}
    for prep in (original, fast):
        fake_mode = fake_tensor.FakeTensorMode()
        samples, environments = _sample_arguments(fake_mode), {}
        keys[prep] = []
        for arguments in samples:
            owner = next((arg.fake_mode for arg in arguments if isinstance(arg, fake_tensor.FakeTensor)
                          and arg.fake_mode is not fake_mode), fake_mode)
            if owner.shape_env is not None:
                environments[id(owner.shape_env)] = owner.shape_env
            result: list = []
            try:
                prep(owner, result, arguments, fake_tensor._CacheKeyState(owner.shape_env), [])
            except fake_tensor._BypassDispatchCache as bypass:
                result.append(("bypass", bypass.reason))
            keys[prep].append((arguments, result))
        guards[prep] = [str(guard.expr) for env in environments.values() for guard in env.guards]
    for (arguments, plain), (_, quick) in zip(keys[original], keys[fast]):
        if plain != quick:
            raise CompatError(f"torch {torch.__version__}: FakeTensorMode keys {arguments!r} as {plain!r}; "
                              f"membench's fast key gave {quick!r} ({_NEED})")
    if guards[original] != guards[fast]:
        raise CompatError(f"torch {torch.__version__}: keying membench's sample added the guards {guards[original]} "
                          f"torch's way and {guards[fast]} membench's ({_NEED})")
