"""bitsandbytes: its quantised parameters as fake tensors.

``Params4bit.__new__`` (and ``Int8Params.__new__``) wrap their data with
``torch.Tensor._make_subclass``, which refuses a tensor that is already a
``FakeTensor``. The simulate backend needs the parameter to be both: a
``FakeTensor`` (so fake mode runs it) whose class is bitsandbytes' (so the
code that tests ``isinstance(w, Params4bit)`` or ``w.__class__.__name__ ==
"Params4bit"``, as PEFT's 4-bit DoRA does, takes the same branch as on a GPU).
:func:`fake_quantized_parameter` builds it through ``FakeTensor.__new__`` (a
private constructor: ``(fake_mode, elem, device)``) with a class that derives
from both and keeps bitsandbytes' name, then copies bitsandbytes' attributes
(block size, quant type, quant_state with fake absmax and code tables).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from membench.compat._checks import incompatible, parameter_names

_NEED = "to give a simulated model bitsandbytes' quantised parameters as fake tensors"


@functools.cache
def _fake_class(param_class: type) -> type:
    from torch._subclasses.fake_tensor import FakeTensor

    def to(self, *args, **kwargs):
        # bitsandbytes' .to() re-wraps the data in a new parameter (refused for fake data). A move to
        # where the tensor already is costs no bytes (the new wrapper shares the storage): PEFT's DoRA
        # does one per forward on CPU tensors (peft.utils.integrations.dequantize_module_weight),
        # which the fake CPU tensors standing in for CUDA ones would otherwise take.
        copy = kwargs.pop("copy", False)
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not copy and (device is None or device == self.device) and (dtype is None or dtype == self.dtype):
            return self
        return torch.Tensor.to(self, *args, copy=copy, **kwargs)

    # Same name and module as bitsandbytes' class: code that checks the class name takes its branch.
    return type(param_class.__name__, (FakeTensor, param_class), {"__module__": param_class.__module__, "to": to})


def check_fake_quantized_parameters() -> None:
    """``FakeTensor.__new__(cls, fake_mode, elem, device)`` and bitsandbytes' parameter classes exist."""
    from torch._subclasses.fake_tensor import FakeTensor

    names = parameter_names(FakeTensor.__new__)
    # (cls, fake_mode, elem, device, ...) up to torch 2.12; 2.13 names the first fake_mode_or_elem
    if names is None or names[0] != "cls" or names[1] not in ("fake_mode", "fake_mode_or_elem") \
            or names[2:4] != ["elem", "device"]:
        raise incompatible("torch", f"has FakeTensor.__new__({', '.join(names or ['?'])}), "
                           "not (cls, fake_mode, elem, device, ...)", _NEED)
    try:
        from bitsandbytes.functional import QuantState
        from bitsandbytes.nn import Int8Params, Params4bit
    except ImportError as error:
        raise incompatible("bitsandbytes", f"cannot import {error.name or error}", _NEED) from None
    for cls in (Params4bit, Int8Params):
        if not callable(getattr(cls, "_quantize", None)):
            raise incompatible("bitsandbytes", f"has no {cls.__name__}._quantize(device)", _NEED)
    if "state2" not in parameter_names(QuantState.__init__):
        raise incompatible("bitsandbytes", "QuantState takes no state2 (double quantisation)", _NEED)


def fake_quantized_parameter(fake_mode, param: torch.Tensor, device: torch.device,
                             fake: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A fake copy of the quantised ``param`` (on ``meta``) on ``device``, its class and attributes kept.

    Args:
        fake: Makes a fake tensor of the same shape and dtype on ``device`` (called inside ``fake_mode``),
            for the quant_state's tensors; shared ones (none today) would be made once by the caller.
    """
    check_fake_quantized_parameters()
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    with unset_fake_temporarily():  # the meta stand-in must not be a fake tensor itself
        elem = torch.empty(param.shape, dtype=param.dtype, device="meta")
    made = FakeTensor.__new__(_fake_class(type(param)), fake_mode, elem, device)
    made.requires_grad_(param.requires_grad)
    made._is_param = True
    for key, value in param.__dict__.items():
        if key == "quant_state":
            value = _fake_quant_state(value, fake)
        elif key in ("SCB", "CB") and isinstance(value, torch.Tensor):
            value = made if key == "CB" else fake(value)
        setattr(made, key, value)
    return made


def _fake_quant_state(state, fake):
    if state is None:
        return None
    from bitsandbytes.functional import QuantState

    def copy(tensor):
        return fake(tensor) if isinstance(tensor, torch.Tensor) else tensor

    return QuantState(absmax=copy(state.absmax), shape=state.shape, code=copy(state.code),
                      blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                      offset=copy(state.offset), state2=_fake_quant_state(state.state2, fake))


def quantization_maps_off_meta() -> None:
    """Make bitsandbytes' cached blockwise code table a real (CPU) tensor before quantising on ``meta``.

    ``functional.quantize_blockwise`` fills ``name2qmap["dynamic"]`` on first use with
    ``create_dynamic_map().to(A.device)`` and reuses it for the process: a first quantisation on
    ``meta`` (a simulated double-quantised model) would leave a meta table that every later real
    quantisation (the ``cpu`` backend) cannot copy from. Each layer copies the table to its own device
    (``code.to(A.device, copy=True)``), so where it is cached changes no byte of the model.
    """
    try:
        from bitsandbytes import functional
    except ImportError as error:
        raise incompatible("bitsandbytes", f"cannot import {error.name or error}", _MAPS_NEED) from None
    maps = getattr(functional, "name2qmap", None)
    if not isinstance(maps, dict) or not callable(getattr(functional, "create_dynamic_map", None)):
        raise incompatible("bitsandbytes", "has no functional.name2qmap / create_dynamic_map", _MAPS_NEED)
    cached = maps.get("dynamic")
    if cached is None or cached.device.type == "meta":
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), torch.device("cpu"):
            maps["dynamic"] = functional.create_dynamic_map()


_MAPS_NEED = "to keep its cached quantisation map usable after quantising a model on meta"
