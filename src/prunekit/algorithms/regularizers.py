"""Sparsity regularizers for pruning-aware training, and an L2-norm histogram tool to watch them work.

Every regularizer works over the *groups* of a :class:`~prunekit.graph.PruneGraph` (a unit's weights
are all the parameter slices the group owns: producer rows, consumer columns, norm scales, biases),
except :class:`BNSlimming`, which works on normalisation layers.  Each has two equivalent entry points;
use ONE of them per training iteration:

* ``reg.loss(model)`` -- a differentiable scalar to add to the training loss before ``backward()``;
* ``reg.step(model)`` -- call after ``loss.backward()`` (and before ``optimizer.step()``): adds the
  gradient of that same penalty to every parameter's ``.grad``.

``step`` computes the penalty's gradient with autograd, so both entry points act identically; the
closed forms are given per class.  Under ``DistributedDataParallel`` call ``step`` after
``backward()`` (the penalty's gradient depends only on the weights, which DDP keeps identical on every
rank, so no extra communication is needed).

    graph = pk.analyze(model, x)
    reg = GroupLasso(graph, lam=1e-4)
    loss = criterion(model(x), y); loss.backward(); reg.step(model); optimizer.step()
"""
from __future__ import annotations

import fnmatch
import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..plan.importance import get_criterion
from ..plan.importance.base import get_param, is_norm, resolve_groups, unit_view
from ..analysis.analyzer import Group
from .optim import unwrap

log = logging.getLogger("prunekit.regularizers")

Lookup = Callable[[str], "torch.Tensor | None"]


def _model_lookup(model: nn.Module) -> Lookup:
    """Trainable float parameters by name (buffers, integer and frozen tensors do not take part)."""
    def lookup(fqn: str):
        p = get_param(model, fqn)
        return p if p is not None and p.requires_grad else None
    return lookup


def unit_sq_norms(group: Group, lookup: Lookup) -> torch.Tensor | None:
    """Per-unit squared L2 norm of everything ``group`` owns: ``sum over members of ||unit_view(member)[u]||^2``.

    ``lookup(fqn)`` returns the tensor for a member (a parameter, or a state-dict entry) or None to skip
    it.  Differentiable when the tensors require grad.  None if no member takes part.
    """
    total = None
    for m in group.members:
        t = lookup(m.fqn)
        if t is None:
            continue
        v = unit_view(m, t).pow(2).sum(1)
        total = v if total is None else total + v
    return total


class Regularizer:
    """Base class: subclasses define ``_penalty(model)`` (a differentiable scalar or None)."""

    def __init__(self, graph=None, groups: Iterable[Group | int] | None = None):
        self.graph = graph
        self.groups: list[Group] = resolve_groups(graph, groups) if graph is not None else []
        self.calls = 0

    def _penalty(self, model: nn.Module) -> torch.Tensor | None:
        raise NotImplementedError

    def _tick(self) -> None:
        self.calls += 1

    def loss(self, model: nn.Module) -> torch.Tensor:
        """The penalty as a differentiable scalar (add it to the training loss)."""
        module = unwrap(model)
        self._check(module)
        self._tick()
        out = self._penalty(module)
        if out is None:
            p = next(module.parameters(), None)
            return torch.zeros((), device=p.device if p is not None else "cpu")
        return out

    def step(self, model: nn.Module) -> None:
        """Add the penalty's gradient to ``.grad`` of the parameters (call after ``loss.backward()``)."""
        module = unwrap(model)
        self._check(module)
        self._tick()
        params = [p for p in module.parameters() if p.requires_grad]
        with torch.enable_grad():
            pen = self._penalty(module)
        if pen is None or not pen.requires_grad:
            return
        grads = torch.autograd.grad(pen, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g)

    def _check(self, module: nn.Module) -> None:
        if self.graph is not None and getattr(self.graph, "stale", False):
            raise ValueError(f"{type(self).__name__}: the model was pruned after its PruneGraph was built; "
                             "create the regularizer again from pk.analyze() of the pruned model")

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: Mapping) -> None:
        self.calls = int(state.get("calls", 0))


class GroupLasso(Regularizer):
    """Group lasso over pruning units: ``lam * sum_groups sum_units sqrt(||w_u||^2 + eps)``.

    ``w_u`` is every trainable parameter entry unit ``u`` owns across all members of its group, so a
    whole coupled channel (producer filter, BN scale/shift, consumer columns) is driven to zero together.
    Gradient: ``lam * w / sqrt(||w_u||^2 + eps)`` on those entries.
    """

    def __init__(self, graph, lam: float = 1e-4, *, groups: Iterable[Group | int] | None = None, eps: float = 1e-8):
        super().__init__(graph, groups)
        self.lam, self.eps = _positive("lam", lam), float(eps)

    def _penalty(self, model):
        lookup = _model_lookup(model)
        terms = [sq.add(self.eps).sqrt().sum() for g in self.groups if (sq := unit_sq_norms(g, lookup)) is not None]
        return self.lam * torch.stack(terms).sum() if terms else None


class BNSlimming(Regularizer):
    """Network slimming (Liu et al. 2017): ``lam * sum |gamma|`` over the scales of normalisation layers
    (BatchNorm, GroupNorm, LayerNorm, ... -- every module :func:`prunekit.importance.base.is_norm` accepts).
    Gradient: ``lam * sign(gamma)``.  ``modules``: names or fnmatch patterns to restrict it (default all).
    """

    def __init__(self, model: nn.Module, lam: float = 1e-4, *, modules: Sequence[str] | None = None):
        super().__init__(None, None)
        self.lam = _positive("lam", lam)
        pats = list(modules) if modules is not None else None
        self.names = [n for n, m in unwrap(model).named_modules() if is_norm(m) and isinstance(
            getattr(m, "weight", None), nn.Parameter) and (pats is None or any(fnmatch.fnmatchcase(n, p) for p in pats))]
        if not self.names:
            log.warning("BNSlimming: the model has no normalisation layer with a scale%s; the penalty is zero",
                        f" matching {pats}" if pats else "")

    def _penalty(self, model):
        ws = []
        for n in self.names:
            try:
                w = model.get_submodule(n).weight
            except AttributeError:
                continue
            if isinstance(w, nn.Parameter) and w.requires_grad:
                ws.append(w.abs().sum())
        return self.lam * torch.stack(ws).sum() if ws else None


class GrowingReg(Regularizer):
    """Growing regularization (GReg-1, Wang et al., ICLR 2021).

    The ``ratio`` lowest-scored units of each group (``criterion``, L1 by default, chosen once at the first
    call; or explicit ``units={gid: [...]}``) get an L2 penalty whose coefficient grows: it starts at
    ``lam0`` and rises by ``delta`` every ``interval`` calls until ``lam_max``; the other units are not
    penalised.  Penalty ``0.5 * lam * sum_{u selected} ||w_u||^2``, i.e. ``grad += lam * w`` on the
    selected units' entries.  Each call of :meth:`step` or :meth:`loss` counts once.
    """

    def __init__(self, graph, lam0: float = 0.0, delta: float = 1e-4, *, ratio: float = 0.5, interval: int = 10,
                 lam_max: float = 1.0, criterion: Any = "l1", groups: Iterable[Group | int] | None = None,
                 units: Mapping[int, Iterable[int]] | None = None):
        super().__init__(graph, groups)
        self.lam0, self.delta, self.lam_max = _positive("lam0", lam0), _positive("delta", delta), \
            _positive("lam_max", lam_max)
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"GrowingReg: ratio (fraction of each group's units to penalise) must be in [0, 1), "
                             f"got {ratio!r}")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"GrowingReg: interval must be a positive integer number of calls, got {interval!r}")
        self.ratio, self.interval = float(ratio), interval
        self.criterion = criterion
        self.units: dict[int, list[int]] | None = (
            {int(g): sorted(int(u) for u in us) for g, us in units.items()} if units is not None else None)

    @property
    def lam(self) -> float:
        """The current coefficient: ``min(lam_max, lam0 + delta * (calls // interval))``."""
        return min(self.lam_max, self.lam0 + self.delta * (self.calls // self.interval))

    def select(self, model: nn.Module) -> dict[int, list[int]]:
        """The units that are penalised ({group id: units}); chosen on first use."""
        if self.units is None:
            scores = get_criterion(self.criterion).scores(unwrap(model), self.graph, self.groups)
            self.units = {}
            for g in self.groups:
                n = int(math.floor(self.ratio * g.size))
                if n:
                    self.units[g.id] = torch.argsort(scores[g.id], stable=True)[:n].sort().values.tolist()
        return self.units

    def _penalty(self, model):
        sel = self.select(model)
        lookup = _model_lookup(model)
        terms = []
        for g in self.groups:
            if g.id not in sel:
                continue
            sq = unit_sq_norms(g, lookup)
            if sq is not None:
                terms.append(sq[torch.as_tensor(sel[g.id], dtype=torch.long, device=sq.device)].sum())
        return 0.5 * self.lam * torch.stack(terms).sum() if terms else None

    def state_dict(self) -> dict:
        return {"calls": self.calls, "units": self.units}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        u = state.get("units")
        self.units = {int(g): list(v) for g, v in u.items()} if u is not None else None


class ChannelReg(Regularizer):
    """Channel regularization of SIRC's pruning-aware training (Torch-Pruning's group-norm sparse training).

    For each group, with ``imp_c`` the group L2 norm of unit ``c`` (``sqrt`` of :func:`unit_sq_norms`,
    recomputed from the current weights at every call, no gradient through it)::

        gamma_c = alpha ** ((max(imp) - imp_c) / (max(imp) - min(imp)))     (gamma_c = 1 if max == min)
        grad   += reg * gamma_c * w       for every trainable entry w that unit c owns (all members)

    so the most important unit of a group gets ``reg * w`` (plain weight decay) and the least important
    ``alpha`` times more (``alpha > 1`` pushes weak channels harder).  As a loss this is
    ``0.5 * reg * sum_c gamma_c * ||w_c||^2``.  Defaults: ``alpha=4``, ``reg=1e-4``.
    """

    def __init__(self, graph, alpha: float = 4.0, reg: float = 1e-4, *, groups: Iterable[Group | int] | None = None):
        super().__init__(graph, groups)
        self.alpha = _positive("alpha", alpha)
        if self.alpha == 0:
            raise ValueError("ChannelReg: alpha must be > 0 (gamma = alpha ** x)")
        self.reg = _positive("reg", reg)

    def gamma(self, sq: torch.Tensor) -> torch.Tensor:
        """Per-unit factor from per-unit squared norms (the formula above)."""
        imp = sq.detach().float().sqrt()
        span = imp.max() - imp.min()
        if span <= 0:
            return torch.ones_like(imp)
        return self.alpha ** ((imp.max() - imp) / span)

    def _penalty(self, model):
        lookup = _model_lookup(model)
        terms = []
        for g in self.groups:
            sq = unit_sq_norms(g, lookup)
            if sq is not None:
                terms.append((self.gamma(sq).to(sq.dtype) * sq).sum())
        return 0.5 * self.reg * torch.stack(terms).sum() if terms else None


def _positive(name: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {v!r}") from None
    if not f >= 0 or math.isinf(f):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return f


# ---------------------------------------------------------------------------- from a config entry
REGULARIZERS = {"channel": ChannelReg, "group_lasso": GroupLasso, "slimming": BNSlimming, "growing": GrowingReg}
_REG_KEYS = {  # config key -> constructor argument
    "channel": {"strength": "reg", "reg": "reg", "alpha": "alpha"},
    "group_lasso": {"strength": "lam", "lam": "lam", "eps": "eps"},
    "slimming": {"strength": "lam", "lam": "lam", "modules": "modules"},
    "growing": {"strength": "lam0", "lam0": "lam0", "delta": "delta", "ratio": "ratio", "interval": "interval",
                "lam_max": "lam_max", "criterion": "criterion"},
}


def from_config(cfg: Mapping | None, graph, model: nn.Module, groups: Iterable[Group | int] | None = None
                ) -> Regularizer | None:
    """A regularizer from a config entry ``{"type": "channel" | "group_lasso" | "slimming" | "growing" | "none",
    "strength": ..., <type-specific keys>}`` (``strength`` is ``reg`` for channel, ``lam`` for group_lasso and
    slimming, ``lam0`` for growing).  Unknown types/keys raise ``ValueError`` naming them."""
    if cfg is None:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"config 'regularization' must be a mapping like {{'type': 'channel', 'strength': 1e-4}}, "
                         f"got {cfg!r}")
    kind = str(cfg.get("type", "")).lower()
    if kind in ("none", ""):
        return None
    if kind not in REGULARIZERS:
        raise ValueError(f"config 'regularization.type' must be one of {sorted(REGULARIZERS) + ['none']}, "
                         f"got {cfg.get('type')!r}")
    keys = _REG_KEYS[kind]
    kw = {}
    for k, v in cfg.items():
        if k == "type":
            continue
        if k not in keys:
            raise ValueError(f"config 'regularization.{k}' is not an option of the {kind!r} regularizer; "
                             f"allowed: {sorted(keys)}")
        kw[keys[k]] = v
    try:
        if kind == "slimming":
            return BNSlimming(model, **kw)
        return REGULARIZERS[kind](graph, groups=groups, **kw)
    except ValueError as e:
        raise ValueError(f"config 'regularization' ({kind}): {e}") from None


# ---------------------------------------------------------------------------- L2-norm histograms
def _state_lookup(state: Mapping[str, torch.Tensor], params: set[str]) -> Lookup:
    def lookup(fqn: str):
        t = state.get(fqn) if fqn in params else None  # parameters only, as for the model (no running stats)
        return t.detach().float() if isinstance(t, torch.Tensor) and t.is_floating_point() else None
    return lookup


def _load_state(ck: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(ck, (str, Path)):
        ck = torch.load(ck, map_location="cpu", weights_only=True)
    if not isinstance(ck, Mapping):
        raise ValueError(f"l2_histograms: a checkpoint must be a file path or a state dict, got {type(ck).__name__}")
    for key in ("model", "state_dict", "model_state_dict"):  # common checkpoint layouts
        if key in ck and isinstance(ck[key], Mapping):
            return ck[key]
    return ck


def l2_histograms(model: nn.Module, graph, path: str | Path | None = None,
                  checkpoints: Sequence[Any] | Mapping[str, Any] | None = None, *, bins: int = 50,
                  groups: Iterable[Group | int] | None = None) -> dict[str, dict[int, torch.Tensor]]:
    """Per-unit L2 norms (all of a unit's trainable slices, as :func:`unit_sq_norms`) of every group.

    Returns ``{label: {group id: norms [group.size]}}``: label ``"model"`` for the model's current
    weights, then one entry per checkpoint (file paths -- labelled by file name -- or state dicts,
    labelled ``"ckpt<i>"``; pass a dict ``{label: checkpoint}`` to choose labels).  Checkpoints must have
    the analysed model's shapes.  With ``path``, one histogram of all units' norms per label is drawn
    into a PNG (needs matplotlib; without it ``ImportError`` says how to install it).  Use it to pick the
    epoch where enough channels have a small norm (SIRC's regularization phase).
    """
    if path is not None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("l2_histograms(path=...) draws with matplotlib, which is not installed: "
                              "pip install matplotlib, or call it without path to get the data only") from None
    gs = resolve_groups(graph, groups)
    module = unwrap(model)

    def current(fqn: str):
        p = get_param(module, fqn)
        return p.detach().float() if p is not None else None
    sources: list[tuple[str, Lookup]] = [("model", current)]
    names = {n for n, _ in module.named_parameters()}
    if isinstance(checkpoints, Mapping):
        items = list(checkpoints.items())
    else:
        items = [(Path(c).name if isinstance(c, (str, Path)) else f"ckpt{i}", c) for i, c in enumerate(checkpoints or [])]
    for label, ck in items:
        sources.append((str(label), _state_lookup(_load_state(ck), names)))
    data: dict[str, dict[int, torch.Tensor]] = {}
    for label, lookup in sources:
        per = {}
        for g in gs:
            sq = unit_sq_norms(g, lookup)
            if sq is not None:
                per[g.id] = sq.sqrt().cpu()
        data[label] = per
    if path is not None:
        fig, axes = plt.subplots(len(data), 1, figsize=(7, 2.2 * len(data)), squeeze=False)
        for ax, (label, per) in zip(axes[:, 0], data.items()):
            vals = torch.cat(list(per.values())).numpy() if per else []
            ax.hist(vals, bins=bins)
            ax.set_title(f"{label}: per-unit L2 norm ({len(vals)} units)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        log.info("wrote L2-norm histograms to %s", path)
    return data


__all__ = ["BNSlimming", "ChannelReg", "GroupLasso", "GrowingReg", "REGULARIZERS", "Regularizer", "from_config",
           "l2_histograms", "unit_sq_norms"]
