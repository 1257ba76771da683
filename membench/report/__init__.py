"""Results → tables, figures and a verdict: ``membench-report`` (see :mod:`membench.report.cli`).

Every function here takes the DataFrame built by :func:`membench.report.load.load_results`,
one row per result file, bytes as integers.
"""

from membench.report.load import load_results

__all__ = ["load_results"]
