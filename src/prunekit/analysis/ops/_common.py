"""Helpers shared by the op families: the registering decorator and dim arithmetic."""
from __future__ import annotations

from .registry import Zero, register_many


def rule(*names: str, macs=None, zero: Zero | None = None, structural: bool = False, cost_free: bool = False):
    """Decorator: register the function as the channel rule of each aten op in ``names`` (bare names;
    ``"ns::name"`` for another namespace), with the same MACs formula, zeroing behaviour and flags."""
    def deco(fn):
        register_many(names, fn, macs, zero, structural=structural, cost_free=cost_free)
        return fn
    return deco


def arg(op, i: int, name: str, default=None):
    """Positional argument ``i`` of the call, else keyword ``name``.  Prefer ``op.arg(name)`` (by schema
    name); this stays for reads whose position is shared by several overloads of different schemas."""
    if len(op.args) > i:
        return op.args[i]
    return op.kwargs.get(name, default)


def norm_dim(dim: int, ndim: int) -> int:
    """A possibly negative dim index as an index in ``range(ndim)``."""
    return dim + ndim if dim < 0 else dim


def norm_dims(dims, ndim: int) -> list[int]:
    """A reduction's ``dim`` argument (None, an int, or a list; empty or None = every dim) as indices."""
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    if len(dims) == 0:
        return list(range(ndim))
    return [norm_dim(d, ndim) for d in dims]
