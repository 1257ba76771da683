"""torch's sympy integer-division functions, which symbolic sizes are written in.

:mod:`membench.trace.periodic` proves a shape guard periodic by rewriting these with
``sympy.floor``; it has to know which classes they are. They live in torch's private
``torch.utils._sympy.functions``.
"""

from __future__ import annotations

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
