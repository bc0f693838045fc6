"""Pruning targets: what "pruned enough" means.

Conventions (also used by the CLI):

* ``ChannelRatio(r)``: remove the fraction ``r`` of the units of every group (local) or of all units
  (global) - the ``pruning_ratio`` of Torch-Pruning, ``--ratio`` in the CLI.  A bare float is a channel ratio.
* ``FlopsTarget(r)`` / ``ParamsTarget(r)`` / ``LatencyTarget(r)``: the pruned model KEEPS the fraction ``r``
  of the original FLOPs / parameters / measured latency (``--flops-target 0.5`` halves the FLOPs).

Every target exposes ``sparsity``: the fraction of its quantity that is removed at the end (``r`` for a
channel ratio, ``1 - r`` for the others).  Schedules produce intermediate sparsities between 0 and that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _check_ratio(name: str, r: float, allow_one: bool) -> float:
    """``r`` as a float, or one ValueError naming the target, what its ratio means, the valid range and ``r``:
    a channel ratio (fraction removed) is in [0, 1), a FLOPs/params/latency ratio (fraction kept) in (0, 1]."""
    kept = {"FlopsTarget": "FLOPs", "ParamsTarget": "parameters", "LatencyTarget": "latency"}.get(name, "quantity")
    meaning, rng = (f"the fraction of the {kept} KEPT", "(0, 1]") if allow_one else \
        ("the fraction of units removed", "[0, 1)")
    try:
        v = float(r)
    except (TypeError, ValueError):
        v = None
    if v is None or isinstance(r, bool) or not (0.0 < v <= 1.0 if allow_one else 0.0 <= v < 1.0):
        raise ValueError(f"{name}: ratio ({meaning}) must be in {rng}, got {r!r}")
    return v


class Target:
    """Base class; ``kind`` is "channels", "flops", "params" or "latency"."""

    kind = "channels"
    ratio: float

    @property
    def sparsity(self) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class ChannelRatio(Target):
    """Remove ``ratio`` of the units (per group when local, of all eligible units when global)."""

    ratio: float
    kind = "channels"

    def __post_init__(self):
        object.__setattr__(self, "ratio", _check_ratio("ChannelRatio", self.ratio, allow_one=False))

    @property
    def sparsity(self) -> float:
        return self.ratio


@dataclass(frozen=True)
class _KeepTarget(Target):
    ratio: float

    def __post_init__(self):
        object.__setattr__(self, "ratio", _check_ratio(type(self).__name__, self.ratio, allow_one=True))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.ratio


@dataclass(frozen=True)
class FlopsTarget(_KeepTarget):
    """Keep ``ratio`` of the original FLOPs (met within one ``round_to`` step, computed, not measured)."""

    kind = "flops"


@dataclass(frozen=True)
class ParamsTarget(_KeepTarget):
    """Keep ``ratio`` of the original number of parameters."""

    kind = "params"


@dataclass(frozen=True)
class LatencyTarget(_KeepTarget):
    """Keep ``ratio`` of the original latency, measured on ``device`` with ``backend`` ("eager", "compile",
    "onnxruntime") at ``batch_size`` (None: the example inputs' batch) with ``threads`` CPU threads.

    ``method="knapsack"`` (the default): :class:`prunekit.Pruner` builds a :class:`prunekit.LatencyModel` of the
    device (per-layer latency as a function of the kept widths, measured and cached), ranks units by importance
    per millisecond saved and fills the budget greedily over groups (HALP-style), then checks the whole pruned
    model's measured latency and corrects the budget (a few measured rounds).  ``method="search"``: the former
    behaviour, a monotone search of the whole pruned model's measured latency (``pk.latency``) over the
    pruner's one knob (the local ratio or the global ranking prefix)."""

    device: str = "cpu"
    threads: int | None = None
    repeats: int = 10
    backend: str = "eager"
    batch_size: int | None = None
    method: str = "knapsack"
    kind = "latency"

    def __post_init__(self):
        super().__post_init__()
        if self.backend not in ("eager", "compile", "onnxruntime"):
            raise ValueError(f"LatencyTarget: backend must be 'eager', 'compile' or 'onnxruntime', got {self.backend!r}")
        if self.method not in ("knapsack", "search"):
            raise ValueError(f"LatencyTarget: method must be 'knapsack' (latency model + knapsack over groups) or "
                             f"'search' (whole-model measurement in a search), got {self.method!r}")


def as_target(t: Any) -> Target:
    """A float means a channel ratio; ``("flops", 0.5)`` style tuples and targets pass through."""
    if isinstance(t, Target):
        return t
    if isinstance(t, bool):
        raise TypeError("target must be a float channel ratio or a Target (ChannelRatio, FlopsTarget, ...)")
    if isinstance(t, (int, float)):
        return ChannelRatio(float(t))
    if isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], str):
        kinds = {"channels": ChannelRatio, "ratio": ChannelRatio, "flops": FlopsTarget, "params": ParamsTarget,
                 "latency": LatencyTarget}
        if t[0] not in kinds:
            raise ValueError(f"unknown target kind {t[0]!r}; use one of {sorted(kinds)}")
        return kinds[t[0]](t[1])
    raise TypeError(f"target must be a float channel ratio or a Target (ChannelRatio, FlopsTarget, ParamsTarget, "
                    f"LatencyTarget), got {type(t).__name__}")


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` (an argument, config key or class spelling) is deprecated in favour of ``new``."""
    import warnings
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)


def keep_target(t: Any, owner: str, kinds: tuple[str, ...] = ("flops", "params", "latency")) -> Target:
    """``t`` as a Target of one of ``kinds`` (a bare float is NOT accepted here: the caller decides what an
    old float spelling meant); a Target of another kind raises a TypeError naming what ``owner`` supports."""
    if isinstance(t, (tuple, list)) and len(t) == 2 and isinstance(t[0], str):
        t = as_target(t)
    if not isinstance(t, Target):
        raise TypeError(f"{owner}: target must be a Target ({_names(kinds)}), got {type(t).__name__} {t!r}")
    if t.kind not in kinds:
        raise TypeError(f"{owner} does not support {type(t).__name__} targets; use {_names(kinds)}")
    return t


def _names(kinds: tuple[str, ...]) -> str:
    n = {"channels": "ChannelRatio", "flops": "FlopsTarget", "params": "ParamsTarget", "latency": "LatencyTarget"}
    return ", ".join(f"pk.{n[k]}(...)" for k in kinds)
