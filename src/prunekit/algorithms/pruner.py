"""``pk.Pruner``: rank units with a criterion and remove enough of them to meet a target.

The pruner only decides *which units of which groups* go; analysis, removal and verification are the
core's (:func:`prunekit.analyze`, :func:`prunekit.prune`).  Targets are met by computation, not trial:
FLOPs and parameter counts after a plan come from the captured graph as a function of the units each
group keeps, so a FLOPs target is a monotone search over one knob (the local ratio, or the length of the
global ranking prefix), exact within one ``round_to`` step.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..graph import PruneGraph, analyze, default_forward
from ..analysis.analyzer import Group
from ..surgery import prune as _prune
from ..surgery import pruned_copy
from ..plan.targets import ChannelRatio, Target, as_target

log = logging.getLogger("prunekit.pruner")


def group_key(g: Group) -> tuple:
    """A key that identifies a group across re-analyses of the same (progressively pruned) model."""
    return (g.unit,) + tuple(sorted((m.fqn, m.dim, m.pos, len(m.sizes)) for m in g.members))


@dataclass
class _Slot:
    """One eligible group and its constraints, in the current model."""

    group: Group
    orig: int  # size in the model the pruner started from
    min_keep: int
    step: int  # kept units are a multiple of this (see unit_step: kept widths are multiples of round_to)
    ratio: float | None  # per-module ratio override (final channel ratio)
    cls: tuple = ()  # uniform pruning: slots with the same class keep the same number of units
    allowed: list[int] | None = None  # round_to="auto": the kept counts allowed (measured, fast side), ascending

    @property
    def cur(self) -> int:
        return self.group.size

    def round_keep(self, kept: float) -> int:
        k = max(self.min_keep, int(math.ceil(kept - 1e-9)))
        if self.allowed is not None:
            return next((a for a in self.allowed if a >= k), self.cur)
        if self.step > 1:
            k = int(math.ceil(k / self.step) * self.step)
        return min(self.cur, k)


def unit_step(g: Group, round_to: int) -> int:
    """Kept units of ``g`` are a multiple of this so that every width it changes is a multiple of ``round_to``.

    A unit of a member dim spans ``prod(sizes) / sizes[pos]`` indices (1 for a channel or a depthwise
    conv's group, the channels per group of a grouped conv, the number of heads for a head_dim unit): the
    kept count must make ``kept x span`` a multiple of ``round_to`` in every member, i.e. a multiple of
    ``round_to / gcd(round_to, span)`` for each of them (their lcm).  Channel, group, head_dim and head units
    are rounded: a head spans head_dim indices (4 heads of 16 with ``round_to=64``), a kv head its query group
    too.  Expert units are not rounded by ``round_to``; a group's ``multiple_of`` (a kernel's alignment, e.g.
    ``_grouped_mm``) always applies."""
    step = getattr(g, "multiple_of", 1)  # a kernel's alignment (e.g. _grouped_mm) applies whatever round_to is
    if round_to <= 1 or g.unit == "expert":
        return step
    for m in g.members:
        span = math.prod(m.sizes) // m.sizes[m.pos]
        step = math.lcm(step, round_to // math.gcd(round_to, span))
    return step


def _take_weakest(owner: list[int], cap: list[int], n: int) -> list[int]:
    """Units removed per owner when the ``n`` weakest units go (``owner``: each unit's owner, weakest first),
    never more than ``cap[k]`` from owner ``k``."""
    removed = [0] * len(cap)
    left = int(n)
    for k in owner:
        if left <= 0:
            break
        if removed[k] < cap[k]:
            removed[k] += 1
            left -= 1
    return removed


class Pruner:
    """Structured pruning towards a target, one shot or step by step.

    Args:
        model: the model to prune (changed in place by :meth:`step` / :meth:`prune`).
        example_inputs: what ``model`` is called with (tensor, tuple or dict); or use ``forward_fn``.
        criterion: a name from :data:`prunekit.importance.CRITERIA` ("l1", "l2", "fpgm", "taylor", ...)
            or a :class:`prunekit.importance.Criterion`.
        target: a float channel ratio, or ``ChannelRatio`` / ``FlopsTarget`` / ``ParamsTarget`` /
            ``LatencyTarget`` (the latter three give the fraction KEPT).
        global_pruning: rank units across all groups (scores normalised per group) instead of the same
            ratio per group.
        round_to: the kept width of every pruned layer is a multiple of this: channel units, "group" units
            (channels tied to a depthwise conv; a unit of a grouped conv spans several channels, and the
            channel count it gives is rounded) and head_dim units (the width is heads x head_dim) are kept
            in steps that make every tensor dim the group cuts a multiple of ``round_to`` (see
            :func:`unit_step`); whole heads too (their width is a multiple of head_dim).  Experts are not
            rounded.  A group smaller than one step is not pruned.
            ``"auto"``: per group, only widths measured by the :attr:`latency_model`, at multiples of its
            ``align`` channels (8) and on the fast side of its staircase (strictly faster than every wider
            measured width) are kept (:meth:`prunekit.LatencyModel.fast_widths`).
        max_ratio: at most this fraction of a group's (original) units is removed; one unit always stays.
        ratios: per-module channel-ratio overrides ``{module or name pattern: ratio}`` (local pruning).
        ignore: modules (objects or fnmatch name patterns) whose output channels are never pruned.  The
            channels that reach the model's outputs are never pruned anyway (see ``prune_outputs``).
        data, loss_fn: batches and loss for data-driven criteria (taylor, hessian, ...).
        attention: where an attention has both a heads group and a head_dim group, prune "head_dim" (keep
            every head, narrower heads; the default, as Torch-Pruning does), "heads" (drop whole heads) or
            "both" (both factors are ranked and pruned: with a channel ratio the widths compound).
        uniform: every repeated block gets the same widths -- groups whose modules differ only in a layer index
            (``layers.3.mlp`` ~ ``layers.*.mlp``), with the same unit kind and size, keep the same number of
            units (each layer still keeps its own best units), so a transformers config can describe the
            result (``pk.hf.save_pretrained`` then writes a directory plain ``from_pretrained`` loads).
        bias_compensation: (FLAP) the mean contribution of the removed input channels of every linear layer
            that closes a pruned group (``o_proj`` for heads, ``down_proj`` for MLP neurons; groups under a
            norm, such as the hidden width, are not compensated) is added to that layer's bias, created where
            it has none (see :mod:`prunekit.algorithms.compensation`; transformers configs get
            ``attention_bias`` / ``mlp_bias``).
        latency_model: a :class:`prunekit.LatencyModel` of ``model`` to use for a ``LatencyTarget`` (knapsack)
            and ``round_to="auto"``; default: built on first use from the target's backend, device, threads and
            batch size (eager CPU for other targets), measured layers cached on disk.  The means come from ``data`` (the calibration pass of an
            ``"activation"`` / ``"wanda_sp"`` / ``"flap"`` criterion is reused; other criteria get one extra
            no-grad pass).  Verification checks the removal against the masked model before the biases are
            added; ``history[-1]`` lists what was compensated.

    Calibration criteria (``"activation"``, ``"wanda_sp"``, ``"flap"``; :mod:`prunekit.importance.calibration`)
    take ``data`` as token batches (dicts with ``input_ids``/``attention_mask``, or tensors) and need no loss;
    ``"flap"`` scores are standardised per layer kind, so with ``global_pruning=True`` they are ranked as they
    are (not rescaled per group) and each layer keeps as many units as its fluctuation earns.  ``"taylor"`` on
    token batches uses the causal-LM loss (``labels=input_ids``, padding excluded) when no ``loss_fn`` is given.
    """

    def __init__(self, model: nn.Module, example_inputs: Any = None, criterion: Any = "l2", target: Any = 0.5, *,
                 forward_fn: Callable | None = None, global_pruning: bool = False, round_to: int = 1,
                 max_ratio: float = 1.0, ratios: Mapping[Any, float] | None = None,
                 ignore: Iterable[Any] | None = None, data: Any = None, loss_fn: Callable | None = None,
                 prune_outputs: bool = False, verify: bool = True, criterion_kwargs: Mapping | None = None,
                 attention: str = "head_dim", uniform: bool = False, bias_compensation: bool = False,
                 latency_model: Any = None):
        from ..plan.importance import get_criterion

        if not isinstance(model, nn.Module):
            raise TypeError(f"Pruner expects an nn.Module, got {type(model).__name__}")
        if example_inputs is None and forward_fn is None:
            raise ValueError("Pruner needs example_inputs (e.g. torch.randn(1, 3, 224, 224)) or a forward_fn")
        if round_to != "auto" and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
            raise ValueError(f"round_to must be a positive integer or 'auto', got {round_to!r}")
        if not 0.0 < float(max_ratio) <= 1.0:
            raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
        if attention not in ("head_dim", "heads", "both"):
            raise ValueError(f"attention must be 'head_dim', 'heads' or 'both', got {attention!r}")
        self.attention = attention
        self.uniform = bool(uniform)
        self.model = model
        self.example_inputs = example_inputs
        self.forward_fn = default_forward(model, forward_fn)  # e.g. a torchvision detector's head outputs
        self.target: Target = as_target(target)
        self.global_pruning = bool(global_pruning)
        self.round_to = round_to
        self.max_ratio = float(max_ratio)
        self.data, self.loss_fn = data, loss_fn
        self.prune_outputs = prune_outputs
        self.verify = verify
        kw = dict(criterion_kwargs or {})
        self.criterion = get_criterion(criterion, **kw)
        if self.criterion.needs_data and data is None:
            raise ValueError(f"criterion {self.criterion.name!r} needs data: pass data=<iterable of batches> "
                             "(and loss_fn=lambda model, batch: loss if batches are not (x, y) pairs)")
        self.bias_compensation = bool(bias_compensation)
        if self.bias_compensation and data is None:
            raise ValueError("bias_compensation=True needs calibration data: pass data=<iterable of batches> (the "
                             "mean input of each compensated layer is measured on it)")
        names = {id(m): n for n, m in model.named_modules()}
        self.ignore = [_pattern(p, names, "ignore") for p in (ignore or [])]
        self.ratios = {}
        for p, r in (ratios or {}).items():
            self.ratios[_pattern(p, names, "ratios")] = ChannelRatio(r).ratio
        self._graph: PruneGraph | None = None
        g0 = self.graph
        self._orig = {group_key(g): g.size for g in g0.groups}
        self._orig_units: dict[str, int] = {}  # prunable units of the original model per unit kind (summary)
        for g in g0.prunable_groups:
            self._orig_units[g.unit] = self._orig_units.get(g.unit, 0) + g.size
        self.base_macs = g0.macs()
        self.base_params = g0.params_kept({})
        self._base_latency: float | None = None
        self._latency_model = latency_model
        self.history: list[dict] = []
        self._removed: dict[str, int] = {}  # units removed by this pruner, per unit kind (summary)

    # ------------------------------------------------------------------ state
    @property
    def graph(self) -> PruneGraph:
        """Analysis of the model as it is now (re-done lazily after each pruning step)."""
        if self._graph is None or self._graph.stale:
            self._graph = analyze(self.model, self.example_inputs, self.forward_fn, prune_outputs=self.prune_outputs)
        return self._graph

    def invalidate(self) -> None:
        """Forget the cached analysis: call after changing the model outside the pruner (e.g. replaying a
        pruning record when resuming); the next use re-analyses the model as it is."""
        self._graph = None

    def _slots(self) -> list[_Slot]:
        out = []
        for g in self.graph.prunable_groups:
            mods = g.source or g.modules
            if any(fnmatch.fnmatchcase(m, p) for p in self.ignore for m in mods):
                continue
            orig = self._orig.get(group_key(g), g.size)
            ratio = next((r for p, r in self.ratios.items() if any(fnmatch.fnmatchcase(m, p) for m in mods)), None)
            min_keep = max(g.min_keep, int(math.ceil(orig * (1.0 - self.max_ratio) - 1e-9)))
            step = unit_step(g, 1 if self.round_to == "auto" else self.round_to)
            s = _Slot(g, orig, min_keep, step, ratio)
            if self.round_to == "auto":
                s.allowed = self.latency_model.fast_widths(self.graph, g, min_keep)
            s.min_keep = min(s.round_keep(min_keep), g.size)
            if self.uniform:
                s.cls = (g.unit, orig, g.size, step, tuple(sorted({_block_pattern(m) for m in mods})))
            out.append(s)
        if self.attention != "both":
            # heads x head_dim of one attention are two groups over the same weights: a local ratio applied to
            # both would compound (50% of heads x 50% of head_dim = 75% of the width); prune one factor only
            dims = {id(sl): {(m.fqn, m.dim) for m in sl.group.members} for sl in out}
            drop = "head" if self.attention == "head_dim" else "head_dim"
            keep = "head_dim" if drop == "head" else "head"
            partners = [sl for sl in out if sl.group.unit == keep]
            out = [sl for sl in out if sl.group.unit != drop
                   or not any(dims[id(sl)] & dims[id(p)] for p in partners)]
        return out

    @property
    def prunable_proportion(self) -> float:
        """Fraction of the original model's target quantity (FLOPs for channel/FLOPs/latency targets,
        parameters for a params target) that can be removed under the constraints (ignored modules,
        max_ratio, round_to): every eligible group down to its minimum."""
        slots = self._slots()
        kept = {s.group.id: s.min_keep for s in slots}
        if self.target.kind == "params":
            return 1.0 - self.graph.params_kept(kept) / max(1, self.base_params)
        return 1.0 - self.graph.macs_kept(kept) / max(1, self.base_macs)

    # ------------------------------------------------------------------ scores
    def scores(self, groups: list[Group] | None = None) -> dict[int, torch.Tensor]:
        """Importance per unit for ``groups`` (default: every eligible group), higher = keep."""
        if groups is None:
            groups = [s.group for s in self._slots()]
        return self.criterion.scores(self.model, self.graph, groups, data=self.data, loss_fn=self.loss_fn,
                                     forward_fn=self.forward_fn)

    # ------------------------------------------------------------------ planning
    def plan(self, sparsity: float | None = None) -> dict[int, list[int]]:
        """{group id: units to drop} that brings the model to ``sparsity`` of the target's quantity
        (relative to the original model; default: the target's final sparsity)."""
        s = self.target.sparsity if sparsity is None else float(sparsity)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {s}")
        slots = self._slots()
        if not slots or s == 0.0:
            return {}
        scores = self.scores([sl.group for sl in slots])
        kept = self._kept_for(slots, scores, s)
        if self.uniform:
            kept = self._uniform(slots, kept)
        plan = {}
        for sl in slots:
            n = sl.cur - kept[sl.group.id]
            if n > 0:
                plan[sl.group.id] = torch.argsort(scores[sl.group.id].float(), stable=True)[:n].sort().values.tolist()
        return plan

    def _kept_for(self, slots: list[_Slot], scores: dict[int, torch.Tensor], s: float) -> dict[int, int]:
        t = self.target
        if self.global_pruning:
            knob = self._uniform_global_knob(slots, scores) if self.uniform else self._global_knob(slots, scores)
        else:
            knob = self._local_knob(slots, s)
        if t.kind == "latency" and getattr(t, "method", "search") == "knapsack":
            return self._latency_knapsack(slots, scores, s)
        if t.kind == "channels":
            if self.global_pruning:
                total = sum(sl.orig for sl in slots)
                done = sum(sl.orig - sl.cur for sl in slots)
                return knob(max(0, int(round(s * total)) - done))
            return knob(1.0)
        goal, value = self._goal(t.kind, s)
        full = knob(knob.hi)
        if value(full) > goal * (1 + 1e-9):
            # every eligible group at its minimum (max_ratio, round_to, ignored and pinned groups): the floor
            base = self.base_latency if t.kind == "latency" else self._goal(t.kind, 0.0)[0]
            what = {"flops": "FLOPs", "params": "parameters"}.get(t.kind, t.kind)
            floor = math.ceil(float(value(full)) / max(base, 1e-12) * 1e4) / 1e4
            step = f" (a step at {1 - s:.4g} kept)" if abs(1 - s - t.ratio) > 1e-9 else ""
            raise ValueError(
                f"{type(t).__name__}({t.ratio}){step} is not reachable: with the current constraints (ignored "
                f"modules, max_ratio={self.max_ratio}, round_to={self.round_to}, pinned groups: see "
                "graph.summary() or 'prunekit analyze MODEL') the smallest reachable is "
                f"{type(t).__name__}({floor:.4g}), {1 - floor:.1%} of the model's {what} removed. "
                f"Choose a ratio >= {floor:.4g} or relax the constraints.")
        lo, hi = 0, knob.hi  # smallest knob position whose value meets the goal
        if knob.continuous:
            lo_f, hi_f = 0.0, 1.0
            for _ in range(40 if t.kind != "latency" else 8):
                mid = (lo_f + hi_f) / 2
                if value(knob(mid)) <= goal:
                    hi_f = mid
                else:
                    lo_f = mid
            kept = knob(hi_f)
            if t.kind != "latency":
                kept = self._give_back(slots, kept, goal, value)
            return kept
        while lo < hi:
            mid = (lo + hi) // 2
            if value(knob(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return knob(lo)

    @staticmethod
    def _give_back(slots: list[_Slot], kept: dict[int, int], goal: float, value) -> dict[int, int]:
        """One shared ratio lands up to a rounding step below the goal; give single steps back (largest
        groups first, each group at most once) while the computed cost stays within the goal."""
        kept = dict(kept)
        classes: dict[tuple, list[_Slot]] = {}
        for sl in slots:  # uniform pruning: a class (one width repeated in every block) gives back together
            classes.setdefault(sl.cls if sl.cls else (id(sl),), []).append(sl)
        for members in sorted(classes.values(), key=lambda c: -sum(x.orig for x in c)):
            trial = dict(kept)
            for sl in members:
                trial[sl.group.id] = min(sl.cur, sl.round_keep(kept[sl.group.id] + sl.step))  # (auto: next allowed)
            if trial != kept and value(trial) <= goal:
                kept = trial
        return kept

    def _local_knob(self, slots: list[_Slot], s: float):
        final = self.target.sparsity if self.target.kind == "channels" else None

        def knob(frac: float) -> dict[int, int]:
            kept = {}
            for sl in slots:
                if self.target.kind == "channels":
                    r = s if sl.ratio is None else sl.ratio * (s / final if final else 1.0)
                else:
                    r = frac if sl.ratio is None else sl.ratio
                kept[sl.group.id] = sl.round_keep(sl.orig - math.floor(sl.orig * min(r, 1.0) + 0.5))
            return kept
        knob.hi, knob.continuous = 1.0, True
        return knob

    def _global_knob(self, slots: list[_Slot], scores: dict[int, torch.Tensor]):
        vals, owners = [], []
        for k, sl in enumerate(slots):
            sc = scores[sl.group.id].float()
            if getattr(self.criterion, "normalize", None) is None and \
                    not getattr(self.criterion, "globally_comparable", False):
                sc = sc / sc.abs().mean().clamp_min(1e-12)
            vals.append(sc)
            owners.append(torch.full((sl.cur,), k, dtype=torch.long))
        order = torch.argsort(torch.cat(vals), stable=True)
        owner = torch.cat(owners)[order].tolist()

        cap = [sl.cur - sl.min_keep for sl in slots]

        def knob(n: int) -> dict[int, int]:
            removed = _take_weakest(owner, cap, n)
            return {sl.group.id: sl.round_keep(sl.cur - removed[k]) for k, sl in enumerate(slots)}
        knob.hi, knob.continuous = len(owner), False
        return knob

    def _classes(self, slots: list[_Slot]) -> list[list[_Slot]]:
        classes: dict[tuple, list[_Slot]] = {}
        for sl in slots:
            classes.setdefault(sl.cls, []).append(sl)
        return list(classes.values())

    def _uniform(self, slots: list[_Slot], kept: dict[int, int]) -> dict[int, int]:
        """One kept count per class (the largest any member got: targets stay met)."""
        out = dict(kept)
        for members in self._classes(slots):
            k = max(kept[sl.group.id] for sl in members)
            for sl in members:
                out[sl.group.id] = min(sl.cur, k)
        return out

    def _uniform_global_knob(self, slots: list[_Slot], scores: dict[int, torch.Tensor]):
        """Global ranking over classes: the r-th weakest unit of a class scores the mean (over its blocks) of each
        block's r-th weakest normalised score; removing it removes one unit from every block of the class."""
        classes = self._classes(slots)
        vals, owners = [], []
        for k, members in enumerate(classes):
            per = []
            for sl in members:
                sc = scores[sl.group.id].float()
                if getattr(self.criterion, "normalize", None) is None:
                    sc = sc / sc.abs().mean().clamp_min(1e-12)
                per.append(torch.sort(sc).values)
            vals.append(torch.stack(per).mean(0))
            owners.append(torch.full((members[0].cur,), k, dtype=torch.long))
        order = torch.argsort(torch.cat(vals), stable=True)
        owner = torch.cat(owners)[order].tolist()

        cap = [max(sl.cur - sl.min_keep for sl in c) for c in classes]

        def knob(n: int) -> dict[int, int]:
            removed = _take_weakest(owner, cap, n)
            return {sl.group.id: sl.round_keep(sl.cur - removed[k]) for k, c in enumerate(classes) for sl in c}
        knob.hi, knob.continuous = len(owner), False
        return knob

    def summary(self, plan: Mapping[int, Iterable[int]] | None = None) -> dict[str, Any]:
        """Kept fractions of the original model's prunable units, heads and channels reported apart: ``heads``
        (attention head units: kv heads, query heads), ``channels`` (every other unit: MLP neurons, hidden width,
        head_dim, ...), per unit kind in ``units``, and the kept ``macs`` / ``params``.

        With ``plan`` (``{group id: units}`` of the current :attr:`graph`, e.g. from :meth:`plan`): the figures
        after that plan is applied, before applying it."""
        graph = self.graph
        removed = dict(self._removed)
        kept_now: dict[int, int] = {}
        for gid, units in (plan or {}).items():
            g = graph.group(gid)
            n = len(set(int(u) for u in units))
            removed[g.unit] = removed.get(g.unit, 0) + n
            kept_now[gid] = g.size - n
        kinds: dict[str, list[int]] = {}
        for unit, orig in self._orig_units.items():
            kinds.setdefault(unit, [0, 0])[1] += orig
        for unit in removed:
            kinds.setdefault(unit, [0, 0])
        for unit, acc in kinds.items():
            acc[0] = acc[1] - removed.get(unit, 0)
        units = {u: a[0] / max(1, a[1]) for u, a in kinds.items()}
        heads = kinds.get("head", [0, 0])
        chans = [sum(a[0] for u, a in kinds.items() if u != "head"), sum(a[1] for u, a in kinds.items() if u != "head")]
        return {"heads": heads[0] / heads[1] if heads[1] else None,
                "channels": chans[0] / chans[1] if chans[1] else None, "units": units,
                "macs": graph.macs_kept(kept_now) / max(1, self.base_macs),
                "params": graph.params_kept(kept_now) / max(1, self.base_params)}

    def _goal(self, kind: str, s: float):
        graph = self.graph
        if kind == "flops":
            return self.base_macs * (1 - s), graph.macs_kept
        if kind == "params":
            return self.base_params * (1 - s), graph.params_kept
        if kind == "latency":
            return self.base_latency * (1 - s), self._latency_of
        raise ValueError(f"unknown target kind {kind!r}")

    # ------------------------------------------------------------------ latency
    @property
    def latency_model(self):
        """The :class:`prunekit.LatencyModel` used by latency targets and ``round_to="auto"`` (built on first use
        on the model as it is then, from the target's backend/device/threads/batch size)."""
        if self._latency_model is None:
            from ..cost.latency_model import latency_model_for
            self._latency_model = latency_model_for(self.model, self.example_inputs, self.target, graph=self.graph,
                                                    forward_fn=self.forward_fn)
        return self._latency_model

    def _latency_knapsack(self, slots: list[_Slot], scores: dict[int, torch.Tensor], s: float) -> dict[int, int]:
        """Kept units per group for a latency budget: the latency model's predicted budget filled greedily by
        importance lost per ms saved (see :func:`prunekit.plan.knapsack.solve`), then the whole pruned model is
        measured and the predicted budget corrected (at most ``rounds`` measurements: by the measured ratio
        until two plans bracket the goal, then by interpolating between them; the first plan within 2 % of
        the goal, else the closest one under goal + 2 %, else the fastest)."""
        from ..plan.knapsack import solve
        t, lm = self.target, self.latency_model
        goal = 1.0 - s  # fraction of the ORIGINAL measured latency to keep
        # trials are measured interleaved with the model as it is now (paired: drift cancels); after earlier
        # steps the model's own fraction of the original comes from the baseline measured before the first
        cur = 1.0 if not self.history else self._measure(self.model) / max(self.base_latency, 1e-12)
        tol, rounds, f = 0.02, 6, 1.0
        seen: dict[tuple, tuple[float, dict[int, int]]] = {}  # plan -> (measured ratio, plan): each measured once
        factors: list[tuple[float, float]] = []  # (budget factor, measured ratio)
        for _ in range(4 * rounds):  # solves are cheap; measurements (new plans) are limited to ``rounds``
            kept = solve(lm, self.graph, slots, scores, lm.base_ms * goal * f, self.criterion, exhaust=True)
            key = tuple(sorted(kept.items()))
            fresh = key not in seen
            if fresh:
                if len(seen) >= rounds:
                    break
                seen[key] = (cur * self._latency_ratio(kept), kept)
                log.info("latency knapsack: predicted budget x%.3f -> measured %.4f of the original (goal %.4f)", f,
                         seen[key][0], goal)
            r = seen[key][0]
            factors.append((f, r))
            if abs(r - goal) <= tol * goal:
                return kept
            lo = max((x for x in factors if x[1] < goal), default=None)  # the largest budget measured under
            hi = min((x for x in factors if x[1] > goal), default=None)  # the smallest budget measured over
            if lo is not None and hi is not None and lo[0] < hi[0]:  # bracketed: interpolate, or halve if seen
                (f0, r0), (f1, r1) = lo, hi
                nf = f0 + (f1 - f0) * (goal - r0) / (r1 - r0) if fresh and r1 > r0 else (f0 + f1) / 2
                if abs(nf - f0) < 1e-4 * f0 or abs(nf - f1) < 1e-4 * f1:
                    break  # no plan between the two: the staircase of this model
                f = nf
            else:  # a budget that gave a plan already measured moves twice as far
                f *= (goal / max(r, 1e-9)) ** (1 if fresh else 2)
        tried = list(seen.values())
        ok = [x for x in tried if x[0] <= goal * (1 + tol)]
        if not ok:
            r = min(x[0] for x in tried)
            raise ValueError(
                f"{type(t).__name__}({t.ratio}) is not reachable: with the current constraints (ignored modules, "
                f"max_ratio={self.max_ratio}, round_to={self.round_to}, pinned groups) the fastest plan the latency "
                f"model finds measures {r:.4g} of the original latency on {getattr(t, 'backend', 'eager')}; choose a "
                "larger ratio or relax the constraints (time outside the prunable layers cannot be removed)")
        return max(ok, key=lambda x: x[0])[1]

    def _measure(self, model: nn.Module) -> float:
        from ..cost import latency
        t = self.target
        if getattr(t, "method", "search") == "knapsack" and t.kind == "latency":
            # the latency model's own measurement: same backend, device, threads and batch (and its measure_fn
            # when it has one, so a synthetic cost model is consistent with the whole-model checks)
            return self.latency_model.measure_model(model, repeats=t.repeats).median_ms
        res = latency(model, self.example_inputs, device=getattr(t, "device", "cpu"), threads=getattr(t, "threads", None),
                      repeats=getattr(t, "repeats", 10), forward_fn=self.forward_fn)
        return res.median_ms

    @property
    def base_latency(self) -> float:
        """Median latency (ms) of the model when the pruner was created (measured on first use)."""
        if self._base_latency is None:
            if self.history:
                raise RuntimeError("the baseline latency must be measured before the first pruning step")
            self._base_latency = self._measure(self.model)
        return self._base_latency

    def _trial(self, kept: Mapping[int, int]) -> nn.Module | None:
        """A pruned copy of the model with each group at ``kept`` units (which units: irrelevant for timing), or
        None where ``kept`` changes nothing."""
        graph = self.graph
        plan = {gid: graph.group(gid).size - k for gid, k in kept.items() if graph.group(gid).size > k}
        if not plan:
            return None
        return pruned_copy(self.model, graph, {gid: list(range(n)) for gid, n in plan.items()}, verify=False)

    def _latency_ratio(self, kept: Mapping[int, int]) -> float:
        """Measured latency of the model after ``kept`` relative to the model as it is (the latency model's
        backend, device and batch; the two measured interleaved)."""
        trial = self._trial(kept)
        if trial is None:
            return 1.0
        return self.latency_model.measure_ratio(trial, self.model, repeats=getattr(self.target, "repeats", 10))

    def _latency_of(self, kept: Mapping[int, int]) -> float:
        trial = self._trial(kept)
        return self._measure(self.model if trial is None else trial)

    # ------------------------------------------------------------------ acting
    def step(self, sparsity: float | None = None) -> nn.Module:
        """Prune the model (in place, verified) to ``sparsity`` of the target's quantity; returns the model."""
        if self.target.kind == "latency":
            _ = self.base_latency
        graph = self.graph
        plan = self.plan(sparsity)
        before_macs = graph.macs()
        comp = self._compensation(graph, plan) if plan and self.bias_compensation else None
        if plan:
            _prune(self.model, graph, plan, verify=self.verify, biases=comp.biases if comp else None,
                   config=comp.config if comp else None)
            for gid, units in plan.items():
                u = graph.group(gid).unit
                self._removed[u] = self._removed.get(u, 0) + len(units)
            self._graph = None
        entry = {"sparsity": self.target.sparsity if sparsity is None else float(sparsity),
                 "groups_pruned": len(plan), "units_removed": sum(len(u) for u in plan.values()),
                 "macs_before": before_macs, "macs": self.graph.macs(), "params": self.graph.params_kept({})}
        if comp is not None:
            entry.update(bias_compensated=list(comp.compensated), bias_skipped=dict(comp.skipped),
                         bias_unsaveable=list(comp.unsaveable), bias_config=dict(comp.config))
        self.history.append(entry)
        log.info("pruning step: sparsity %.3f, %d units from %d groups, MACs %.4g -> %.4g", entry["sparsity"],
                 entry["units_removed"], entry["groups_pruned"], before_macs, entry["macs"])
        return self.model

    def _compensation(self, graph: PruneGraph, plan: dict[int, list[int]]):
        """Bias updates for ``plan`` (see ``bias_compensation``): the criterion's calibration statistics of this
        analysis when it has them for every layer to compensate, else one no-grad pass over ``data``."""
        from .compensation import bias_compensation, consumers_to_compensate
        from ..plan.importance import collect_input_stats
        names = consumers_to_compensate(self.model, graph, plan)
        stats = getattr(self.criterion, "last_stats", None)
        if stats is None or getattr(stats, "graph", None) is not graph or any(n not in stats for n in names):
            stats = collect_input_stats(self.model, names, self.data, forward_fn=self.forward_fn,
                                        max_batches=getattr(self.criterion, "max_batches", None))
        return bias_compensation(self.model, graph, plan, stats)

    def prune(self) -> nn.Module:
        """One-shot: prune to the target and return the (same, now smaller) model."""
        return self.step(None)

    def __repr__(self) -> str:
        return (f"Pruner(criterion={self.criterion.name!r}, target={self.target}, global={self.global_pruning}, "
                f"round_to={self.round_to}, max_ratio={self.max_ratio}{', uniform=True' if self.uniform else ''})")


def _block_pattern(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``: the module's name in every repeated block."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def _pattern(p: Any, names: Mapping[int, str], what: str) -> str:
    if isinstance(p, nn.Module):
        if id(p) not in names:
            raise ValueError(f"{what}: module {type(p).__name__} is not part of the model")
        return names[id(p)]
    if isinstance(p, str):
        return p
    raise TypeError(f"{what}: expected a module or a name pattern, got {type(p).__name__}")
