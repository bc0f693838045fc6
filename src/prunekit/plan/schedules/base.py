"""Pruning schedules: how the final sparsity is reached over several pruning steps.

A schedule turns ``(final, steps)`` into the *cumulative* sparsity after each step,
``[s_1, ..., s_n]`` with ``s_n == final``, never decreasing.  Sparsities are fractions of the target's
quantity (channels, FLOPs, parameters or latency) removed **relative to the original model**, which is
what :meth:`prunekit.Pruner.step` takes.  Steps are numbered ``t = 1 .. n``; ``t = 0`` is the model before
the first step.

==================  ==========================================================================
``OneShot``         one step straight to ``final``
``Linear``          ``s_t = final * t / n``
``AGP``             ``s_t = final + (initial - final) * (1 - t / n) ** 3`` (Zhu & Gupta, 2017)
``LotteryTicket``   every round removes ``1 - (1 - final) ** (1 / n)`` of what remains:
                    ``s_t = 1 - (1 - final) ** (t / n)`` (plus weight rewinding, see the class)
``Geometric``       the increments ``s_t - s_(t-1)`` form a geometric progression with ratio
                    ``factor``: ``s_t = final * (1 - factor ** t) / (1 - factor ** n)``
==================  ==========================================================================
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["AGP", "Geometric", "Linear", "LotteryTicket", "OneShot", "SCHEDULES", "Schedule", "get_schedule"]


def _check_steps(steps: Any, where: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}: steps must be a positive integer (the number of pruning steps), got {steps!r}")
    return steps


def _check_fraction(value: Any, what: str, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= v < 1.0:  # also rejects NaN
        raise ValueError(f"{where}: {what} must be in [0, 1) (a fraction removed; 1 would remove everything), "
                         f"got {value!r}")
    return v


class Schedule:
    """Base class.  Subclasses implement :meth:`_curve`; :meth:`sparsities` validates and tidies.

    ``steps`` given to the constructor is the default number of steps (used by
    :func:`prunekit.prune_iteratively` when it gets no ``steps``).
    """

    name = "schedule"

    def __init__(self, steps: int | None = None):
        self.steps = None if steps is None else _check_steps(steps, type(self).__name__)

    def _curve(self, final: float, steps: int) -> list[float]:
        raise NotImplementedError

    def sparsities(self, final: float, steps: int | None = None) -> list[float]:
        """Cumulative sparsity after each step ``t = 1 .. steps``: non-decreasing, in ``[0, final]``,
        the last one exactly ``final``.  ``steps`` defaults to the one given to the constructor."""
        where = f"{type(self).__name__}.sparsities"
        final = _check_fraction(final, "final sparsity", where)
        if steps is None:
            if self.steps is None:
                raise ValueError(f"{where}: no number of steps: pass steps=... here or to the constructor, "
                                 f"e.g. {type(self).__name__}(steps=5)")
            steps = self.steps
        steps = _check_steps(steps, where)
        out, prev = [], 0.0
        for v in self._curve(final, steps):
            prev = min(final, max(prev, float(v)))  # clamp float noise: monotone and never past final
            out.append(prev)
        out[-1] = final
        return out

    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able); ``type(self)(**params())`` rebuilds the schedule."""
        return {"steps": self.steps}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params() == self.params()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.params().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class OneShot(Schedule):
    """Prune to ``final`` in a single step, whatever ``steps`` says."""

    name = "oneshot"

    def __init__(self) -> None:
        super().__init__(1)

    def sparsities(self, final: float, steps: int | None = None) -> list[float]:
        if steps is not None:
            _check_steps(steps, "OneShot.sparsities")
        return super().sparsities(final, 1)

    def _curve(self, final: float, steps: int) -> list[float]:
        return [final]

    def params(self) -> dict[str, Any]:
        return {}


class Linear(Schedule):
    """Equal increments: ``s_t = final * t / n``."""

    name = "linear"

    def _curve(self, final: float, steps: int) -> list[float]:
        return [final * t / steps for t in range(1, steps + 1)]


class AGP(Schedule):
    """Automated gradual pruning (Zhu & Gupta, 2017): ``s_t = final + (initial - final) * (1 - t/n) ** 3``.

    Large cuts first, while the model still has redundancy, then ever smaller ones.  ``initial`` is the
    curve's value at ``t = 0`` (the start, not a step of its own); it must not exceed the final sparsity.
    """

    name = "agp"

    def __init__(self, steps: int | None = None, initial: float = 0.0):
        super().__init__(steps)
        self.initial = _check_fraction(initial, "initial sparsity", "AGP")

    def at(self, t: float, final: float, steps: int) -> float:
        """The curve at step ``t`` (``0 <= t <= steps``), e.g. ``at(0, ...) == initial``."""
        steps = _check_steps(steps, "AGP.at")
        if not 0 <= t <= steps:
            raise ValueError(f"AGP.at: t must be in [0, {steps}], got {t!r}")
        return final + (self.initial - final) * (1.0 - t / steps) ** 3

    def _curve(self, final: float, steps: int) -> list[float]:
        if self.initial > final:
            raise ValueError(f"AGP: initial sparsity {self.initial} is larger than the final sparsity {final}; "
                             "pass initial <= final (default 0)")
        return [self.at(t, final, steps) for t in range(1, steps + 1)]

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "initial": self.initial}


class LotteryTicket(Schedule):
    """Iterative pruning with weight rewinding (Frankle & Carbin, 2019).

    Every round removes the same fraction ``1 - (1 - final) ** (1 / n)`` of what REMAINS, so the cumulative
    sparsity after round ``t`` is ``1 - (1 - final) ** (t / n)``.

    ``rewind`` (used by :func:`prunekit.prune_iteratively`, after each pruning step, before fine-tuning):

    * ``"init"`` (default): the surviving weights (and buffers) are reset to the values the model had when
      ``prune_iteratively`` started (or to its ``rewind_state``), sliced to the pruned shapes.
    * ``"early"``: reset to the weights the model had right after ``finetune_fn`` returned at step
      ``rewind_step`` (default 1; "late resetting", Frankle et al. 2019).  Steps up to ``rewind_step`` are
      not rewound (there is nothing to rewind to yet).
    * ``None``: no rewinding (plain iterative pruning with this schedule).
    """

    name = "lottery"
    REWIND = ("init", "early", None)

    def __init__(self, steps: int | None = None, rewind: str | None = "init", rewind_step: int = 1):
        super().__init__(steps)
        if rewind not in self.REWIND:
            raise ValueError(f"LotteryTicket: rewind must be 'init', 'early' or None, got {rewind!r}")
        if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 1:
            raise ValueError(f"LotteryTicket: rewind_step must be a positive integer (the step after whose "
                             f"fine-tuning the weights are saved), got {rewind_step!r}")
        if rewind != "early" and rewind_step != 1:
            raise ValueError(f"LotteryTicket: rewind_step={rewind_step} only applies to rewind='early' "
                             f"(got rewind={rewind!r})")
        self.rewind = rewind
        self.rewind_step = rewind_step

    @staticmethod
    def per_round(final: float, steps: int) -> float:
        """Fraction of the remaining quantity each round removes: ``1 - (1 - final) ** (1 / steps)``."""
        final = _check_fraction(final, "final sparsity", "LotteryTicket.per_round")
        return 1.0 - (1.0 - final) ** (1.0 / _check_steps(steps, "LotteryTicket.per_round"))

    def _curve(self, final: float, steps: int) -> list[float]:
        return [1.0 - (1.0 - final) ** (t / steps) for t in range(1, steps + 1)]

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "rewind": self.rewind, "rewind_step": self.rewind_step}


class Geometric(Schedule):
    """Increments in geometric progression: step ``t`` removes ``factor`` times what step ``t - 1`` removed.

    ``s_t = final * (1 - factor ** t) / (1 - factor ** n)`` (``factor == 1`` is :class:`Linear`).
    ``factor < 1`` front-loads the pruning (e.g. 0.5: each step removes half as much of the original
    quantity as the one before), ``factor > 1`` back-loads it.

    Unlike :class:`LotteryTicket`, whose ratio is fixed by the target (``(1 - final) ** (1 / n)``, i.e. a
    constant fraction of the remainder per round), the ratio here is a free parameter, independent of
    ``final`` and ``n``.  ``Geometric(factor=(1 - final) ** (1 / n))`` reproduces the lottery schedule.
    """

    name = "geometric"

    def __init__(self, steps: int | None = None, factor: float = 0.5):
        super().__init__(steps)
        try:
            f = float(factor)
        except (TypeError, ValueError):
            raise ValueError(f"Geometric: factor must be a positive number, got {factor!r}") from None
        if not (f > 0.0 and math.isfinite(f)):
            raise ValueError(f"Geometric: factor must be a positive finite number (ratio between consecutive "
                             f"increments; < 1 prunes most early, > 1 most late), got {factor!r}")
        self.factor = f

    def _curve(self, final: float, steps: int) -> list[float]:
        q = self.factor
        if abs(q - 1.0) < 1e-12:
            return [final * t / steps for t in range(1, steps + 1)]
        return [final * (1.0 - q ** t) / (1.0 - q ** steps) for t in range(1, steps + 1)]

    def params(self) -> dict[str, Any]:
        return {"steps": self.steps, "factor": self.factor}


SCHEDULES: dict[str, type[Schedule]] = {c.name: c for c in (OneShot, Linear, AGP, LotteryTicket, Geometric)}
_ALIASES = {"one_shot": "oneshot", "lottery_ticket": "lottery", "lotteryticket": "lottery", "lth": "lottery"}


def get_schedule(name: str | Schedule, **kwargs: Any) -> Schedule:
    """A schedule by name (``"oneshot"``, ``"linear"``, ``"agp"``, ``"lottery"``, ``"geometric"``; case and
    ``-``/``_`` do not matter) built with ``kwargs``; a :class:`Schedule` instance is returned as is."""
    if isinstance(name, Schedule):
        if kwargs:
            raise ValueError(f"get_schedule: got a schedule instance {name!r} and extra arguments {sorted(kwargs)}; "
                             "pass either a name with arguments or an instance")
        return name
    if not isinstance(name, str):
        raise TypeError(f"get_schedule: expected a schedule name or a Schedule, got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[key](**kwargs)
    except TypeError as e:
        raise TypeError(f"get_schedule({name!r}): {e}") from None
