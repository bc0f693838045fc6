"""Groups: the channel spaces of an analysed tape turned into :class:`Group` objects (members, sources, pins).

One group per leaf channel space that parameters reach: every parameter/buffer dim whose layout contains the
space is a :class:`Member`; a group is prunable unless the space is pinned, too small, laid out inconsistently or
constrained to a multiple its size cannot satisfy."""
from __future__ import annotations

import math
from collections import defaultdict

from torch import nn

from ..capture import Tape
from . import spaces as C
from .analyzer import Analyzer, Group, Member, pin_reason
from .modules import source_dim


def build_groups(tape: Tape, an: Analyzer, model: nn.Module) -> tuple[list[Group], dict[int, Group]]:
    """``(groups, {leaf space id: group})`` of a finished analysis (:meth:`Analyzer.finish` has run)."""
    groups: list[Group] = []
    leaf_to_group: dict[int, Group] = {}
    members: dict[int, list[Member]] = defaultdict(list)
    leaf_obj: dict[int, C.Space] = {}
    order: list[int] = []
    # a parameter or buffer that no op of the captured forward reads (transformers' ``original_inv_freq``,
    # a cached copy kept for re-initialisation) is not part of the computation: it never forms or joins a
    # group, so no plan slices it (that would corrupt state the model keeps for later)
    read = {r.id for op in tape.ops for r in op.inputs()}
    read.update(tape.outputs)
    for nd in tape.nodes:
        if nd.kind not in ("param", "buffer") or an.layouts[nd.id] is None or nd.id not in read:
            continue
        for d, lay in enumerate(an.layouts[nd.id]):
            if lay is None or nd.shape[d] < 2:
                continue
            off = 0
            for term in C.expand(lay):
                sizes = tuple(s.size for s in term)
                for pos, s in enumerate(term):
                    if s.size < 2:
                        continue
                    if s.id not in leaf_obj:
                        leaf_obj[s.id] = s
                        order.append(s.id)
                    members[s.id].append(Member(nd.name, d, off, sizes, pos))
                off += C.term_size(term)
    mod_objs = dict(model.named_modules())
    shapes = {nd.name: nd.shape for nd in tape.nodes if nd.kind in ("param", "buffer")}
    order_ch = [lid for lid in order if "nonchannel" not in leaf_obj[lid].tags]
    keep = {C.find(sp).id: k for sp, k in an.min_keep_spaces}
    multiple: dict[int, tuple[int, str]] = {}
    for lay, n, why in an.multiples:
        for s in C.leaves(lay):
            m, w = multiple.get(s.id, (1, ""))
            multiple[s.id] = (math.lcm(m, n), w or why)
    for gid, lid in enumerate(order_ch):
        s = leaf_obj[lid]
        mem = members[lid]
        mods = []
        src = []
        for m in mem:
            mod, _, attr = m.fqn.rpartition(".")
            if mod not in mods:
                mods.append(mod)
            if attr == "weight" and source_dim(mod_objs.get(mod)) == m.dim and mod not in src:
                src.append(mod)
        reason = pin_reason(s.pins)
        prunable = not s.pins
        bad = [m for m in mem if m.offset + math.prod(m.sizes) > shapes[m.fqn][m.dim]]
        if bad:  # never cut with indices the tensor does not have: pin and say so
            prunable = False
            reason = (f"inconsistent channel layout for {bad[0].fqn} dim {bad[0].dim} "
                      "(prunekit could not map this group safely)")
        if prunable and s.size < 2:
            prunable, reason = False, "single unit"
        unit = "expert" if "expert" in s.tags else "head" if "head" in s.tags else \
            "head_dim" if "head_dim" in s.tags else "group" if "group" in s.tags else "channel"
        g = Group(id=gid, size=s.size, unit=unit, prunable=prunable, reason=reason, exact=not s.mix,
                  inexact_reasons=list(s.mix), modules=mods, members=mem, source=src, leaf_id=lid,
                  min_keep=keep.get(lid, 1))
        if g.prunable and g.size <= g.min_keep:
            g.prunable, g.reason = False, f"only {g.size} {unit}s and {g.min_keep} must stay"
        m, why = multiple.get(lid, (1, ""))
        if m > 1:
            g.multiple_of, g.multiple_why = m, why
            if g.prunable and (s.size % m or s.size < 2 * m):
                g.prunable, g.reason = False, f"kept units must be a multiple of {m} ({why})"
        groups.append(g)
        leaf_to_group[lid] = g
    return groups, leaf_to_group
