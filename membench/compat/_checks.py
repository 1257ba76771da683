"""What every compat entry shares: the error it raises and the checks that raise it."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from typing import Any, Callable, Optional

import torch


class CompatError(RuntimeError):
    """An installed package no longer has what membench patches or reaches into."""


def installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def incompatible(distribution: str, found: str, need: str) -> CompatError:
    """E.g. "transformers 5.23.0 has no X(a); membench needs it to ..."."""
    return CompatError(f"{distribution} {installed_version(distribution)} {found}; membench needs it {need}")


def parameter_names(function: Callable) -> Optional[list[str]]:
    """A callable's parameter names; for a builtin, those in the head of its docstring ("f(a, b=1) -> T")."""
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        head = re.match(r"\s*\w+\(([^)]*)\)", function.__doc__ or "")
        if head is None:
            return None
        return [part.split("=")[0].strip() for part in head.group(1).split(",") if part.strip() not in ("", "*", "/")]


def require(distribution: str, owner: Any, path: str, parameters: list[str], need: str,
            exact: bool = True) -> Callable:
    """``owner.<last part of path>``, checked to take ``parameters`` (as its first ones unless ``exact``)."""
    target = getattr(owner, path.rsplit(".", 1)[-1], None)
    wanted = f"{path}({', '.join(parameters)})"
    if not callable(target):
        raise incompatible(distribution, f"has no {wanted}", need)
    names = parameter_names(target)
    if names is None or (names != parameters if exact else names[:len(parameters)] != parameters):
        found = "an unknown signature" if names is None else f"({', '.join(names)})"
        raise incompatible(distribution, f"has {path} with {found}, not {wanted}", need)
    return target


def require_op(name: str, arguments: list[str], need: str) -> None:
    """``torch.ops.aten.<name>.default``, checked to take ``arguments`` in this order."""
    overload = getattr(getattr(torch.ops.aten, name, None), "default", None)
    wanted = f"aten.{name}({', '.join(arguments)})"
    if overload is None:
        raise incompatible("torch", f"has no op {wanted}", need)
    names = [argument.name for argument in overload._schema.arguments]
    if names != arguments:
        raise incompatible("torch", f"has aten.{name}({', '.join(names)}), not {wanted}", need)
