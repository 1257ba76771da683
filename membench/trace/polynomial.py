"""Size expressions in the workload's symbols, evaluated for many events at once.

Almost every size is a polynomial with integer coefficients in (B, S, T, R): those become rows of
an integer coefficient matrix over a shared monomial basis, so evaluating all of them for one
workload is one integer matrix-vector product (exact in int64 far beyond any GPU's memory).
Anything else (``FloorDiv``, ``CeilToInt`` from padded kernels, rational coefficients) is kept
as a sympy expression and substituted exactly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import sympy

#: Coefficients kept in the int64 matrix (anything larger stays a sympy expression).
_LIMIT = 1 << 62


class Polynomials:
    """A table of distinct size expressions over the symbols ``names``; ``add`` returns an index."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._index: dict[sympy.Expr, int] = {}
        self.expressions: list[sympy.Expr] = []
        self.monomials: list[tuple[int, ...]] = []
        self.coefficients: Optional[np.ndarray] = None  # (expressions, monomials), int64
        self.other: dict[int, sympy.Expr] = {}  # index -> a non-polynomial expression

    def add(self, expr: sympy.Expr) -> int:
        index = self._index.get(expr)
        if index is None:
            index = self._index[expr] = len(self.expressions)
            self.expressions.append(expr)
        return index

    def freeze(self) -> "Polynomials":
        """Build the coefficient matrix; after this the table is read-only and picklable."""
        symbols = [sympy.Symbol(name, integer=True, positive=True) for name in self.names]
        rows: list[dict[tuple[int, ...], int]] = []
        basis: dict[tuple[int, ...], int] = {}
        for index, expr in enumerate(self.expressions):
            terms = _integer_terms(expr, symbols)
            if terms is None:
                self.other[index] = expr
                terms = {}
            for monomial in terms:
                basis.setdefault(monomial, len(basis))
            rows.append(terms)
        self.monomials = list(basis)
        matrix = np.zeros((len(rows), len(basis)), dtype=np.int64)
        for row, terms in enumerate(rows):
            for monomial, coefficient in terms.items():
                matrix[row, basis[monomial]] = coefficient
        self.coefficients = matrix
        self._index = {}
        return self

    def strings(self) -> list[str]:
        """Every expression as text (for reports and debugging)."""
        return [str(expr) for expr in self.expressions]

    def evaluate(self, values: tuple[int, ...]) -> np.ndarray:
        """Every expression's value at ``values`` (one per name), as int64."""
        # Python ints (object arrays): exact whatever the sizes; a few hundred rows, microseconds.
        powers = np.array([_power(monomial, values) for monomial in self.monomials], dtype=object)
        exact = self.coefficients.astype(object) @ powers if self.monomials else \
            np.zeros(len(self.expressions), dtype=object)
        result = np.array(exact, dtype=np.int64)  # raises OverflowError past int64
        if self.other:
            symbols = {sympy.Symbol(name, integer=True, positive=True): value
                       for name, value in zip(self.names, values)}
            for index, expr in self.other.items():
                result[index] = int(expr.xreplace(symbols))
        return result


def _power(monomial: tuple[int, ...], values: tuple[int, ...]) -> int:
    product = 1
    for exponent, value in zip(monomial, values):
        product *= int(value) ** exponent
    return product


def _integer_terms(expr: sympy.Expr, symbols: list[sympy.Symbol]) -> Optional[dict[tuple[int, ...], int]]:
    """{exponents: integer coefficient} of ``expr`` as a polynomial in ``symbols``; None if it is not one."""
    if not expr.free_symbols <= set(symbols):
        raise ValueError(f"size {expr} has symbols other than {symbols}")
    try:
        poly = sympy.Poly(sympy.expand(expr), *symbols)
    except sympy.PolynomialError:
        return None
    terms = {}
    for monomial, coefficient in poly.terms():
        if not coefficient.is_Integer:
            return None
        if abs(int(coefficient)) >= _LIMIT:
            return None
        terms[tuple(int(e) for e in monomial)] = int(coefficient)
    return terms
