"""Candidate proposals for :class:`~prunekit.AdaptivePruner`: one per group or per block of consecutive groups,
each the smallest cut of its lowest-ranked units that brings the model under the iteration's budget."""
from __future__ import annotations

import json
from typing import Mapping

from torch import nn

from ...surgery import pruned_copy
from ..pruner import _Slot, group_key


def _gkey(g) -> str:
    return json.dumps(group_key(g))


def _group_name(g) -> str:
    mods = g.source or g.modules
    return ",".join(mods[:2]) + (f",+{len(mods) - 2}" if len(mods) > 2 else "")



class CandidateSearch:
    """The candidate part of :class:`~prunekit.AdaptivePruner` (a mixin: uses its model, granularity,
    block_depth, pruner and ``_value``)."""

    def _pruned_copy(self, graph, plan: Mapping[int, list[int]], verify: bool = True) -> nn.Module:
        """A deep copy of the model with ``plan`` removed, reusing the current analysis (same structure)."""
        return pruned_copy(self.model, graph, plan, verify=verify)

    def _units(self, slots: list[_Slot]) -> list[tuple[str, list[_Slot]]]:
        """(name, slots) per candidate: one per group, or one per block of consecutive groups."""
        if self.granularity == "group":
            return [(_group_name(s.group), [s]) for s in slots]
        blocks: list[tuple[str, list[_Slot]]] = []
        for s in slots:
            first = (s.group.source or s.group.modules or [""])[0]
            prefix = ".".join(first.split(".")[:self.block_depth]) or "<root>"
            if blocks and blocks[-1][0] == prefix:
                blocks[-1][1].append(s)
            else:
                blocks.append((prefix, [s]))
        names: dict[str, int] = {}
        out = []
        for name, ss in blocks:
            names[name] = names.get(name, 0) + 1
            out.append((name if names[name] == 1 else f"{name}#{names[name]}", ss))
        return out

    @staticmethod
    def _levels(slot: _Slot) -> list[int]:
        """Kept sizes below the current one, from the smallest cut to the largest (multiples of the step)."""
        return [k for k in range(slot.cur - 1, slot.min_keep - 1, -1) if k % slot.step == 0]

    def _smallest_cut(self, graph, slots: list[_Slot], goal: float) -> dict[int, int] | None:
        """The smallest cut (group id -> kept) of ``slots`` that brings the model to ``goal``, or None."""
        levels = [self._levels(s) for s in slots]
        n = max((len(lv) for lv in levels), default=0)
        if n == 0:
            return None

        def kept(j: int) -> dict[int, int]:  # every group advances in proportion to its number of levels
            res = {}
            for s, lv in zip(slots, levels):
                i = (j * len(lv)) // n
                if i > 0:
                    res[s.group.id] = lv[i - 1]
            return res
        if self._value(graph, kept(n)) > goal:
            return None
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            if self._value(graph, kept(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return kept(lo)

    def _candidates(self, graph, goal: float) -> list[tuple[str, dict[int, int] | None]]:
        return [(name, self._smallest_cut(graph, ss, goal)) for name, ss in self._units(self._pruner._slots())]
