"""The cost of an analysed model: MACs/FLOPs and parameter counts, for a plan or as polynomials in the kept units.

:class:`GraphCost` is built by :func:`prunekit.analyze` from the tape, the channel layouts and the groups; the
``PruneGraph`` methods ``macs``/``flops``/``macs_kept``/``flops_kept``/``params_kept``/``prunable_proportion``
delegate to it.  Every formula comes from the op registry's MACs table (:mod:`prunekit.cost.flops`)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from ..analysis import spaces as C
from ..analysis.analyzer import Analyzer, Group
from ..capture import Tape
from .flops import MACS, CompiledPoly, Poly, op_macs


class GraphCost:
    """MACs and parameters of one analysed model, as functions of a plan (units dropped per group) or of the
    units each group keeps (polynomials compiled once, microseconds per call, differentiable in tensors)."""

    def __init__(self, tape: Tape, analyzer: Analyzer, groups: Sequence[Group], leaf_to_group: Mapping[int, Group]):
        self.tape = tape
        self.analyzer = analyzer
        self.groups = groups
        self._leaf_to_group = leaf_to_group
        self._macs_poly: CompiledPoly | None = None
        self._params_poly: CompiledPoly | None = None

    def group(self, gid: int) -> Group:
        if not isinstance(gid, int) or gid < 0 or gid >= len(self.groups):
            raise KeyError(f"no group with id {gid!r}: valid ids are 0..{len(self.groups) - 1}")
        return self.groups[gid]

    def drops_by_leaf(self, plan: Mapping[int, Iterable[int]] | None) -> dict[int, int]:
        """{leaf space id: number of units removed} for a plan (or counts)."""
        res: dict[int, int] = {}
        for gid, units in (plan or {}).items():
            g = self.group(gid)
            n = units if isinstance(units, int) else len(set(int(u) for u in units))
            res[g.leaf_id] = n
        return res

    def dim_size(self, nid: int, d: int, drops: dict[int, int] | None = None) -> int:
        lay = self.analyzer.layouts[nid][d] if self.analyzer.layouts[nid] is not None else None
        if lay is None or not drops:
            return self.tape.nodes[nid].shape[d]
        return C.kept_size(lay, drops)

    def macs(self, plan: Mapping[int, Any] | None = None) -> int:
        """Multiply-accumulates of one forward on the example input, optionally after a plan.

        ``plan`` maps group id -> units to drop (an iterable) or a number of units to drop.
        """
        drops = self.drops_by_leaf(plan) if plan else None
        shape = lambda r: self.tape.nodes[r.id].shape  # noqa: E731
        size = lambda r, d: self.dim_size(r.id, d, drops)  # noqa: E731
        return sum(op_macs(op, size, shape) for op in self.tape.ops)

    def flops(self, plan: Mapping[int, Any] | None = None) -> int:
        """FLOPs (= 2 x MACs, the ``torch.utils.flop_counter`` convention)."""
        return 2 * self.macs(plan)

    # ------------------------------------------------------------------ MACs / params as functions of kept units
    def macs_kept(self, kept: Mapping[int, Any] | None = None):
        """MACs of one forward as a function of how many units each group KEEPS.

        ``kept`` maps group id -> number of units kept: an int (exact: equals
        ``self.macs({gid: group.size - kept})``), a float, or a 0-dim ``torch.Tensor`` (the result
        is then a tensor and differentiable with respect to it -- the FLOPs loss of learned
        pruning).  Groups not in ``kept`` keep all their units.  MACs are a polynomial in the kept
        counts, built once from the FLOPs table and cached, so a call costs microseconds.
        """
        poly = self._macs_poly
        if poly is None:
            poly = self._compile_kept(self._macs_polynomial())
            self._macs_poly = poly
        return poly(self._check_kept(kept))

    def flops_kept(self, kept: Mapping[int, Any] | None = None):
        """FLOPs (= 2 x :meth:`macs_kept`) as a function of the kept units per group."""
        return 2 * self.macs_kept(kept)

    def params_kept(self, kept: Mapping[int, Any] | None = None):
        """Parameter count (tied parameters once) as a function of the kept units per group.

        Same ``kept`` convention as :meth:`macs_kept`; each parameter's numel is the product of its
        dims' kept sizes.
        """
        poly = self._params_poly
        if poly is None:
            total = 0
            for nd in self.tape.nodes:
                if nd.kind == "param":
                    total = total + math.prod((self._dim_poly(nd.id, d) for d in range(len(nd.shape))), start=1)
            poly = self._compile_kept(total)
            self._params_poly = poly
        return poly(self._check_kept(kept))

    def _macs_polynomial(self):
        shape = lambda r: self.tape.nodes[r.id].shape  # noqa: E731
        size = lambda r, d: self._dim_poly(r.id, d)  # noqa: E731
        total = 0
        for op in self.tape.ops:
            fn = MACS.get(op.packet)
            if fn is not None:
                total = total + fn(op, size, shape)
        return total

    def _dim_poly(self, nid: int, d: int):
        """A dim's size as a polynomial in the kept units of groups (an int where no group reaches it)."""
        lays = self.analyzer.layouts[nid]
        lay = lays[d] if lays is not None else None
        if lay is None:
            return self.tape.nodes[nid].shape[d]

        def leaf(s):
            g = self._leaf_to_group.get(s.id)
            return Poly.var(g.id) if g is not None else s.size
        return C.kept_size(lay, leaf_size=leaf)

    def _compile_kept(self, poly):
        return CompiledPoly(poly, {g.id: g.size for g in self.groups})

    def _check_kept(self, kept: Mapping[int, Any] | None) -> Mapping[int, Any]:
        if not kept:
            return {}
        for gid, k in kept.items():
            g = self.group(gid)
            if isinstance(k, (int, float)) and not 0 <= k <= g.size:
                raise ValueError(f"group {gid} has {g.size} units, cannot keep {k}: "
                                 f"pass a number of kept units between 0 and {g.size}")
        return kept

    @property
    def prunable_proportion(self) -> float:
        """Fraction of FLOPs that pruning can remove: every prunable group down to one unit."""
        total = self.macs()
        if total == 0:
            return 0.0
        plan = {g.id: g.size - 1 for g in self.groups if g.prunable}
        return 1.0 - self.macs(plan) / total
