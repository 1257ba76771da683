"""A real closed form, unlike the symbolic walk: saved bytes of a stack of linear layers, full, LoRA or LoRA-FA."""

from __future__ import annotations

from typing import Optional

from membench.analytic.sizes import FP32


def linear_stack_saved_bytes(widths: list[int], tokens: int, kind: str, rank: int = 0, itemsize: int = FP32,
                             adapter_itemsize: Optional[int] = None) -> int:
    """Saved bytes of a stack of bias-free or biased ``nn.Linear`` layers ``widths[0] -> widths[1] -> ...``.

    A closed form, and the building block of the walk's linear and adapter terms.
    The input is ``tokens x widths[0]`` and needs no gradient; every layer is
    adapted for the adapter kinds. With ``q`` the adapter item size:

    * ``full``: each layer keeps its input for its weight gradient:
      ``sum_i tokens * widths[i] * itemsize``;
    * ``lora``: each ``lora_A`` keeps its input (cast to the adapter dtype, a copy
      when it differs) and each ``lora_B`` keeps ``XA``:
      ``sum_i tokens * (widths[i] + rank) * q``;
    * ``lora_fa``: only ``XA``: ``layers * tokens * rank * q``.
    """
    q = adapter_itemsize or itemsize
    inputs = widths[:-1]
    if kind == "full":
        return sum(tokens * width * itemsize for width in inputs)
    if kind == "lora":
        return sum(tokens * (width + rank) * q for width in inputs)
    if kind == "lora_fa":
        return len(inputs) * tokens * rank * q
    raise ValueError(f"kind={kind!r}: choose full, lora or lora_fa")
