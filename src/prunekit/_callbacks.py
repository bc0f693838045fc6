"""Calling user callbacks with the arguments they accept: one helper for every callback of the library.

The library knows what it can pass to a callback (say ``model, iteration, candidate`` for
``AdaptivePruner``'s ``finetune_fn``); a user's function takes what it needs::

    def ft(model): ...                          # ft(model)
    def ft(model, steps=30): ...                # ft(model): the default of ``steps`` is kept
    def ft(model, iteration): ...               # ft(model, iteration)
    def ft(model, iteration, candidate): ...    # everything
    def ft(model, candidate): ...               # by name: ft(model, candidate=candidate)
    def ft(model, **kw): ...                    # ft(model, iteration=..., candidate=...)
    def ft(*args): ...                          # ft(model, iteration, candidate)

The rules, applied once when the callback is given (:func:`callback`): a parameter named like one of
the offered arguments gets that argument; the other positional parameters without a default get the
offered arguments not yet given, in order; ``**kwargs`` gets every argument not yet given, by name; ``*args`` gets
all of them positionally.  Parameters with a default are otherwise left alone (a user's ``steps=30`` is
never overwritten by the iteration number).  The required leading arguments (the model) must be taken, and
a parameter that would stay without a value is an error naming the callback and the signatures it may have.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

__all__ = ["Callback", "callback"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class Callback:
    """A user callable and how to call it with the offered arguments (picklable when ``fn`` is).

    ``cb(*values)`` takes the values of the offered arguments in the order they were declared and calls
    ``fn`` with the ones it accepts.
    """

    __slots__ = ("fn", "name", "offered", "_args", "_kwargs")

    def __init__(self, fn: Callable, name: str, offered: Sequence[str], args: Sequence[int],
                 kwargs: Sequence[tuple[str, int]]):
        self.fn, self.name, self.offered = fn, name, tuple(offered)
        self._args, self._kwargs = tuple(args), tuple(kwargs)  # indices into the offered values

    def __call__(self, *values: Any) -> Any:
        if len(values) != len(self.offered):
            raise TypeError(f"internal: {self.name} is called with {len(self.offered)} value(s) "
                            f"({', '.join(self.offered)}), got {len(values)}")
        return self.fn(*(values[i] for i in self._args), **{k: values[i] for k, i in self._kwargs})

    def passes(self) -> tuple[str, ...]:
        """The offered arguments the callback receives (for messages and tests)."""
        return tuple(self.offered[i] for i in self._args) + tuple(self.offered[i] for _, i in self._kwargs)

    def __getstate__(self):
        return (self.fn, self.name, self.offered, self._args, self._kwargs)

    def __setstate__(self, state):
        self.fn, self.name, self.offered, self._args, self._kwargs = state

    def __repr__(self) -> str:
        return f"Callback({self.name}={self.fn!r} <- {', '.join(self.passes()) or 'nothing'})"


def _describe(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def callback(fn: Callable | None, name: str, owner: str, offered: Sequence[str], *, required: int = 1,
             accepted: Sequence[str] = (), positional: bool = False) -> Callback | None:
    """Check ``fn`` once and return a :class:`Callback` that calls it with what it accepts (``None`` stays ``None``).

    Args:
        fn: the user's callable (or ``None``).
        name, owner: the argument's name and the class/function that takes it, for error messages.
        offered: the names of the arguments the library passes, in order (e.g. ``("model", "iteration")``).
        required: how many leading offered arguments the callback must take (the model: 1).
        accepted: signatures to list in the error message (default: built from ``offered``).
        positional: the library calls ``fn`` itself, positionally with all offered arguments (the
            callback is only checked): ``fn(*offered)`` must bind.

    Raises:
        TypeError: ``fn`` is not callable, or cannot be called with (a leading part of) the offered arguments.
    """
    if fn is None:
        return None
    offered = tuple(offered)
    if not accepted:
        accepted = [f"{name}({', '.join(offered[:k])})" for k in range(max(required, 1), len(offered) + 1)]
        accepted.append(f"{name}({', '.join(offered[:required])}{', ' if required else ''}**kwargs)")
    hint = ("Accepted signatures: " + ", ".join(accepted) +
            "; further parameters need a default, and parameters named like the offered arguments receive them.")
    if not callable(fn):
        raise TypeError(f"{owner}: {name} must be callable, got {type(fn).__name__}. {hint}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and extension callables have no signature: call as before
        return Callback(fn, name, offered, range(len(offered)), ())

    def fail(why: str) -> TypeError:
        return TypeError(f"{owner}: {name}={_describe(fn)}{sig} cannot be called with ({', '.join(offered)}): "
                         f"{why}. {hint}")

    if positional:
        try:
            sig.bind(*offered)
        except TypeError as e:
            raise fail(str(e)) from None
        return Callback(fn, name, offered, range(len(offered)), ())

    params = list(sig.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        try:  # f(*args), f(model, *rest): everything positionally, as the library always did
            sig.bind(*offered)
            return Callback(fn, name, offered, range(len(offered)), ())
        except TypeError:
            pass
    bound: dict[str, int] = {}  # parameter name -> offered index
    used: set[int] = set()
    for p in params:  # 1. parameters named like an offered argument
        if p.kind in (*_POSITIONAL, p.KEYWORD_ONLY) and p.name in offered:
            bound[p.name] = offered.index(p.name)
            used.add(bound[p.name])
    rest = iter(i for i in range(len(offered)) if i not in used)
    for p in params:  # 2. other positional parameters without a default: the remaining offered arguments, in order
        if p.name in bound or p.default is not p.empty or p.kind not in (*_POSITIONAL, p.KEYWORD_ONLY):
            continue
        if p.kind == p.KEYWORD_ONLY:
            raise fail(f"keyword-only parameter {p.name!r} has no default and is not one of the offered names")
        i = next(rest, None)
        if i is None:
            raise fail(f"parameter {p.name!r} has no default and nothing is left to pass to it")
        bound[p.name] = i
        used.add(i)
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    names = {p.name for p in params}
    extra = [(offered[i], i) for i in range(len(offered)) if i not in used and offered[i] not in names] if var_kw else []
    missing = [offered[i] for i in range(required) if i not in used and (offered[i], i) not in extra]
    if missing:
        raise fail(f"it does not take {' and '.join(missing)}")
    # positional for the leading positional parameters that have a value, by keyword from the first gap on
    args: list[int] = []
    kwargs: list[tuple[str, int]] = []
    gap = False
    for p in params:
        if p.name not in bound:
            gap = gap or p.kind in _POSITIONAL
            continue
        if p.kind in _POSITIONAL and not gap:
            args.append(bound[p.name])
        elif p.kind == p.POSITIONAL_ONLY:
            raise fail(f"positional-only parameter {p.name!r} comes after one that gets no value")
        else:
            kwargs.append((p.name, bound[p.name]))
    kwargs += extra
    return Callback(fn, name, offered, args, kwargs)
