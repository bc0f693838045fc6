"""Learned channel pruning: trainable gates per unit, a differentiable FLOPs loss, then physical removal.

Every eligible prunable group gets one logit per unit (or per gate of ``gate_size`` channels).  The
gates multiply the outputs of the group's *source* layers (the conv/linear/embedding whose output
channels are the group's units) with forward hooks.  Where a source feeds only normalisation layers of
the same group (conv -> BatchNorm), the gate multiplies the norm's output instead: a gate before a
BatchNorm would be normalised away in training (batch statistics) and would let ``beta`` through when
closed, a contribution that vanishes at removal.  For head units the gate repeats over ``head_dim``.

Training adds three losses to the task loss::

    lp = pk.LearnedPruner(model, x, pk.FlopsTarget(0.5), num_steps=2_000)
    lp.prepare()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)   # any optimizer: the gates have their own
    for step, (x, y) in enumerate(data):
        out = model(x)
        proportion, flops_loss, entropy_loss, distill_loss = lp.losses(step)  # a GateLosses named tuple
        loss = task_loss(out, y) + flops_loss + entropy_loss + distill_loss
        opt.zero_grad(); loss.backward(); opt.step()
    small = lp.finalize()          # physically smaller, verified; lp.reached = MACs kept / baseline

* Gates in training mode are relaxed Bernoulli samples (Gumbel/logistic-sigmoid):
  ``g = sigmoid((logit + log u - log(1 - u)) / tau)``, ``u ~ U(0, 1)``, one sample per unit per forward
  (shared by every layer of the group), with ``tau`` annealed geometrically from ``temperature_start``
  to ``temperature_end`` over ``num_steps``.  In eval mode the gates are deterministic and hard:
  ``1`` where ``sigmoid(logit) > 0.5`` and ``0`` elsewhere, so the eval model equals the model that
  :meth:`LearnedPruner.finalize` returns (exactly, for exact groups).
* ``proportion`` = ``graph.macs_kept(expected kept units) / graph.macs()`` where a group's expected kept
  count is ``sum(sigmoid(logit) * block length)``: the same compiled FLOPs polynomial that counts
  the model, differentiable with respect to the logits.
* ``flops_loss = flops_weight * (relu(p - target) + symmetric * |p - target|)``: above the target the
  slope is ``1 + symmetric``; below it a small pull (``symmetric``, default 0.1) brings the proportion
  back up.  While the schedule holds the proportion above the target its gradient presses on every gate
  in proportion to the MACs of its unit, so expensive units are the first to go.
* ``entropy_loss = w(step) * mean(H(sigmoid(logit))) / log 2`` with the binary entropy ``H``; its weight
  grows linearly from 0 to ``entropy_weight`` at ``num_steps``, driving the gates to 0 or 1 so the
  expected proportion becomes the deterministic one.
* ``distill_loss = distill_weight * MSE(student outputs, teacher outputs)`` on the model's final float
  outputs; the teacher is a frozen copy of the model taken at :meth:`prepare`, run on the inputs of
  the student's last forward in the same train/eval mode.  With ``distill_weight=0`` no copy is made.

Reaching the target within ``num_steps``, whatever the optimizer:

* the gate logits are updated by the pruner itself (``gate_lr``, default 0.1): their gradient is taken
  when backward has accumulated it and cleared, so an optimizer the logits were also given to leaves them
  alone; the update is applied before the next forward (or :meth:`~LearnedPruner.finalize`).  It is
  Adam-like with one second moment shared by all gates, so gates whose gradients differ (the cost of
  their unit, its importance to the task) move by different amounts.  ``gate_lr=None``: the gates are
  trained by the optimizer they are given to, as any parameter;
* before every training forward all logits are shifted by one common amount (:meth:`~LearnedPruner.project`)
  so that the proportion follows a schedule: from the initial gates' proportion down to the target over
  the first ``ramp`` fraction of ``num_steps`` (default half), then the target.  The expected proportion
  is held during the ramp; after it the deterministic one takes over, and by ``num_steps`` the hard gates
  keep at most the target of the MACs, as close to it as the units allow.  Learning decides
  which units stay (the logits relative to each other), the shift how many;
* over the same second part the training forward moves from the relaxed gates to the deterministic ones
  (their value, with the relaxed gates' gradient), so that the last steps train the model that
  :meth:`~LearnedPruner.finalize` makes (batch-norm statistics included).

The losses returned by :meth:`LearnedPruner.losses` already include their weights: add them as they
are.  The temperature a forward uses is the one of the last ``global_step`` given to :meth:`losses`
(or :meth:`set_step`).
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._callbacks import callback
from ..capture import flatten_outputs
from ..analysis.modules import is_norm, source_dim, spec_of
from ..graph import PruneGraph, analyze
from ..plan.importance.base import module_and_attr, unit_view
from ..cost import count
from ..analysis.analyzer import Group
from ..surgery import prune
from ..plan.targets import Target, deprecated, keep_target
from .pruner import _pattern, unit_step
from ..analysis.analyzer import module_label
from ..runs import distributed as D

log = logging.getLogger("prunekit.learned")


@dataclass
class _Gate:
    """The trainable gates of one group: a logit per block, and how blocks map onto units."""

    group: Group
    logit: nn.Parameter      # [n_blocks]
    block_len: torch.Tensor  # [n_blocks] float: units in each block
    unit_block: torch.Tensor  # [group.size] long: the block of each unit
    min_units: int = 1  # units that always stay (max_ratio); at least one block

    def floor(self) -> torch.Tensor:
        """The blocks that stay whatever the logits (bool): the highest-logit blocks holding ``min_units`` units
        (ties: the first block), at least one."""
        order = torch.argsort(self.logit.detach(), descending=True, stable=True)
        need = int(torch.searchsorted(torch.cumsum(self.block_len[order], 0),
                                      torch.tensor(float(self.min_units), dtype=self.block_len.dtype,
                                                   device=self.block_len.device)))
        keep = torch.zeros(self.logit.shape, dtype=torch.bool, device=self.logit.device)
        keep[order[:max(1, need + 1)]] = True
        return keep

    def hard(self) -> torch.Tensor:
        """Deterministic block gates (bool): open where sigmoid(logit) > 0.5, and the :meth:`floor` blocks."""
        return (self.logit.detach() > 0) | self.floor()


@dataclass
class _Site:
    """One hooked module: its output channel dim and, per gated group, the unit of each output channel."""

    name: str
    module: nn.Module
    dim: int
    channels: int
    entries: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (gid, unit index per channel)


def _channel_map(member, channels: int, current: torch.Tensor | None) -> torch.Tensor:
    """Unit index per output channel (``size`` = "not in this group"), built with :func:`unit_view`."""
    rows = unit_view(member, torch.arange(channels), dim=0)  # [n_units, channels owned by each unit]
    n_units = rows.shape[0]
    out = torch.full((channels,), n_units, dtype=torch.long) if current is None else current
    out[rows.reshape(-1)] = torch.arange(n_units).repeat_interleave(rows.shape[1])
    return out


def _norm_out_dim(module: nn.Module, weight: torch.Tensor, member_dim: int) -> int | None:
    """Output dim that a norm layer's weight dim ``member_dim`` scales (None for norms we do not know)."""
    spec = spec_of(module)
    if spec is not None and spec.norm and spec.channel_first:  # BatchNorm*, InstanceNorm*, GroupNorm
        return 1
    if hasattr(module, "normalized_shape"):  # LayerNorm, RMSNorm and look-alikes: trailing dims
        return member_dim - weight.dim()
    return None


def _module_consumers(tape) -> dict[str, set[str]]:
    """{module: modules that consume its outputs} from the captured tape ("<output>" for the model outputs)."""
    producer: dict[int, str] = {}
    out: dict[str, set[str]] = {}
    for op in tape.ops:
        for r in op.inputs():
            src = producer.get(r.id)
            if src is not None and src != op.module:
                out.setdefault(src, set()).add(op.module)
        for r in op.outs():
            producer[r.id] = op.module
    for nid in tape.outputs:
        if nid in producer:
            out.setdefault(producer[nid], set()).add("<output>")
    return out


def _source_out_dim(module: nn.Module) -> int:
    """Output dim of a source layer's channels (``ModuleSpec.act_dim``): conv -> 1 (N, C, ...), linear/embedding
    -> last (also for a registered layer that does not say)."""
    spec = spec_of(module)
    return spec.act_dim if spec is not None and spec.act_dim is not None else -1


class GateLosses(NamedTuple):
    """What :meth:`LearnedPruner.losses` returns (unpacks like the 4-tuple of the first releases)."""

    proportion: torch.Tensor  # expected MACs kept / baseline, differentiable in the gate logits
    flops_loss: torch.Tensor
    entropy_loss: torch.Tensor
    distillation_loss: torch.Tensor


class LearnedPruner:
    """Learned channel pruning towards a FLOPs target (trainable gates, see the module docstring).

    Args:
        model: the model to prune; hooks are added by :meth:`prepare` and removed by :meth:`finalize`.
        example_inputs: what ``model`` is called with (tensor, tuple or dict), for analysis and verification.
        target: ``pk.FlopsTarget(r)``, ``r`` the fraction of the baseline MACs to keep, in (0, 1), or
            ``pk.LatencyTarget(r, backend=..., batch_size=...)``: the fraction of the latency to keep as the
            shared :class:`prunekit.LatencyModel` predicts it (measured per layer on that backend when the
            pruner is made, before the gates go in; the prediction is piecewise linear in the expected kept
            widths, so the FLOPs loss becomes a latency loss).  The deprecated spellings
            ``target_flops_ratio=r`` and a bare float ``r`` in this place still work.
        latency_model: a :class:`prunekit.LatencyModel` of ``model`` for a ``LatencyTarget`` (default: built
            from the target's backend, device, threads and batch size).
        num_steps: training steps (``global_step`` values given to :meth:`losses`) over which the target is
            reached and the temperature and entropy weight are annealed.
        forward_fn: ``forward_fn(model, inputs)`` if the model is not called as ``model(inputs)``.
        gate_size: channels gated together (one logit each; a group whose size is not a multiple has one
            shorter trailing gate).  Head and other non-channel units: 1.  ``block_size`` is its deprecated name.
        round_to: kept widths are multiples of this, as for :class:`prunekit.Pruner` (a gate spans a multiple
            of the unit step that gives ``round_to``; with ``gate_size`` their lcm).
        ignore: modules (objects or fnmatch name patterns) whose output channels are never pruned.
        max_ratio: at most this fraction of a gated group's units goes, as for :class:`prunekit.Pruner` (the
            highest-logit gates holding the rest stay open; one gate always does).
        entropy_weight, flops_weight, distill_weight: loss weights (see the module docstring).
        symmetric: weight of the two-sided part of the FLOPs loss (pull back up when under the target).
        temperature_start, temperature_end: relaxation temperature at step 0 and at ``num_steps``.
        init_logit: initial logit of every gate (3.0: gates start ~95% open).
        seed: seeds the gate noise (the run is deterministic given the seed and the data).
        prune_outputs, verify: passed to :func:`prunekit.analyze` / :func:`prunekit.prune`.
        gate_lr: learning rate of the gates' own optimizer (see the module docstring); ``None``: the gates
            are left to the optimizer you give :meth:`parameters` to.
        ramp: fraction of ``num_steps`` over which the kept MACs are lowered to the target (0: at once).

    The torch-dag names work too: ``prepare_for_pruning`` = :meth:`prepare`,
    ``compute_current_proportion_and_pruning_losses(global_step)`` = :meth:`losses`, ``remove_channels`` =
    :meth:`finalize`, ``compute_normalized_flops()`` = MACs of the model now / baseline MACs, and
    :attr:`prunable_proportion`.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, target: Any = None, num_steps: int | None = None, *,
                 forward_fn: Callable | None = None, gate_size: int | None = None, round_to: int = 1,
                 ignore: Iterable[Any] | None = None, max_ratio: float = 1.0,
                 entropy_weight: float = 1.0, flops_weight: float = 3.0, distill_weight: float = 0.0,
                 symmetric: float = 0.1, temperature_start: float = 1.0, temperature_end: float = 0.1,
                 init_logit: float = 3.0, seed: int = 0, prune_outputs: bool = False, verify: bool = True,
                 gate_lr: float | None = 0.1, ramp: float = 0.5, distributed: Any = None,
                 target_flops_ratio: float | None = None, block_size: int | None = None,
                 latency_model: Any = None):
        owner = type(self).__name__
        self.quantity, self.target_spec = "macs", None
        if target_flops_ratio is not None:
            if target is not None:
                raise TypeError(f"{owner}: pass target=pk.FlopsTarget(r) only (target_flops_ratio= is its "
                                "deprecated spelling)")
            deprecated(f"{owner}(target_flops_ratio=r)", "target=pk.FlopsTarget(r)")
            target = float(target_flops_ratio)
        elif isinstance(target, (int, float)) and not isinstance(target, bool):
            deprecated(f"{owner}(model, x, r, num_steps) with a float r", "target=pk.FlopsTarget(r)")
        if target is None:
            raise TypeError(f"{owner} needs a target: target=pk.FlopsTarget(r), r the fraction of MACs to keep")
        if isinstance(target, Target):
            target = keep_target(target, owner, ("flops", "latency"))
            if not target.ratio < 1.0:
                what = "the latency" if target.kind == "latency" else "MACs"
                raise ValueError(f"{owner}: {type(target).__name__} ratio is the fraction of {what} to KEEP and must "
                                 f"be in (0, 1), got {target.ratio!r}")
            target_flops_ratio = target.ratio
            self.quantity = "latency" if target.kind == "latency" else "macs"
            self.target_spec = target
        else:
            target_flops_ratio = target
        if block_size is not None:
            if gate_size is not None:
                raise TypeError(f"{owner}: pass gate_size= only (block_size= is its deprecated spelling)")
            deprecated(f"{owner}(block_size=n)", "gate_size=n (channels per gate; round_to= rounds kept widths)")
            gate_size = block_size
        gate_size = 1 if gate_size is None else gate_size
        if num_steps is None:
            raise TypeError(f"{owner} needs num_steps (training steps over which gates are annealed)")
        if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
            raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
        if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0.0 < max_ratio <= 1.0:
            raise ValueError(f"max_ratio must be in (0, 1], got {max_ratio!r}")
        block_size = gate_size
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner} expects an nn.Module, got {type(model).__name__}")
        if example_inputs is None and forward_fn is None:
            raise ValueError(f"{owner} needs example_inputs (e.g. torch.randn(1, 3, 224, 224)) or a forward_fn")
        if not 0.0 < float(target_flops_ratio) < 1.0:
            raise ValueError(f"target_flops_ratio is the fraction of MACs to KEEP and must be in (0, 1), "
                             f"got {target_flops_ratio!r}")
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"gate_size must be a positive integer, got {block_size!r}")
        if not 0.0 < temperature_end <= temperature_start:
            raise ValueError(f"temperatures must satisfy 0 < temperature_end <= temperature_start, got "
                             f"{temperature_start!r} -> {temperature_end!r}")
        for name, w in (("entropy_weight", entropy_weight), ("flops_weight", flops_weight),
                        ("distill_weight", distill_weight), ("symmetric", symmetric)):
            if float(w) < 0:
                raise ValueError(f"{name} must be >= 0, got {w!r}")
        if gate_lr is not None and not float(gate_lr) > 0:
            raise ValueError(f"gate_lr must be > 0 (or None: the gates are trained by your optimizer), got {gate_lr!r}")
        if not 0.0 <= float(ramp) <= 1.0:
            raise ValueError(f"ramp is the fraction of num_steps over which the FLOPs kept are lowered to "
                             f"target_flops_ratio and must be in [0, 1], got {ramp!r}")
        callback(forward_fn, "forward_fn", type(self).__name__, ("model", "inputs"), required=2, positional=True)
        self.gate_lr = None if gate_lr is None else float(gate_lr)
        self.ramp = float(ramp)
        self._p0 = 1.0  # expected proportion of the initial gates (set by prepare)
        self._pending: dict[int, torch.Tensor] = {}  # gradients the gates' own optimizer has yet to apply
        self._moments: dict[int, torch.Tensor] = {}  # its first moment per gate, and the shared second moment:
        self._second, self._updates = 0.0, 0      # the gates' relative gradient sizes are kept (see _apply_gate_step)
        self._versions: tuple[int, ...] | None = None  # logit versions after the last projection
        self.model = model
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self.target = float(target_flops_ratio)  # fraction of the baseline MACs kept (FlopsTarget ratio)
        self.num_steps = num_steps
        self.gate_size = self.block_size = block_size  # block_size: the name of the first releases
        self.round_to = round_to
        self.max_ratio = float(max_ratio)
        self.entropy_weight, self.flops_weight = float(entropy_weight), float(flops_weight)
        self.distill_weight, self.symmetric = float(distill_weight), float(symmetric)
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        self.init_logit = float(init_logit)
        self.seed = seed
        # under DDP/FSDP the gate gradients are averaged over ranks before each gate update (the gates are the
        # pruner's own tensors, which DDP does not synchronise), so gates and plans are identical on every rank
        self._dist, self._group = D.active(distributed)
        self.verify = verify
        names = {id(m): n for n, m in model.named_modules()}
        self.ignore = [_pattern(p, names, "ignore") for p in (ignore or [])]
        self.graph: PruneGraph = analyze(model, example_inputs, forward_fn, prune_outputs=prune_outputs)
        self.base_macs = self.graph.macs()
        # a LatencyTarget: the cost is the shared latency model's prediction (pk.LatencyModel, measured now,
        # before any gate is inserted), differentiable in the expected kept widths (piecewise linear)
        self.latency_model = latency_model
        if self.quantity == "latency" and latency_model is None:
            from ..cost.latency_model import latency_model_for
            self.latency_model = latency_model_for(model, example_inputs, self.target_spec, graph=self.graph,
                                                   forward_fn=forward_fn)
        # the predicted latency of the ungated model (the widths do not change until finalize)
        self._base_latency = self.latency_model.predict(self.graph, {}) if self.quantity == "latency" else None
        self.groups = self._eligible()
        self.gates: dict[int, _Gate] = {}
        self.sites: list[_Site] = []
        self.teacher: nn.Module | None = None
        self.reached: float | None = None  # the target's quantity kept after finalize (see finalize)
        self.reached_macs: float | None = None
        self.reached_latency: float | None = None
        self.step = 0
        self._handles: list = []
        self._sample: dict[int, torch.Tensor] = {}
        self._gen: torch.Generator | None = None
        self._last_call: tuple | None = None
        self._last_out: Any = None
        self.prepared = self.finalized = False

    # ------------------------------------------------------------------ which groups
    def _eligible(self) -> list[Group]:
        mods = dict(self.model.named_modules())
        out = []
        for g in self.graph.prunable_groups:
            names = g.source or g.modules
            if any(fnmatch.fnmatchcase(m, p) for p in self.ignore for m in names):
                log.debug("group %d ignored (%s)", g.id, ", ".join(names[:3]))
                continue
            if not any(source_dim(mods.get(s)) is not None for s in g.source):
                log.info("group %d (%s) has no source layer to gate: it stays unpruned", g.id, ", ".join(map(module_label, g.modules[:3])))
                continue
            out.append(g)
        return out

    def _block_len(self, g: Group) -> int:
        """Units per gate: ``gate_size`` channels, made a multiple of the ``round_to`` step (see
        :func:`prunekit.algorithms.pruner.unit_step`); head and other non-channel units: 1."""
        if g.unit != "channel":
            return 1
        return math.lcm(self.gate_size, unit_step(g, self.round_to))

    def _blocks(self, g: Group) -> torch.Tensor:
        return torch.arange(g.size) // self._block_len(g)

    def _min_units(self, g: Group) -> int:
        """Units of ``g`` that always stay: at most ``max_ratio`` of them go (as for :class:`prunekit.Pruner`)."""
        return max(1, int(math.ceil(g.size * (1.0 - self.max_ratio) - 1e-9)))

    def _min_kept(self, g: Group) -> int:
        """Fewest units the gates of ``g`` can keep: whole blocks holding :meth:`_min_units`, at least one."""
        n = self._block_len(g)
        return min(g.size, max(n, int(math.ceil(self._min_units(g) / n)) * n))

    def _fraction(self, kept: Mapping[int, Any]) -> Any:
        """The target's quantity kept at ``kept`` (units per group: ints, floats or tensors, differentiable),
        as a fraction of the baseline: MACs, or the latency the latency model predicts."""
        if self.quantity == "latency":
            return self.latency_model.predict(self.graph, kept) / self._base_latency
        return self._macs_fraction(kept)

    def _macs_fraction(self, kept: Mapping[int, Any]) -> Any:
        return self.graph.macs_kept(kept) / self.base_macs if self.base_macs else 1.0

    @property
    def prunable_proportion(self) -> float:
        """Fraction of the baseline MACs (of the predicted latency, for a LatencyTarget) the gates can remove:
        every gated group down to one block."""
        if self.quantity == "macs" and self.base_macs == 0:
            return 0.0
        kept = {g.id: self._min_kept(g) for g in self.groups}
        return 1.0 - float(self._fraction(kept))

    # ------------------------------------------------------------------ prepare
    def prepare(self) -> nn.Module:
        """Create the gate logits, insert the gates (forward hooks) and, for distillation, copy the teacher."""
        if self.prepared:
            raise RuntimeError("prepare() was already called on this " + type(self).__name__)
        if not self.groups:
            raise ValueError("no prunable group can be gated (all pinned, ignored or without a conv/linear source); "
                             "check pk.analyze(model, x).summary() and the ignore patterns")
        reach = 1.0 - self.prunable_proportion
        if self.target < reach - 1e-9:
            what = "predicted latency" if self.quantity == "latency" else "MACs"
            raise ValueError(f"target ratio {self.target} cannot be reached: with every gated group down to one "
                             f"block the model keeps {reach:.1%} of its {what}. Raise the target, ignore fewer "
                             "modules or use a smaller gate_size (or a larger max_ratio)")
        if self.distill_weight > 0:
            self.teacher = copy.deepcopy(self.model)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        mods = dict(self.model.named_modules())
        sites: dict[tuple[str, int], _Site] = {}
        feeds = _module_consumers(self.graph.tape)
        for g in self.groups:
            ref = next(self.model.get_submodule(s).weight for s in g.source if source_dim(mods.get(s)) is not None)
            blocks = self._blocks(g)
            n = int(blocks[-1]) + 1
            logit = nn.Parameter(torch.full((n,), self.init_logit, dtype=ref.dtype if ref.is_floating_point()
                                            else torch.float32, device=ref.device))
            lens = torch.bincount(blocks).to(ref.device, logit.dtype)
            self.gates[g.id] = _Gate(g, logit, lens, blocks.to(ref.device), self._min_units(g))
            norms = set()  # the group's norm layers whose output layout we know
            for m in g.members:
                mname, _, attr = m.fqn.rpartition(".")
                mod = mods.get(mname)
                if attr == "weight" and mname not in g.source and is_norm(mod) and \
                        _norm_out_dim(mod, getattr(mod, attr), m.dim) is not None:
                    norms.add(mname)
            for m in g.members:
                mod, attr = module_and_attr(self.model, m.fqn)
                mname = m.fqn.rpartition(".")[0]
                if mod is None or attr != "weight":
                    continue
                w = getattr(mod, attr)
                if mname in norms:
                    dim = _norm_out_dim(mod, w, m.dim)
                elif mname in g.source and m.dim == source_dim(mod):
                    if feeds.get(mname) and feeds[mname] <= norms:
                        continue  # gated after its norm instead (batch statistics see the ungated channel)
                    dim = _source_out_dim(mod)
                else:
                    continue
                site = sites.setdefault((mname, dim), _Site(mname, mod, dim, w.shape[m.dim]))
                prev = next((i for i, (gid, _) in enumerate(site.entries) if gid == g.id), None)
                if prev is None:
                    site.entries.append((g.id, _channel_map(m, site.channels, None)))
                else:  # a second member of the same group in this weight (e.g. q, k and v rows of one qkv)
                    site.entries[prev] = (g.id, _channel_map(m, site.channels, site.entries[prev][1]))
        self.sites = list(sites.values())
        with torch.no_grad():
            self._p0 = self._proportion_at(self._flat_logits(), 0.0, 0.0)
        if self.gate_lr is not None:
            for gid, g in self.gates.items():
                self._handles.append(g.logit.register_post_accumulate_grad_hook(self._take_grad(gid)))
        for site in self.sites:
            self._handles.append(site.module.register_forward_hook(self._make_hook(site)))
        self._handles.append(self.model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        if self.teacher is not None:
            self._handles.append(self.model.register_forward_hook(self._on_output))
        self.prepared = True
        log.info("learned pruning: %d gated group(s), %d gate(s) on %d layer(s); target %.1f%% of MACs, "
                 "prunable %.1f%%", len(self.gates), sum(g.logit.numel() for g in self.gates.values()),
                 len(self.sites), 100 * self.target, 100 * self.prunable_proportion)
        return self.model

    def _on_call(self, module, args, kwargs):
        self._sample = {}  # one gate sample per unit per forward, shared by every layer of the group
        if module.training and torch.is_grad_enabled():
            self._apply_gate_step()
            self.project()
        else:
            self._sync()
        if self.teacher is not None:
            self._last_call = (args, kwargs)

    def _on_output(self, module, args, out):
        self._last_out = out

    def _make_hook(self, site: _Site):
        def hook(module, args, out):
            if not isinstance(out, torch.Tensor):
                return None
            if out.dim() == 0 or out.shape[site.dim] != site.channels:
                raise RuntimeError(f"learned pruning gate on {site.name}: expected {site.channels} channels in output "
                                   f"dim {site.dim}, got shape {tuple(out.shape)}; was the model changed after "
                                   "LearnedPruning was created? Create it again on the current model")
            gate = None
            for gid, cmap in site.entries:
                g = self._unit_gates(gid, module.training)
                ch = torch.cat([g, g.new_ones(1)])[cmap.to(g.device)]
                gate = ch if gate is None else gate * ch
            shape = [1] * out.dim()
            shape[site.dim] = site.channels
            return out * gate.to(out.device, out.dtype).reshape(shape)
        return hook

    def _take_grad(self, gid: int):
        def hook(logit: torch.Tensor) -> None:
            """Take the gate's gradient as soon as backward accumulated it, and clear it: an optimizer the logits
            were also given to leaves them alone, and the gates move at ``gate_lr`` whatever the user's optimizer."""
            if logit.grad is not None:
                grad = logit.grad.detach()
                self._pending[gid] = grad.clone() if gid not in self._pending else self._pending[gid] + grad
                logit.grad = None
        return hook

    def _apply_gate_step(self) -> bool:
        """One update of the gate logits from the pending gradients (of one or more backward passes).

        Adam-like, with one second moment shared by all gates (the mean square of their gradients): the step
        is normalised as a whole, so the optimizer is scale-free, but a gate whose gradient is twice another's
        still moves twice as far -- the cost of a unit (the FLOPs gradient) and its importance to the task
        are what tell the gates apart.  Steps with a non-finite gradient (a gradient scaler's skipped steps)
        are dropped.
        """
        if not self._pending:
            return False
        pending, self._pending = self._pending, {}
        if self._dist:
            pending = self._average_pending(pending)
        if not all(bool(torch.isfinite(g).all()) for g in pending.values()):
            return False
        b1, b2 = 0.9, 0.999
        self._updates += 1
        sq = sum(float(g.double().pow(2).sum()) for g in pending.values()) / sum(g.numel() for g in pending.values())
        self._second = b2 * self._second + (1 - b2) * sq
        denom = math.sqrt(self._second / (1 - b2 ** self._updates)) + 1e-12
        with torch.no_grad():
            for gid, grad in pending.items():
                m = self._moments.get(gid)
                m = (1 - b1) * grad if m is None else b1 * m + (1 - b1) * grad
                self._moments[gid] = m
                self.gates[gid].logit.sub_(self.gate_lr * (m / (1 - b1 ** self._updates)) / denom)
        return True

    def _average_pending(self, pending: dict) -> dict:
        """The pending gate gradients averaged over the ranks (every gate in id order; a gate without a gradient
        on a rank counts as zero there), identical on every rank."""
        gids = sorted(self.gates)
        parts = []
        for gid in gids:
            g = pending.get(gid)
            n = self.gates[gid].logit.numel()
            parts.append(torch.cat([torch.zeros(n) if g is None else g.detach().float().cpu().reshape(-1),
                                    torch.tensor([float(g is not None)])]))
        tot = D.all_reduce_sum(torch.cat(parts), self._group) / D.world_size(self._group)
        out, pos = {}, 0
        for gid in gids:
            logit = self.gates[gid].logit
            n = logit.numel()
            if tot[pos + n] > 0:
                out[gid] = tot[pos:pos + n].reshape(logit.shape).to(logit.device, logit.dtype)
            pos += n + 1
        return out

    # ------------------------------------------------------------------ gates
    def temperature(self, step: int | None = None) -> float:
        """Relaxation temperature at ``step`` (default: the current step), geometric from start to end."""
        t = min(max((self.step if step is None else step) / self.num_steps, 0.0), 1.0)
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** t

    def set_step(self, global_step: int) -> None:
        """Set the step whose temperature the next forwards use (:meth:`losses` does this too)."""
        self.step = int(global_step)

    def _unit_gates(self, gid: int, training: bool) -> torch.Tensor:
        if gid not in self._sample:
            gate = self.gates[gid]
            if training:
                logit = gate.logit
                if self._gen is None or self._gen.device != logit.device:
                    self._gen = torch.Generator(device=logit.device).manual_seed(self.seed)
                u = torch.rand(logit.shape, generator=self._gen, device=logit.device,
                               dtype=logit.dtype).clamp(1e-6, 1 - 1e-6)
                blocks = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / self.temperature())
                h = self._hardness() if self._versions is not None else 0.0
                if h > 0:  # towards the end the forward sees the deterministic gates (straight-through gradient)
                    blocks = blocks + h * (gate.hard().to(blocks.dtype) - blocks).detach()
            else:
                blocks = gate.hard().to(gate.logit.dtype)
            self._sample[gid] = blocks[gate.unit_block]
        return self._sample[gid]

    def parameters(self) -> Iterator[nn.Parameter]:
        """The gate logits.  With ``gate_lr`` set (the default) the pruner updates them itself and an optimizer
        given them too leaves them alone; with ``gate_lr=None`` give them to your optimizer."""
        if not self.prepared:
            raise RuntimeError("call prepare() first: the gate logits are created there")
        return iter([g.logit for g in self.gates.values()])

    def to(self, device: torch.device | str) -> "LearnedPruner":
        """Move the gates (and the teacher) to ``device`` after moving the model (before building the optimizer)."""
        self._apply_gate_step()
        self._moments = {gid: m.to(device) for gid, m in self._moments.items()}
        for g in self.gates.values():
            g.logit.data = g.logit.data.to(device)
            g.block_len, g.unit_block = g.block_len.to(device), g.unit_block.to(device)
        if self.teacher is not None:
            self.teacher.to(device)
        self._gen = None
        return self

    def probabilities(self) -> dict[int, torch.Tensor]:
        """{group id: sigmoid(logit) per block} (detached)."""
        return {gid: torch.sigmoid(g.logit.detach()) for gid, g in self.gates.items()}

    def kept(self) -> dict[int, int]:
        """{group id: units the deterministic gates keep}."""
        return {gid: int(g.block_len[g.hard()].sum()) for gid, g in self.gates.items()}

    # ------------------------------------------------------------------ losses
    def losses(self, global_step: int) -> GateLosses:
        """``GateLosses(proportion, flops_loss, entropy_loss, distillation_loss)`` after a forward, all scalar
        tensors (a named tuple: ``p, f, e, d = lp.losses(step)`` unpacks it).

        ``proportion`` is the expected MACs kept / baseline (differentiable in the logits) during the ramp,
        moving to the deterministic gates' proportion by ``num_steps`` as the forward does (with the expected
        one's gradient); at the end it is what :meth:`finalize` will reach.  The three losses already carry
        their weights.  Also sets the step for the temperature of later forwards.
        """
        if not self.prepared or self.finalized:
            raise RuntimeError("losses() works between prepare() and finalize()")
        self.set_step(global_step)
        kept, ent = {}, []
        for gid, g in self.gates.items():
            p = torch.sigmoid(g.logit)
            kept[gid] = (p * g.block_len).sum()
            pc = p.clamp(1e-6, 1 - 1e-6)
            ent.append(-(pc * pc.log() + (1 - pc) * (1 - pc).log()) / math.log(2.0))
        ref = next(iter(self.gates.values())).logit
        proportion = torch.as_tensor(self._fraction(kept)).to(ref.dtype)
        h = self._hardness() if self._versions is not None else 0.0
        if h > 0:  # what the training forward runs: the deterministic gates' proportion, the expected one's gradient
            proportion = proportion + h * (self.current_proportion() - proportion.detach())
        gap = proportion - self.target
        flops_loss = self.flops_weight * (F.relu(gap) + self.symmetric * gap.abs())
        ramp = min(max(self.step / self.num_steps, 0.0), 1.0)
        entropy_loss = self.entropy_weight * ramp * torch.cat(ent).mean()
        return GateLosses(proportion, flops_loss, entropy_loss, self._distill_loss(ref))

    def _progress(self, step: int | None = None) -> float:
        """Fraction of ``num_steps`` done after ``step`` (the last ``global_step`` given to :meth:`losses`)."""
        step = self.step if step is None else step
        return min(max((step + 1) / self.num_steps, 0.0), 1.0)

    def scheduled_target(self, step: int | None = None) -> float:
        """The FLOPs proportion the gates are held to at ``step``: the proportion of the initial gates, lowered
        linearly to ``target_flops_ratio`` over the first ``ramp * num_steps`` steps, then ``target_flops_ratio``."""
        t = 1.0 if self.ramp <= 0 else min(self._progress(step) / self.ramp, 1.0)
        return self._p0 - (self._p0 - self.target) * t

    def _hardness(self, step: int | None = None) -> float:
        """Weight of the deterministic gates in the projected proportion: 0 until the ramp ends, 1 at ``num_steps``."""
        return min(max((self._progress(step) - self.ramp) / max(1e-9, 1.0 - self.ramp), 0.0), 1.0)

    def _flat_logits(self) -> dict[str, Any]:
        """All gate logits in one float64 CPU tensor, with what :meth:`_proportion_at` needs to split it by group."""
        gids = list(self.gates)
        z = torch.cat([self.gates[gid].logit.detach().to("cpu", torch.float64) for gid in gids])
        lens = torch.cat([self.gates[gid].block_len.to("cpu", torch.float64) for gid in gids])
        index = torch.cat([torch.full((self.gates[gid].logit.numel(),), i, dtype=torch.long)
                           for i, gid in enumerate(gids)])
        top_len = torch.stack([self.gates[gid].block_len[self.gates[gid].floor()].sum().cpu().double()
                               for gid in gids])  # the units hard() keeps when all are closed (its floor)
        return {"gids": gids, "z": z, "lens": lens, "index": index, "top_len": top_len}

    def _proportion_at(self, flat: Mapping[str, Any], shift: float, hardness: float) -> float:
        """MACs kept / baseline with every logit shifted by ``shift``: expected, hard, or a mix of the two."""
        z, lens, index, gids = flat["z"] + shift, flat["lens"], flat["index"], flat["gids"]
        out = 0.0
        if hardness < 1.0:
            soft = torch.zeros(len(gids), dtype=z.dtype).index_add_(0, index, torch.sigmoid(z) * lens)
            out += (1.0 - hardness) * float(self._fraction(dict(zip(gids, soft.tolist()))))
        if hardness > 0.0:
            hard = torch.zeros(len(gids), dtype=z.dtype).index_add_(0, index, (z > 0).to(z.dtype) * lens)
            hard = torch.maximum(hard, flat["top_len"])  # open blocks and floor are both top blocks by logit
            out += hardness * float(self._fraction(dict(zip(gids, hard.tolist()))))
        return out

    def project(self, step: int | None = None) -> float:
        """Shift every gate logit by one common amount so that the gates meet :meth:`scheduled_target`.

        The proportion held to the schedule is the expected one during the ramp and moves to the deterministic
        (hard) one by ``num_steps``: then the model :meth:`finalize` makes keeps at most ``target_flops_ratio``
        of the MACs, as close to it as the units allow.  The gates learn which units to keep (their logits
        relative to each other); the shift makes them keep as much as the schedule says, whatever optimizer
        and learning rate train them.  Called before every training forward; returns the shift.
        """
        goal = self.scheduled_target(step)
        hardness = self._hardness(step)
        with torch.no_grad():
            logits = self._flat_logits()
            if hardness >= 1.0:
                shift = self._hard_shift(logits, goal)
            else:
                top = float(logits["z"].abs().max()) + 60.0
                lo, hi = -top, top  # everything closed: at most the target (checked in prepare); all open: ~1
                for _ in range(32):  # largest shift whose proportion is at most the goal
                    mid = 0.5 * (lo + hi)
                    if self._proportion_at(logits, mid, hardness) <= goal:
                        lo = mid
                    else:
                        hi = mid
                shift = lo
            for g in self.gates.values():
                g.logit.add_(shift)
        self._versions = self._logit_versions()
        return shift

    def _hard_shift(self, logits: Mapping[str, Any], goal: float) -> float:
        """The shift for the deterministic gates: a step function of the shift, with a step where a logit crosses
        0.  Of the flat parts whose proportion is at most ``goal``, the last; inside it, at most 1 below its
        upper end (so one more small update does not open the next gate) and in its middle if it is narrower."""
        edges = torch.unique(-logits["z"])  # sorted: gate i opens for shift > -z_i
        e = edges.tolist()
        probe = lambda k: e[0] - 1.0 if k == 0 else (e[-1] + 1.0 if k == len(e) else 0.5 * (e[k - 1] + e[k]))  # noqa: E731
        lo, hi = 0, len(e)  # part k lies between edges k-1 and k; part 0 (everything closed) is within the goal
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._proportion_at(logits, probe(mid), 1.0) <= goal:
                lo = mid
            else:
                hi = mid - 1
        if lo == len(e):
            return e[-1] + 1.0
        return e[lo] - 1.0 if lo == 0 else max(0.5 * (e[lo - 1] + e[lo]), e[lo] - 1.0)

    def _logit_versions(self) -> tuple[int, ...]:
        return tuple(g.logit._version for g in self.gates.values())

    def _sync(self) -> None:
        """Apply the pending gate update; once training has projected the gates, project again after any change
        (so an eval forward right after the last step shows the model that :meth:`finalize` makes)."""
        self._apply_gate_step()
        if self._versions is not None and self._versions != self._logit_versions():
            self.project()

    def _distill_loss(self, ref: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return ref.new_zeros(())
        if self._last_call is None or self._last_out is None:
            raise RuntimeError("distillation needs the model's last forward: call model(...) before losses(), or "
                               "pass distill_weight=0 if the model is run through another method")
        args, kwargs = self._last_call
        student = [t for t in flatten_outputs(self._last_out)[0] if t.is_floating_point()]
        dev = student[0].device if student else ref.device
        if next(self.teacher.parameters(), ref).device != dev:
            self.teacher.to(dev)
        self.teacher.train(self.model.training)
        with torch.no_grad():
            teacher = [t for t in flatten_outputs(self.teacher(*args, **kwargs))[0] if t.is_floating_point()]
        self._last_call = self._last_out = None
        if len(teacher) != len(student) or not student:
            raise RuntimeError(f"teacher returned {len(teacher)} float outputs and the student {len(student)}; "
                               "pass distill_weight=0 for models whose outputs change between calls")
        loss = sum(F.mse_loss(s, t.to(s.dtype)) for s, t in zip(student, teacher)) / len(student)
        return self.distill_weight * loss

    def current_proportion(self) -> float:
        """MACs kept / baseline (predicted latency kept, for a LatencyTarget) with the deterministic gates (what
        :meth:`finalize` will reach)."""
        return float(self._fraction(self.kept()))

    # ------------------------------------------------------------------ finalize
    def plan(self) -> dict[int, list[int]]:
        """{group id: units to drop} from the deterministic gates (at least one block kept per group)."""
        out = {}
        for gid, g in self.gates.items():
            keep_unit = g.hard()[g.unit_block].cpu()
            drop = (~keep_unit).nonzero().flatten().tolist()
            if drop:
                out[gid] = drop
        return out

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._sample = {}
        self._last_call = self._last_out = None

    def finalize(self) -> nn.Module:
        """Remove the gates and physically prune the units whose deterministic gate is closed.

        Kept gates are exactly 1 in deterministic mode, so nothing is folded into the weights.  The model
        is pruned in place (and verified by :func:`prunekit.prune`) and returned; ``self.reached_macs`` is its
        MACs / baseline MACs, counted again on the pruned model, ``self.reached_latency`` (LatencyTarget) the
        latency kept as the latency model predicts it, and ``self.reached`` the one of the two the target is in.
        """
        if not self.prepared:
            raise RuntimeError("call prepare() and train before finalize()")
        if self.finalized:
            raise RuntimeError("finalize() was already called")
        self._sync()
        plan = self.plan()
        if self.quantity == "latency":
            self.reached_latency = float(self._fraction(self.kept()))  # predicted by the latency model
        self.remove_hooks()
        prune(self.model, self.graph, plan, verify=self.verify)
        self.finalized = True
        self.teacher = None
        macs = count(self.model, self.example_inputs, self.forward_fn).macs
        self.reached_macs = macs / self.base_macs if self.base_macs else 1.0
        self.reached = self.reached_latency if self.quantity == "latency" else self.reached_macs
        log.info("learned pruning finalized: %d group(s) pruned, MACs %d -> %d (%.1f%% kept, target %.1f%%)",
                 len(plan), self.base_macs, macs, 100 * self.reached, 100 * self.target)
        if self.reached > self.target + 0.05:
            log.warning("learned pruning kept %.1f%% of the MACs, above the %.1f%% target: the gates did not close "
                        "enough (%d of num_steps=%d training steps seen). Train for the num_steps you declared, or "
                        "declare the steps you train for.", 100 * self.reached, 100 * self.target,
                        self.step + 1 if self._versions is not None else 0, self.num_steps)
        return self.model

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Step, gate logits and the state of the gates' own optimizer (for resuming training)."""
        self._apply_gate_step()
        return {"step": self.step, "logits": {gid: g.logit.detach().clone() for gid, g in self.gates.items()},
                "gate_optimizer": {"moments": {gid: m.clone() for gid, m in self._moments.items()},
                                   "second": self._second, "updates": self._updates,
                                   "projected": self._versions is not None}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.prepared:
            raise RuntimeError("call prepare() before load_state_dict()")
        logits = state["logits"]
        if set(int(k) for k in logits) != set(self.gates):
            raise ValueError(f"the checkpoint has gates for groups {sorted(int(k) for k in logits)}, this model for "
                             f"{sorted(self.gates)}: was it made with other ignore/block_size settings?")
        with torch.no_grad():
            for gid, t in logits.items():
                self.gates[int(gid)].logit.copy_(t)
        self.step = int(state.get("step", 0))
        opt = state.get("gate_optimizer")
        if opt is not None:
            self._pending = {}
            self._moments = {int(k): v.to(self.gates[int(k)].logit) for k, v in opt["moments"].items()}
            self._second, self._updates = float(opt["second"]), int(opt["updates"])
            self._versions = self._logit_versions() if opt.get("projected") else None

    # ------------------------------------------------------------------ torch-dag names
    def prepare_for_pruning(self) -> nn.Module:
        """torch-dag's name for :meth:`prepare`."""
        return self.prepare()

    def compute_current_proportion_and_pruning_losses(self, global_step: int) -> GateLosses:
        """torch-dag's name for :meth:`losses`: ``GateLosses(proportion, flops_loss, entropy_loss,
        distillation_loss)``."""
        return self.losses(global_step)

    def remove_channels(self) -> nn.Module:
        """torch-dag's name for :meth:`finalize`."""
        return self.finalize()

    def compute_normalized_flops(self) -> float:
        """MACs of the model as it is now (deterministic gates; after :meth:`finalize` the pruned model) over
        the baseline MACs."""
        if self.finalized:
            return self.reached_macs
        return float(self._macs_fraction(self.kept()))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.groups)} groups, target={self.target}, num_steps={self.num_steps}, "
                f"gate_size={self.gate_size}, round_to={self.round_to}, prepared={self.prepared}, "
                f"finalized={self.finalized})")


class LearnedPruning(LearnedPruner):
    """Deprecated name of :class:`LearnedPruner` (same class, with a DeprecationWarning when created)."""

    def __init__(self, *args: Any, **kwargs: Any):
        deprecated("prunekit.LearnedPruning", "prunekit.LearnedPruner", stacklevel=3)
        super().__init__(*args, **kwargs)
