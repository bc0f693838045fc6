"""Weight-only criteria: magnitude (L1, L2), FPGM, BN scale, LAMP and a seeded random baseline."""
from __future__ import annotations

import torch

from .base import Criterion, log, reduce_members, unit_view


class L1(Criterion):
    """L1 norm of each unit's slice of every member, combined over the group with ``reduction``."""

    name = "l1"

    def _member_score(self, model, group, member, w, ctx):
        return unit_view(member, w).abs().sum(1)


class L2(Criterion):
    """L2 norm of each unit's slice: squared sum then square root *per member*, then ``reduction``.

    (Torch-Pruning's group-L2 leaves out the square root; taking it per member keeps a member's
    scale linear in its weights, so a 1-entry BN scale and a 9*C-entry conv filter mix sensibly.)
    """

    name = "l2"

    def _member_score(self, model, group, member, w, ctx):
        return unit_view(member, w).pow(2).sum(1).sqrt()


class FPGM(Criterion):
    """Filter pruning via geometric median (He et al. 2019).

    Per source member (a layer's output-channel weights), each unit's score is the sum of Euclidean
    distances from its filter to the filters of all other units; a small sum means the filter is near
    the geometric median and is redundant.  Consumers, norms and biases do not take part; a group
    with no source layer falls back to all its scorable members (logged at debug level).
    """

    name = "fpgm"

    def _group_score(self, model, group, ctx):
        elig = self.eligible(model, group)
        src = [e for e in elig if e[2] == "source"]
        if not src:
            src = [e for e in elig if e[2] != "bias"] or elig
            log.debug("fpgm: group %d has no source layer; using all %d scorable members", group.id, len(src))
        return super()._group_score(model, group, {id(e[0]) for e in src})

    def _member_score(self, model, group, member, w, ctx):
        if id(member) not in ctx:
            return None
        v = unit_view(member, w)
        return torch.cdist(v.unsqueeze(0), v.unsqueeze(0)).squeeze(0).sum(1)


class BNScale(Criterion):
    """|gamma| of the normalisation layers in the group (network slimming, Liu et al. 2017).

    BatchNorm/InstanceNorm/GroupNorm/LayerNorm/RMSNorm scales (also subclasses and classes named
    ``*Norm*``) count; a unit spanning several entries (a head) sums them.  Groups without a norm
    scale fall back to :class:`L1` (logged once per call).
    """

    name = "bn_scale"
    fallback_name = "l1 (no norm layer in the group)"

    def _prepare(self, model, groups, data, loss_fn, forward_fn):
        fb = L1(reduction=self.reduction, include_consumers=self.include_consumers, include_bias=self.include_bias,
                skip_frozen=self.skip_frozen)
        return {"fallback": fb, "fallback_ids": []}

    def _group_score(self, model, group, ctx):
        norms = [(m, p) for m, p, role in self.eligible(model, group) if role == "norm"]
        if not norms:
            ctx["fallback_ids"].append(group.id)
            return ctx["fallback"]._group_score(model, group, None)
        return reduce_members([unit_view(m, p.detach().float()).abs().sum(1) for m, p in norms], self.reduction)


class LAMP(Criterion):
    """Layer-adaptive magnitude (Lee et al. 2021), channel analogue.

    Per member (layer slice), with ``w_u^2`` the squared norm of unit ``u``'s slice:
    ``score_u = w_u^2 / sum_{v: w_v^2 >= w_u^2} w_v^2`` (the largest unit of each layer scores 1;
    ties share a denominator).  Members are combined with ``reduction``.
    """

    name = "lamp"

    def _member_score(self, model, group, member, w, ctx):
        sq = unit_view(member, w).pow(2).sum(1)
        vals = sq.sort().values
        suffix = vals.flip(0).cumsum(0).flip(0)  # suffix[i] = sum of vals[i:]
        denom = suffix[torch.searchsorted(vals, sq, right=False)]
        return torch.where(denom > 0, sq / denom.clamp_min(torch.finfo(sq.dtype).tiny), torch.zeros_like(sq))


class Random(Criterion):
    """Uniform random scores in [0, 1): a baseline.  Deterministic given ``seed``; a group's scores
    depend only on ``seed`` and its id (not on which other groups are scored)."""

    name = "random"

    def __init__(self, *, seed: int = 0, **kw):
        super().__init__(**kw)
        self.seed = int(seed)

    def _group_score(self, model, group, ctx):
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + group.id) % (2 ** 63))
        return torch.rand(group.size, generator=gen)


__all__ = ["L1", "L2", "FPGM", "BNScale", "LAMP", "Random"]
