"""Guards that split a trace by residue class: the step's structure repeats with a period in one size.

CUDA's memory-efficient attention rounds its log-sum-exp rows up to a multiple of 32
(:data:`membench.backends.cuda_semantics.LSE_ROW_ALIGNMENT`), and membench's CPU stand-in copies
into the rounded storage only when rounding changes the size. The symbolic step therefore guards
``Eq(32*ceil(S/32), S)`` (or ``Ne``): the events of S = 64 and S = 77 differ, but those of every
S in one class modulo 32 do not. Such a guard does not make a trace useless, it says which class
the trace answers; a second trace, recorded for a workload of another class, answers that one.

A guard is accepted as periodic when it has one free symbol ``x``, every floor division and
modulo in it divides by an integer constant, and, with ``m`` the least common multiple of those
divisors, ``lhs - rhs`` at ``x + m`` simplifies to ``lhs - rhs`` at ``x``: a proof, not a sample,
that the guard's truth value has period ``m``. Anything else is not periodic (the caller falls back).
"""

from __future__ import annotations

import math
from typing import Optional

import sympy

from membench.compat import sympy_integer_divisions

#: Largest period accepted; a larger one would mean recording a trace for almost every size.
MAX_PERIOD = 256


def _as_floor(expression: sympy.Expr) -> Optional[sympy.Expr]:
    """``expression`` with torch's integer divisions written with ``sympy.floor``; None if a divisor is not constant."""
    divisions = sympy_integer_divisions()
    replacements = {}
    for node in sympy.preorder_traversal(expression):
        name = divisions.get(type(node))
        if name is None:
            continue
        numerator, divisor = node.args
        if not divisor.is_Integer or divisor == 0:
            return None
        quotient = sympy.floor(numerator / divisor)
        if name == "CeilDiv":
            replacements[node] = -sympy.floor(-numerator / divisor)
        elif name in ("Mod", "PythonMod"):
            replacements[node] = numerator - divisor * quotient
        else:
            replacements[node] = quotient
    if not replacements:
        return expression
    return _as_floor(expression.xreplace(replacements))  # a division nested in a replaced one


def period(guard: sympy.Basic, symbol: sympy.Symbol) -> Optional[int]:
    """The period of ``guard`` in ``symbol`` (its only free symbol), or None when it is not proven periodic."""
    if not isinstance(guard, sympy.core.relational.Relational) or guard.free_symbols != {symbol}:
        return None
    divisions = sympy_integer_divisions()
    divisors = [int(node.args[1]) for node in sympy.preorder_traversal(guard)
                if type(node) in divisions and node.args[1].is_Integer]
    if not divisors:
        return None
    modulus = math.lcm(*(abs(divisor) for divisor in divisors))
    difference = _as_floor(guard.lhs - guard.rhs)
    if modulus > MAX_PERIOD or difference is None:
        return None
    shifted = difference.xreplace({symbol: symbol + modulus})
    return modulus if sympy.simplify(shifted - difference) == 0 else None


def residues(guard: sympy.Basic, symbol: sympy.Symbol, modulus: int, lowest: int) -> tuple[int, ...]:
    """The classes ``r`` (mod ``modulus``) for which ``guard`` holds, evaluated at one size >= ``lowest`` of each."""
    start = -(-lowest // modulus) * modulus
    return tuple(value % modulus for value in range(start, start + modulus)
                 if bool(guard.xreplace({symbol: sympy.Integer(value)})))


def combine(classes: dict[str, tuple[int, tuple[int, ...]]], name: str, modulus: int,
            allowed: tuple[int, ...]) -> None:
    """Intersect ``classes[name]`` (modulus, allowed residues) with one more periodic condition, in place."""
    old_modulus, old_allowed = classes.get(name, (1, (0,)))
    joint = math.lcm(old_modulus, modulus)
    classes[name] = (joint, tuple(r for r in range(joint) if r % old_modulus in old_allowed and r % modulus in allowed))
