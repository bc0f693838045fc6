"""Latency-budgeted planning (HALP-style): which width every group keeps so that the predicted latency fits.

Each group has a ladder of candidate widths (its current width, then smaller ones: the widths a
``round_to`` step allows, or the measured fast widths of ``round_to="auto"``) and, for each, the importance
lost (the sum of the normalised scores of the units removed, weakest first) and the latency saved (from a
:class:`prunekit.LatencyModel`, given the widths the other groups have at that moment: a layer between two
pruned groups saves by both).  The knapsack is filled greedily: the move with the least importance lost per
millisecond saved (looking a few rungs down the ladder, so that a flat step of the staircase does not hide
the saving of the next one) is taken until the predicted latency is within the budget.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..cost.latency_model import span_of

LOOKAHEAD = 8  # rungs of a group's ladder considered for its next move
MAX_RUNGS = 64  # a group whose step allows more widths is given this many, evenly spread


def ladder(slot: Any) -> list[int]:
    """Candidate kept counts of ``slot`` (descending, starting at its current size)."""
    cur, lo = slot.cur, slot.min_keep
    if getattr(slot, "allowed", None) is not None:
        out = sorted({a for a in slot.allowed if lo <= a <= cur} | {cur}, reverse=True)
        return out
    step = max(1, slot.step)
    n = (cur - lo) // step + 1
    if n <= MAX_RUNGS:
        ks = {slot.round_keep(lo + i * step) for i in range(n)}
    else:
        ks = {slot.round_keep(lo + (cur - lo) * i / (MAX_RUNGS - 1)) for i in range(MAX_RUNGS)}
    return sorted(ks | {cur}, reverse=True)


def solve(lm: Any, graph: Any, slots: Sequence[Any], scores: Mapping[int, torch.Tensor], budget_ms: float,
          criterion: Any = None, *, lookahead: int = LOOKAHEAD, exhaust: bool = False) -> dict[int, int] | None:
    """{group id: kept units} whose predicted latency (``lm``'s whole-model prediction) is within ``budget_ms``;
    if even every slot at its last saving rung is predicted above it: None, or that plan with ``exhaust=True``."""
    layers = lm.layers
    width = {n: list(w) for n, w in lm.widths(graph, {}).items()}
    factor = lm.scale  # the whole-model prediction is scale * (summed layer ms) + offset
    touch: list[list[tuple[str, str, int]]] = []
    for sl in slots:
        t = []
        for m in sl.group.members:
            n = m.fqn[:-len(".weight")] if m.fqn.endswith(".weight") else None
            if n in layers and m.dim in (0, 1):
                kind = "dw" if layers[n].depthwise else ("out" if m.dim == 0 else "in")
                t.append((n, kind, span_of(m)))
        touch.append(t)
    by_layer: dict[str, list[int]] = {}
    for i, t in enumerate(touch):
        for n, _, _ in t:
            by_layer.setdefault(n, []).append(i)

    def norm(sc: torch.Tensor) -> torch.Tensor:
        sc = sc.float()
        if getattr(criterion, "normalize", None) is None and not getattr(criterion, "globally_comparable", False):
            sc = sc / sc.abs().mean().clamp_min(1e-12)
        return sc
    cum = []
    for sl in slots:
        v = torch.sort(norm(scores[sl.group.id])).values.clamp_min(0).double()
        cum.append([0.0] + torch.cumsum(v, 0).tolist())
    rungs = [ladder(sl) for sl in slots]
    pos = [0] * len(slots)
    kept = [sl.cur for sl in slots]
    lay_ms = {n: layers[n].ms(*width[n]) for n in width}
    total = sum(lay_ms.values()) * factor + lm.offset

    def widths_after(i: int, k: int) -> dict[str, list[int]]:
        gone = kept[i] - k
        out: dict[str, list[int]] = {}
        for n, kind, span in touch[i]:
            w = out.setdefault(n, list(width[n]))
            if kind in ("dw", "in"):
                w[0] -= gone * span
            if kind in ("dw", "out"):
                w[1] -= gone * span
        return out

    def best_move(i: int) -> tuple[float, int, dict[str, list[int]]] | None:
        sl = slots[i]
        best = None
        for j in range(pos[i] + 1, min(len(rungs[i]), pos[i] + 1 + lookahead)):
            k = rungs[i][j]
            nw = widths_after(i, k)
            saved = sum(lay_ms[n] - layers[n].ms(*w) for n, w in nw.items()) * factor
            if saved <= 1e-12:
                continue
            lost = cum[i][sl.cur - k] - cum[i][sl.cur - kept[i]]
            ratio = lost / saved
            if best is None or ratio < best[0]:
                best = (ratio, j, nw)
        return best

    def take(nw: dict[str, list[int]]) -> None:
        nonlocal total
        for n, w in nw.items():
            width[n] = w
            new = layers[n].ms(*w)
            total += (new - lay_ms[n]) * factor
            lay_ms[n] = new

    moves = {i: best_move(i) for i in range(len(slots))}
    while total > budget_ms * (1 + 1e-9):
        cand = [(mv[0], i) for i, mv in moves.items() if mv is not None]
        if not cand:
            return {sl.group.id: k for sl, k in zip(slots, kept)} if exhaust else None
        _, i = min(cand)
        _, j, nw = moves[i]
        take(nw)
        pos[i], kept[i] = j, rungs[i][j]
        dirty = {i} | {k for n, _, _ in touch[i] for k in by_layer.get(n, ())}
        for k in dirty:
            moves[k] = best_move(k)
    # the last moves may overshoot (a rung can be large, a flat step of the staircase hides the next one): give
    # rungs back while the budget allows, the most importance regained per ms first, looking a few rungs up
    while True:
        best = None
        for i, sl in enumerate(slots):
            for j in range(pos[i] - 1, max(-1, pos[i] - 1 - lookahead), -1):
                k = rungs[i][j]
                nw = widths_after(i, k)
                cost = sum(layers[n].ms(*w) - lay_ms[n] for n, w in nw.items()) * factor
                if total + cost > budget_ms * (1 + 1e-9):
                    continue
                gain = cum[i][sl.cur - kept[i]] - cum[i][sl.cur - k]
                r = gain / max(cost, 1e-12)
                if best is None or r > best[0]:
                    best = (r, i, j, nw)
        if best is None:
            break
        _, i, j, nw = best
        take(nw)
        pos[i], kept[i] = j, rungs[i][j]
    return {sl.group.id: k for sl, k in zip(slots, kept)}


__all__ = ["ladder", "solve"]
