"""Calibration criteria for LLMs (and any model): activation statistics of the layers that read each group.

One pass over the user's batches (``data=``: dicts with ``input_ids`` / ``attention_mask``, integer token
tensors, tensors, or ``(x, y)`` pairs whose first element is the input) with forward *pre*-hooks on the
group's consumers -- the layers whose input channels the group owns (``o_proj`` for attention heads,
``down_proj`` for MLP neurons, every layer that reads the hidden width for the hidden group).  Each hook
keeps running statistics per input channel (:class:`ChannelStats`: token count, sum, sum of ``|x|``, sum of
squares and the centred second moment, merged batch by batch), never the activations themselves, so the
memory is ``O(channels)`` whatever the number of batches.  Tokens where ``attention_mask == 0`` (padding) are
left out wherever the layer's input is laid out ``[batch, seq, ...]`` (or ``[batch*seq, ...]``) like the mask.

Criteria (per consumer member, per input channel ``j``; a unit sums the channels it owns -- a head its
head_dim channels -- and members are combined with ``reduction``):

* ``"activation"`` (Minitron): ``agg="l2"`` (default) ``sqrt(sum_{j in unit} mean_t x_j^2)`` -- the RMS
  over calibration tokens of the unit's activation norm (for a head: the per-head L2 norm of the attention
  output entering ``o_proj``); ``agg="mean_abs"``: ``sum_{j in unit} mean_t |x_j|``.  Members are averaged
  (``reduction="mean"``), so the hidden width is scored by the normalised residual stream every layer reads.
* ``"wanda_sp"``: ``sum_i |W_ij| * ||X_j||_2`` (``||X_j||_2`` over all calibration tokens), summed per unit
  and over members (``reduction="sum"``).
* ``"flap"``: fluctuation ``var_t(X_j) * ||W[:, j]||_2^2`` (population variance over calibration tokens),
  summed per unit and over members; then standardised *per layer kind* (all groups of one kind, e.g. the
  MLP neurons of every layer, share one mean and std: see :func:`group_kind`), so one global ranking
  (``pk.Pruner(..., global_pruning=True)``) compares layers and gives adaptive per-layer widths.

Groups with no consumer that ran as a module (no linear/conv reading them) fall back to ``l2`` (logged).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ...analysis.analyzer import Group
from ...analysis.modules import spec_of
from ...runs import distributed as D
from .base import Criterion, iter_batches, member_role, module_and_attr, reduce_members, resolve_groups, unit_view

log = logging.getLogger("prunekit.importance")


# ---------------------------------------------------------------------------- running statistics
@dataclass
class ChannelStats:
    """Running statistics of one layer's input, per input channel (float64, merged batch by batch).

    ``n``: tokens seen; ``sum``, ``abs_sum``, ``sq_sum``: sums of ``x``, ``|x|``, ``x^2``; ``m2``: sum of squared
    deviations from the running mean (Chan et al.'s parallel update: stable where ``sq_sum - n mean^2`` is not).
    """

    channels: int
    n: int = 0
    sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    abs_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    sq_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    m2: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        for k in ("sum", "abs_sum", "sq_sum", "m2"):
            if getattr(self, k) is None:
                setattr(self, k, torch.zeros(self.channels, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` ``[tokens, channels]``."""
        if x.shape[0] == 0:
            return
        x = x.detach().to(device="cpu", dtype=torch.float64)
        nb = x.shape[0]
        s = x.sum(0)
        mean_b = s / nb
        m2_b = (x - mean_b).pow(2).sum(0)
        if self.n:
            delta = mean_b - self.sum / self.n
            self.m2 += m2_b + delta.pow(2) * (self.n * nb / (self.n + nb))
        else:
            self.m2 += m2_b
        self.n += nb
        self.sum += s
        self.abs_sum += x.abs().sum(0)
        self.sq_sum += x.pow(2).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n, 1)

    @property
    def var(self) -> torch.Tensor:
        """Population variance over the tokens seen."""
        return self.m2 / max(self.n, 1)

    @property
    def l2(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens seen."""
        return self.sq_sum.sqrt()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sum, self.abs_sum, self.sq_sum, self.m2))


class CalibrationStats(dict):
    """``{module name: ChannelStats}`` of one calibration pass (plus ``batches`` and ``tokens`` counted)."""

    batches: int = 0
    graph: Any = None

    def nbytes(self) -> int:
        """Memory the statistics hold: independent of how many batches were seen."""
        return sum(s.nbytes() for s in self.values())


def _mask_of(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        m = batch.get("attention_mask")
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            return m
    return None


def calib_forward(model: nn.Module, batch: Any, forward_fn: Callable | None = None) -> Any:
    """Run one calibration batch: ``forward_fn(model, batch)`` if given; a dict -> ``model(**batch)``; a tuple
    or list -> ``model(batch[0])`` (``(x, y)`` pairs); anything else -> ``model(batch)``."""
    if forward_fn is not None:
        return forward_fn(model, batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _input_channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    spec = spec_of(module)
    w = getattr(module, "weight", None)
    if spec is not None and spec.act_dim == 1 and isinstance(w, torch.Tensor):  # channel-first (convs)
        return 1 if x.dim() == w.dim() else 0
    return x.dim() - 1


def _tokens(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, name: str, warned: set) -> torch.Tensor:
    """``x`` as ``[tokens, channels]`` without the padding tokens (where the layout says which they are)."""
    ch = _input_channel_dim(module, x)
    t = x.movedim(ch, -1)
    if mask is not None:
        keep = mask.to(device=t.device) != 0
        if t.dim() >= 3 and tuple(t.shape[:2]) == tuple(keep.shape):
            return t[keep].reshape(-1, t.shape[-1])
        if t.dim() == 2 and t.shape[0] == keep.numel():
            return t[keep.reshape(-1)]
        if name not in warned:
            warned.add(name)
            log.info("calibration: the input of %s (shape %s) is not laid out like attention_mask %s; its padding "
                     "tokens are counted", name, tuple(x.shape), tuple(mask.shape))
    return t.reshape(-1, t.shape[-1])


def collect_input_stats(model: nn.Module, names: Iterable[str], data: Any, *, forward_fn: Callable | None = None,
                        max_batches: int | None = None) -> CalibrationStats:
    """One pass over ``data`` (see :func:`calib_forward`) with forward pre-hooks on the modules ``names``:
    running per-input-channel statistics of each (:class:`ChannelStats`), padding excluded.

    Runs under ``torch.no_grad()`` in the model's current training mode, with the RNG state restored
    afterwards; modules that never run get no entry.
    """
    stats = CalibrationStats()
    state = {"mask": None}
    warned: set[str] = set()

    def hook(name, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            return
        rows = _tokens(module, x, state["mask"], name, warned)
        st = stats.get(name)
        if st is None:
            st = stats[name] = ChannelStats(rows.shape[-1])
        elif st.channels != rows.shape[-1]:
            return
        st.update(rows)

    handles = []
    try:
        for name in sorted(set(names)):
            handles.append(model.get_submodule(name).register_forward_pre_hook(partial(hook, name)))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for batch in iter_batches(data, max_batches):
                state["mask"] = _mask_of(batch)
                calib_forward(model, batch, forward_fn)
                stats.batches += 1
    finally:
        for h in handles:
            h.remove()
    if stats.batches == 0:
        raise ValueError("calibration: data yielded no batches")
    return stats


def reduce_stats(stats: CalibrationStats, group: Any = None) -> CalibrationStats:
    """Merge every rank's :class:`CalibrationStats` in place (data-parallel calibration): afterwards each rank holds
    the statistics of all ranks' tokens -- counts and sums added, centred second moments merged with Chan et
    al.'s parallel update in rank order -- i.e. what one process seeing all the data computes (not an average
    of per-rank averages), bit-identical on every rank.  Modules that ran on some ranks only are included."""
    if D.world_size(group) == 1:
        return stats
    shapes: dict[str, int] = {}
    for part in D.all_gather_object({k: v.channels for k, v in stats.items()}, group):
        for k, c in part.items():
            if shapes.setdefault(k, c) != c:
                raise ValueError(f"calibration: the input of {k} has {shapes[k]} channels on one rank and {c} on "
                                 "another; every rank must run the same model")
    names = sorted(shapes)
    vecs = []
    for k in names:
        st = stats.get(k) or ChannelStats(shapes[k])
        vecs.append(torch.cat([torch.tensor([float(st.n), float(stats.batches)], dtype=torch.float64),
                               st.sum, st.abs_sum, st.sq_sum, st.m2]))
    flat = torch.cat(vecs) if vecs else torch.tensor([float(stats.batches)], dtype=torch.float64)
    parts = D.all_gather_tensor(flat, group)
    stats.batches = int(sum(int(p[1].item()) for p in parts)) if names else int(sum(p[0].item() for p in parts))
    pos = 0
    for k in names:
        c = shapes[k]
        merged = ChannelStats(c)
        for p in parts:
            seg = p[pos:pos + 2 + 4 * c]
            n = int(seg[0].item())
            if n == 0:
                continue
            s_, a_, q_, m2_ = (seg[2 + i * c:2 + (i + 1) * c] for i in range(4))
            if merged.n:
                delta = s_ / n - merged.sum / merged.n
                merged.m2 += m2_ + delta.pow(2) * (merged.n * n / (merged.n + n))
            else:
                merged.m2 += m2_
            merged.n += n
            merged.sum += s_
            merged.abs_sum += a_
            merged.sq_sum += q_
        pos += 2 + 4 * c
        stats[k] = merged
    return stats


# ---------------------------------------------------------------------------- criteria
def consumer_members(model: nn.Module, group: Group) -> list[tuple[str, Any, torch.Tensor]]:
    """(module name, member, weight) for each member that is a layer's input-channel slice of ``group``."""
    out = []
    for m in group.members:
        mod, attr = module_and_attr(model, m.fqn)
        if mod is None or attr != "weight" or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        if member_role(model, m) == "consumer":
            out.append((m.fqn.rpartition(".")[0], m, mod.weight))
    return out


def _per_input_channel(w: torch.Tensor, dim: int, fn) -> torch.Tensor:
    """``fn`` applied over everything but ``dim`` of ``w`` (e.g. ``sum_i |W_ij|``): a vector along ``dim``."""
    t = w.detach().to(torch.float64).movedim(dim, 0)
    return fn(t.reshape(t.shape[0], -1))


_DIGITS = re.compile(r"(?<=\.)\d+(?=\.|$)")


def group_kind(model: nn.Module, group: Group) -> tuple:
    """What kind of structure a group is, the same for every repeated layer: its unit plus, per consumer
    member, the module name with layer indices replaced by ``*`` and the member's factor layout (so the MLP
    neurons of every layer are one kind, the kv heads of every layer another, query slots a third)."""
    parts = []
    for name, m, _w in consumer_members(model, group):
        parts.append((_DIGITS.sub("*", name), len(m.sizes), m.pos, math.prod(m.sizes) // m.sizes[m.pos]))
    if not parts:
        parts = [(_DIGITS.sub("*", n), 0, 0, 0) for n in (group.source or group.modules)]
    return (group.unit,) + tuple(sorted(set(parts)))


class CalibrationCriterion(Criterion):
    """Base of the activation-statistics criteria: one no-grad pass over ``data`` (see the module docstring).

    After :meth:`scores`, ``last_stats`` holds the :class:`CalibrationStats` of that pass (also used by
    ``pk.Pruner(bias_compensation=True)``).  ``max_batches`` caps the batches used (per rank).

    Data-parallel calibration: when ``torch.distributed`` is initialised each rank passes its own batches and
    the running statistics are merged across ranks before scoring (:func:`reduce_stats`), so every rank gets
    the scores one process would compute from all ranks' data.  ``distributed=False`` opts out (each rank
    scores its own data); a process group object restricts the merge to that group.
    """

    needs_data = True
    fallback_name = "l2 (no consumer layer of the group ran)"

    def __init__(self, *, max_batches: int | None = None, distributed: Any = None, **kw):
        super().__init__(**kw)
        self.max_batches = max_batches
        self.distributed = distributed
        self.last_stats: CalibrationStats | None = None

    def scores(self, model, graph, groups=None, *, data=None, loss_fn=None, forward_fn=None):
        out = super().scores(model, graph, groups, data=data, loss_fn=loss_fn, forward_fn=forward_fn)
        self.last_stats.graph = graph  # type: ignore[union-attr]  # which analysis the statistics belong to
        return out

    def _channel_score(self, stats: ChannelStats, w: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def _unit_score(self, member, per_channel: torch.Tensor) -> torch.Tensor:
        return unit_view(member, per_channel, dim=0).sum(1)

    def _prepare(self, model, groups, data, loss_fn, forward_fn):
        if data is None:
            raise ValueError(f"criterion {self.name!r} needs data=... calibration batches (dicts with input_ids and "
                             "attention_mask, token-id tensors, or input tensors); weight-only criteria such as "
                             "'l2' need no data")
        names = {name for g in groups for name, _m, _w in consumer_members(model, g)}
        stats = collect_input_stats(model, names, data, forward_fn=forward_fn, max_batches=self.max_batches)
        use, pg = D.active(self.distributed)
        if use:
            reduce_stats(stats, pg)
        self.last_stats = stats
        from .weight import L2
        fb = L2(reduction=self.reduction, include_consumers=self.include_consumers, include_bias=self.include_bias,
                skip_frozen=self.skip_frozen)
        return {"stats": stats, "fallback": fb, "fallback_ids": []}

    def _group_score(self, model, group, ctx):
        vecs = []
        for name, m, w in consumer_members(model, group):
            st = ctx["stats"].get(name)
            if st is None or st.channels != w.shape[m.dim]:
                continue
            vecs.append(self._unit_score(m, self._channel_score(st, w, m.dim)).float())
        if vecs:
            return reduce_members(vecs, self.reduction)
        ctx["fallback_ids"].append(group.id)
        return ctx["fallback"]._group_score(model, group, None)


class Activation(CalibrationCriterion):
    """Minitron activation importance: magnitude of each unit's input activation to the layers that read it
    (see the module docstring); ``agg="l2"`` (RMS over tokens of the unit's activation norm) or ``"mean_abs"``."""

    name = "activation"

    def __init__(self, *, agg: str = "l2", **kw):
        super().__init__(**kw)
        if agg not in ("l2", "mean_abs"):
            raise ValueError(f"activation: agg must be 'l2' or 'mean_abs', got {agg!r}")
        self.agg = agg

    def _channel_score(self, stats, w, dim):
        n = max(stats.n, 1)
        return stats.sq_sum / n if self.agg == "l2" else stats.abs_sum / n

    def _unit_score(self, member, per_channel):
        s = super()._unit_score(member, per_channel)
        return s.sqrt() if self.agg == "l2" else s


class WandaSP(CalibrationCriterion):
    """Wanda-sp: ``sum_i |W_ij| * ||X_j||_2`` per input channel of each consumer, summed per unit and member."""

    name = "wanda_sp"

    def __init__(self, *, reduction: str = "sum", **kw):
        super().__init__(reduction=reduction, **kw)

    def _channel_score(self, stats, w, dim):
        return _per_input_channel(w, dim, lambda t: t.abs().sum(1)) * stats.l2


class FLAP(CalibrationCriterion):
    """FLAP fluctuation: ``var_t(X_j) * ||W[:, j]||_2^2`` per input channel, summed per unit and member, then
    standardised per layer kind (``standardize=True``, the default unless ``normalize`` is given: subtract the
    kind's mean, divide by its std over all groups of that kind, see :func:`group_kind`).  The standardised scores are comparable across groups, so
    ``pk.Pruner(..., global_pruning=True)`` ranks them as they are (no per-group rescaling) and the kept width of
    each layer follows how much its channels fluctuate (FLAP's adaptive structure)."""

    name = "flap"

    def __init__(self, *, reduction: str = "sum", standardize: bool | None = None, **kw):
        super().__init__(reduction=reduction, **kw)
        if standardize and self.normalize is not None:
            raise ValueError("flap: standardize=True already makes scores comparable across groups; "
                             f"normalize={self.normalize!r} would undo it (pass one of them)")
        # default: standardise per kind, unless a per-group normalize was asked for instead
        self.standardize = (self.normalize is None) if standardize is None else bool(standardize)

    @property
    def globally_comparable(self) -> bool:
        return self.standardize

    def _channel_score(self, stats, w, dim):
        return _per_input_channel(w, dim, lambda t: t.pow(2).sum(1)) * stats.var

    def scores(self, model, graph, groups=None, *, data=None, loss_fn=None, forward_fn=None):
        raw = super().scores(model, graph, groups, data=data, loss_fn=loss_fn, forward_fn=forward_fn)
        if not self.standardize:
            return raw
        return self.standardize_scores(model, resolve_groups(graph, groups), raw)

    def standardize_scores(self, model, groups, raw):
        """Standardise raw scores per layer kind (one mean and std per :func:`group_kind`)."""
        kinds: dict[tuple, list[int]] = {}
        for g in groups:
            kinds.setdefault(group_kind(model, g), []).append(g.id)
        out = {}
        for gids in kinds.values():
            allv = torch.cat([raw[i] for i in gids]).double()
            mean, std = allv.mean(), allv.std(unbiased=False)
            for i in gids:
                out[i] = ((raw[i].double() - mean) / std if std > 0 else torch.zeros_like(raw[i].double())).float()
        return {i: out[i] for i in raw}


__all__ = ["Activation", "CalibrationCriterion", "CalibrationStats", "ChannelStats", "FLAP", "WandaSP",
           "calib_forward", "collect_input_stats", "consumer_members", "group_kind", "reduce_stats"]
