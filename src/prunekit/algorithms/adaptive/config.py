"""Settings checks of :class:`~prunekit.AdaptivePruner`: the budget (a Target, or the deprecated
``(kind, ratio)`` tuple) and the range of every search setting, each error naming the setting and its range."""
from __future__ import annotations

from typing import Any, Sequence

from ...plan.targets import FlopsTarget, LatencyTarget, ParamsTarget, Target

_KINDS = {"flops": FlopsTarget, "params": ParamsTarget, "latency": LatencyTarget}


def parse_budget(budget: Any) -> tuple[str, float]:
    """``(kind, ratio kept)`` of a FLOPs / params / latency Target or a ``(kind, ratio)`` tuple."""
    if isinstance(budget, (FlopsTarget, ParamsTarget, LatencyTarget)):
        return budget.kind, float(budget.ratio)
    if isinstance(budget, Target) or (isinstance(budget, (int, float)) and not isinstance(budget, bool)):
        raise TypeError(f"AdaptivePruner prunes to a FLOPs, parameter or latency budget: pass "
                        f"target=pk.FlopsTarget(r), pk.ParamsTarget(r) or pk.LatencyTarget(r), got {budget!r}")
    if not (isinstance(budget, (tuple, list)) and len(budget) == 2 and budget[0] in _KINDS):
        raise ValueError(f"budget must be (kind, ratio_kept) with kind one of {sorted(_KINDS)}, e.g. "
                         f"('flops', 0.5), got {budget!r}")
    try:
        r = float(budget[1])
    except (TypeError, ValueError):
        raise ValueError(f"budget ratio must be a number in (0, 1], got {budget[1]!r}") from None
    if not 0.0 < r <= 1.0:
        raise ValueError(f"budget ratio is the fraction KEPT and must be in (0, 1], got {r}")
    return budget[0], r


def check_settings(*, delta_crop: float, delta_decay: float, granularity: str, block_depth: int, workers: int,
                   latency_grid: Sequence[float]) -> list[float]:
    """Raise ``ValueError`` for an out-of-range search setting; returns the latency grid (kept fractions,
    descending, with 1.0)."""
    if not 0.0 < float(delta_crop) < 1.0:
        raise ValueError(f"delta_crop is the fraction of the original budget removed per iteration and must be "
                         f"in (0, 1), got {delta_crop!r}")
    if not 0.0 < float(delta_decay) <= 1.0:
        raise ValueError(f"delta_decay must be in (0, 1] (1 = constant steps), got {delta_decay!r}")
    if granularity not in ("group", "block"):
        raise ValueError(f"granularity must be 'group' or 'block', got {granularity!r}")
    if not isinstance(block_depth, int) or block_depth < 1:
        raise ValueError(f"block_depth must be a positive integer, got {block_depth!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    grid = sorted({float(f) for f in latency_grid} | {1.0}, reverse=True)
    if any(not 0.0 < f <= 1.0 for f in grid):
        raise ValueError(f"latency_grid holds kept fractions in (0, 1], got {list(latency_grid)}")
    return grid
