"""bitsandbytes' 8-bit optimizers on the tracked backends (simulate, cpu), placed in memory as on CUDA.

What bitsandbytes 0.50 allocates where (``bitsandbytes/optim/optimizer.py``):

* **At construction**, on the host: ``Optimizer8bit.fill_qmap`` builds two quantisation maps
  (``create_dynamic_map``, 256 fp32 values each, built through ``.tolist()``) into ``name2qmap``.
* **At the first step**, per parameter (``Optimizer2State.init_state``): the maps are copied to the
  device once (``self.name2qmap[...].to(p.device)``, kept for all later parameters); a parameter with at
  least ``min_8bit_size`` elements gets uint8 ``state1``/``state2`` shaped like it plus fp32 ``absmax1``/
  ``absmax2`` with one value per block of ``blocksize`` elements; a smaller one gets fp32 ``state1``/
  ``state2``. The step counter is a Python int (nothing on the device or the host).
* **Paged** (``get_state_buffer``, ``is_paged=True``): the state buffers of a parameter with at least
  :attr:`EightBitLayout.paged_min_numel` elements come from ``F.get_paged`` (``cudaMallocManaged``):
  outside the caching allocator and outside ``max_memory_allocated``. ``absmax`` and the maps are not paged.

On the tracked backends the parameters are CPU tensors (real or fake), which changes all three: the host maps
would already be on the modelled device (and ``.tolist()`` fails on fake tensors), and bitsandbytes refuses
to page on the CPU (it warns and allocates plainly). :func:`bitsandbytes_optimizer_as_on_cuda` builds the
optimizer so that each of these lands where CUDA puts it; the update kernels themselves are bitsandbytes'
own (its fake kernels under simulate, its CPU kernels on cpu; both update in place and return nothing).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch

from membench.compat._checks import incompatible, require
from membench.compat.torch_memory import FakeTensor

_NEED = "to place an 8-bit optimizer's quantisation maps and paged state as bitsandbytes does on CUDA"
#: Set on a state buffer made in modelled managed memory (bitsandbytes' own paged buffers carry ``is_paged``).
MODELLED_PAGED = "membench_paged"


@dataclass(frozen=True)
class EightBitLayout:
    """The sizes that decide an 8-bit optimizer's state, read from the installed bitsandbytes.

    Attributes:
        blocksize: Elements per ``absmax`` value (``init_state``'s ``blocksize``).
        min_8bit_size: The default of ``min_8bit_size``: smaller parameters keep fp32 state.
        paged_min_numel: Paged optimizers page the buffers of parameters with at least this many elements.
        qmap_numel: Elements of each of the two quantisation maps.
    """

    blocksize: int
    min_8bit_size: int
    paged_min_numel: int
    qmap_numel: int


def _source(function: Callable) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError) as error:
        raise incompatible("bitsandbytes", f"has no readable source for {function.__qualname__} ({error})",
                           _NEED) from None


def _number(pattern: str, function: Callable, what: str) -> int:
    found = re.search(pattern, _source(function))
    if found is None:
        raise incompatible("bitsandbytes", f"has {function.__qualname__} without {what} (pattern {pattern!r})", _NEED)
    return int(float(found.group(1)))


def _classes():
    try:
        from bitsandbytes.optim.optimizer import Optimizer2State, Optimizer8bit
        import bitsandbytes.functional as functional
    except ImportError as error:
        raise incompatible("bitsandbytes", f"cannot be imported ({error})", _NEED) from None
    return Optimizer8bit, Optimizer2State, functional


def eight_bit_layout() -> EightBitLayout:
    """The installed bitsandbytes' block size, 8-bit threshold, paging threshold and map size (checked).

    Raises:
        CompatError: the source no longer says what membench reads from it.
    """
    optimizer8bit, optimizer2state, functional = _classes()
    init_state = _source(optimizer2state.init_state)
    if 'self.name2qmap["dynamic"].to(p.device)' not in init_state:
        raise incompatible("bitsandbytes", "has Optimizer2State.init_state without name2qmap[...].to(p.device)",
                           _NEED)
    if "F.get_paged(" not in _source(optimizer8bit.get_state_buffer):
        raise incompatible("bitsandbytes", "has Optimizer8bit.get_state_buffer without F.get_paged", _NEED)
    require("bitsandbytes", optimizer8bit, "Optimizer8bit.get_state_buffer", ["self", "p", "dtype"], _NEED)
    require("bitsandbytes", optimizer8bit, "Optimizer8bit.fill_qmap", ["self"], _NEED)
    default = inspect.signature(optimizer2state.__init__).parameters.get("min_8bit_size")
    if default is None or not isinstance(default.default, int):
        raise incompatible("bitsandbytes", "has Optimizer2State without an integer min_8bit_size default", _NEED)
    with _disable_current_modes():  # a host computation (it calls .tolist()), as at construction
        qmap = functional.create_dynamic_map(signed=True)
    return EightBitLayout(
        blocksize=_number(r"blocksize = (\d+)", optimizer2state.init_state, "a blocksize"),
        min_8bit_size=default.default,
        paged_min_numel=_number(r"p\.numel\(\) < ([0-9.e]+)", optimizer8bit.get_state_buffer, "a paging threshold"),
        qmap_numel=qmap.numel(),
    )


def check_bitsandbytes_optimizers() -> None:
    eight_bit_layout()
    optimizer8bit, _, _ = _classes()
    from bitsandbytes.optim import AdamW8bit

    optimizer = AdamW8bit([torch.nn.Parameter(torch.zeros(2))])
    if not isinstance(optimizer, optimizer8bit) or sorted(optimizer.name2qmap) != ["dynamic", "udynamic"]:
        raise incompatible("bitsandbytes", f"has AdamW8bit with name2qmap keys {sorted(optimizer.name2qmap)}, "
                           "not dynamic/udynamic", _NEED)


class HostQuantizationMap:
    """A quantisation map bitsandbytes built on the host; its ``.to(device)`` makes the device copy CUDA makes."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host

    def to(self, device: torch.device) -> torch.Tensor:
        copy = torch.empty(self.host.shape, dtype=self.host.dtype, device=device)  # seen by the current modes
        if not isinstance(copy, FakeTensor):
            copy.copy_(self.host)
        return copy


def _disable_current_modes() -> ContextManager[None]:
    from torch.utils import _python_dispatch

    return require("torch", _python_dispatch, "torch.utils._python_dispatch._disable_current_modes", [], _NEED)()


def bitsandbytes_optimizer_as_on_cuda(factory: Callable[[], torch.optim.Optimizer],
                                      off_device: Callable[[], ContextManager[None]]) -> torch.optim.Optimizer:
    """``factory()`` (a bitsandbytes 8-bit optimizer) made on a tracked backend as it would be on CUDA.

    * The constructor runs with every dispatch mode off, so its quantisation maps are untracked host
      tensors (as on CUDA); each is wrapped in :class:`HostQuantizationMap`, so the first step's
      ``.to(p.device)`` allocates a device copy through the tracker.
    * A paged optimizer's ``get_state_buffer`` makes the buffers bitsandbytes would page on CUDA inside
      ``off_device()`` (not counted, marked :data:`MODELLED_PAGED`), and the others with ``zeros_like`` as
      bitsandbytes does.

    Raises:
        CompatError: bitsandbytes no longer works the way this models (:func:`eight_bit_layout`).
    """
    layout = eight_bit_layout()
    with _disable_current_modes():
        optimizer = factory()
    optimizer.name2qmap = {name: HostQuantizationMap(qmap) for name, qmap in optimizer.name2qmap.items()}
    if optimizer.is_paged:
        def get_state_buffer(p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            if p.numel() < layout.paged_min_numel:
                return torch.zeros_like(p, dtype=dtype, device=p.device)
            with off_device():
                buffer = torch.zeros_like(p, dtype=dtype, device=p.device)
            setattr(buffer, MODELLED_PAGED, True)
            return buffer

        optimizer.get_state_buffer = get_state_buffer
    return optimizer


def paged_state_tensors(optimizer: torch.optim.Optimizer) -> Optional[list[torch.Tensor]]:
    """The state tensors of a paged bitsandbytes optimizer that live in managed memory; None if not paged.

    On CUDA bitsandbytes marks them ``is_paged``; on tracked backends :func:`bitsandbytes_optimizer_as_on_cuda`
    marks them :data:`MODELLED_PAGED`.
    """
    if not getattr(optimizer, "is_paged", False):
        return None
    return [value for state in optimizer.state.values() for value in state.values()
            if isinstance(value, torch.Tensor)
            and (getattr(value, "is_paged", False) or getattr(value, MODELLED_PAGED, False))]
