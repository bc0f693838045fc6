"""Pruning-aware training (SIRC-style): regularize, mask towards a MAC target on an epoch schedule, then
remove the masked units physically and keep the optimizer going.

    pruner = pk.TrainingPruner(model, "pruning_config.json", example_inputs=x, optimizer=opt)
    for epoch in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
            pruner.regularize()          # configured regularizer (adds to .grad)
            opt.step()                   # masked units stay zero by themselves (keep_masked)
        pruner.step(epoch)               # masks more units; at end_epoch removes them for real

Building blocks, usable alone:

* :func:`keep_masked` / :class:`MaskHook` -- masks made by ``pk.mask`` survive optimizer steps without the
  user calling ``pk.apply_masks``: gradients of masked entries are zeroed by tensor hooks (so momentum
  and Adam moments do not grow there) and an optimizer step post-hook re-zeros the masked weights and
  their optimizer state.
* :func:`masked_to_pruned` -- turn a masked model into a physically smaller one (verified by ``pk.prune``).
* :class:`TrainingPruner` -- the schedule, configured by a dict / JSON / YAML file (keys in :data:`CONFIG`).

Under ``DistributedDataParallel`` every decision is identical on all ranks: importance scores are
averaged with ``all_reduce`` before ranking and the resulting plan is broadcast from rank 0.
"""
from __future__ import annotations

import copy
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .._callbacks import callback
from ..graph import PruneGraph, analyze
from ..plan.importance import Criterion, get_criterion
from ..plan.importance.base import unit_view
from ..cost import count
from ..surgery import (MASKS_ATTR as _MASKS, RECORD_ATTR, apply_masks, mask, module_attr, normalize_plan,
                       param_drops, prune, replay_record, slice_tensor)
from . import regularizers as R
from .optim import rebuild_optimizer, remember_param_names, unwrap
from .pruner import Pruner
from ..plan.targets import FlopsTarget, Target, deprecated, keep_target
from ..runs.workdir import read_torch, write_torch
from ..analysis.analyzer import module_label

log = logging.getLogger("prunekit.training")


def _store(module: nn.Module) -> dict:
    return getattr(module, _MASKS, None) or {}


# ---------------------------------------------------------------------------- distributed helpers
def _dist_world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def average_scores(scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """All-reduce (mean) per-group scores across ranks when ``torch.distributed`` is initialised."""
    world = _dist_world()
    if world == 1 or not scores:
        return scores
    keys = sorted(scores)
    flat = torch.cat([scores[k].float().reshape(-1) for k in keys])
    backend = torch.distributed.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buf = flat.to(dev)
    torch.distributed.all_reduce(buf)
    buf = (buf / world).cpu()
    out, pos = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = buf[pos:pos + n].reshape(scores[k].shape)
        pos += n
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (identity without ``torch.distributed``)."""
    if _dist_world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------- masks that survive training
class MaskHook:
    """Keeps the masks of ``pk.mask`` in force during training (see :func:`keep_masked`).

    * a tensor hook on every masked parameter multiplies its gradient by the mask, so masked entries get
      zero gradient (no momentum / Adam moment builds up there, weight decay of a zero stays zero);
    * an ``optimizer.register_step_post_hook`` re-applies the masks after every step (anything the
      optimizer moved, e.g. with momentum from before masking, goes back to zero) and, with
      ``zero_state=True``, zeroes the masked entries of per-parameter state tensors (same shape as the
      parameter) too.

    Masks added later with ``pk.mask`` are picked up automatically after the next optimizer step (or
    call :meth:`refresh`).  :meth:`remove` unregisters everything.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, zero_state: bool = True):
        self.module = unwrap(model)
        self.optimizer = optimizer
        self.zero_state = zero_state
        self._grad_handles: dict[str, tuple[int, Any]] = {}
        self._opt_handle = optimizer.register_step_post_hook(self._after_step) if optimizer is not None else None
        self.refresh()

    def _param(self, fqn: str) -> nn.Parameter | None:
        try:
            return self.module.get_parameter(fqn)
        except AttributeError:
            return None

    def refresh(self) -> None:
        """Register gradient hooks on masked parameters that have none yet (or were replaced)."""
        store = _store(self.module)
        for fqn in store:
            p = self._param(fqn)
            if p is None or not p.requires_grad:
                continue
            have = self._grad_handles.get(fqn)
            if have is not None and have[0] == id(p):
                continue
            if have is not None:
                have[1].remove()
            self._grad_handles[fqn] = (id(p), p.register_hook(self._grad_hook(fqn)))

    def _grad_hook(self, fqn: str) -> Callable:
        module = self.module

        def hook(grad: torch.Tensor):
            s = _store(module).get(fqn)
            if s is None or s["mask"].shape != grad.shape:
                return None
            return grad * s["mask"].to(grad.device)
        return hook

    def _after_step(self, optimizer, args, kwargs) -> None:
        apply_masks(self.module)
        store = _store(self.module)
        if self.zero_state and store:
            with torch.no_grad():
                for fqn, s in store.items():
                    p = self._param(fqn)
                    st = optimizer.state.get(p) if p is not None else None
                    for v in (st or {}).values():
                        if isinstance(v, torch.Tensor) and v.shape == s["mask"].shape:
                            v.mul_(s["mask"].to(v.device))
        if store.keys() - self._grad_handles.keys():
            self.refresh()

    def remove(self) -> None:
        for _, h in self._grad_handles.values():
            h.remove()
        self._grad_handles.clear()
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None


def keep_masked(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                zero_state: bool = True) -> MaskHook:
    """Make ``pk.mask``'s masks hold through training without calling ``pk.apply_masks``; returns the
    :class:`MaskHook` (call ``.remove()`` to stop).  Without an optimizer only the gradients are masked."""
    return MaskHook(model, optimizer, zero_state=zero_state)


# ---------------------------------------------------------------------------- masked -> pruned
def masked_units(model: nn.Module, graph: PruneGraph) -> dict[int, torch.Tensor]:
    """{group id: bool [group.size]} -- units whose every member entry is masked (only groups with some)."""
    store = _store(unwrap(model))
    out = {}
    for g in graph.groups:
        if not any(m.fqn in store for m in g.members):
            continue
        full = torch.ones(g.size, dtype=torch.bool)
        for m in g.members:
            s = store.get(m.fqn)
            if s is None:
                full.zero_()
                break
            full &= ~unit_view(m, s["mask"]).any(1).cpu()
        if full.any():
            out[g.id] = full
    return out


def masked_plan(model: nn.Module, graph: PruneGraph) -> dict[int, list[int]]:
    """The plan ``{group id: units}`` that the stored masks describe (whole units of prunable groups)."""
    plan = {}
    for gid, full in masked_units(model, graph).items():
        g = graph.group(gid)
        if not g.prunable:
            log.warning("masked units of group %d (%s) are not removed: the group is not prunable (%s)",
                        gid, ", ".join(map(module_label, g.modules[:3])), g.reason)
            continue
        plan[gid] = full.nonzero().flatten().tolist()
    return plan


def masked_to_pruned(model: nn.Module, graph_or_example_inputs: Any = None, *, forward_fn: Callable | None = None,
                     verify: bool = True) -> nn.Module:
    """Physically remove every masked unit of ``model`` and clear the masks; returns the (same, unwrapped) module.

    The plan is derived from the stored masks: a unit goes when all its entries in every member are
    masked.  ``pk.prune`` then removes it with verification (for exact groups, the smaller model's output
    equals the masked model's to float tolerance; otherwise the model is restored and
    :class:`~prunekit.VerificationError` is raised, masks kept).  Masked entries that are not whole units of
    a prunable group stay as zeros (logged).  Pass the ``PruneGraph`` of the masked model, or example
    inputs to analyse it.  Parameter names are remembered so :func:`prunekit.rebuild_optimizer` can map the
    optimizer afterwards.  A model inside ``DistributedDataParallel`` must be wrapped again afterwards.
    """
    module = unwrap(model)
    if isinstance(graph_or_example_inputs, PruneGraph):
        graph = graph_or_example_inputs
        if graph.model_ref is not module or graph.stale:
            raise ValueError("masked_to_pruned: the PruneGraph belongs to another model or is stale; pass example "
                             "inputs instead to analyse the model as it is now")
    elif graph_or_example_inputs is None and forward_fn is None:
        raise ValueError("masked_to_pruned needs the model's PruneGraph (pk.analyze(model, x)) or example inputs")
    else:
        graph = analyze(module, graph_or_example_inputs, forward_fn)
    store = _store(module)
    if not store:
        log.info("masked_to_pruned: the model has no masks; nothing to remove")
        return module
    plan = masked_plan(module, graph)
    drops = param_drops(graph, normalize_plan(graph, plan)) if plan else {}
    left = 0
    for fqn, s in store.items():
        kept_by_plan = slice_tensor(torch.ones(s["mask"].shape), drops[fqn], "mask").bool() if fqn in drops \
            else torch.ones(s["mask"].shape, dtype=torch.bool)
        left += int((~s["mask"].cpu() & kept_by_plan).sum())
    if left:
        log.warning("masked_to_pruned: %d masked entries are not whole units of a prunable group; they stay zero", left)
    remember_param_names(module)
    if plan:
        prune(module, graph, plan, verify=verify)
        log.info("masked_to_pruned: removed %d unit(s) from %d group(s)", sum(map(len, plan.values())), len(plan))
    object.__delattr__(module, _MASKS)
    if module is not model and isinstance(model, nn.parallel.DistributedDataParallel):
        log.warning("masked_to_pruned: the model is inside DistributedDataParallel; wrap the pruned module "
                    "(ddp.module) in a new DistributedDataParallel before training on")
    return module


# ---------------------------------------------------------------------------- the schedule's pruner
class _MaskAwareCriterion(Criterion):
    """Wraps a criterion for planning on a masked model: scores are averaged across DDP ranks, normalised per
    group over the unmasked units (mean |score|, unless the inner criterion normalises), and masked units
    score below every unmasked unit of every group, so plans always contain the units already masked."""

    def __init__(self, inner: Criterion):
        super().__init__(normalize="mean")  # tells Pruner the scores are comparable across groups already
        self.inner = inner
        self.name = f"{inner.name}(mask-aware)"
        self.needs_data = inner.needs_data

    def scores(self, model, graph, groups=None, **kw):
        raw = average_scores(self.inner.scores(model, graph, groups, **kw))
        masked = masked_units(model, graph)
        out, lows = {}, []
        for gid, s in raw.items():
            s = s.clone().float()
            m = masked.get(gid, torch.zeros(s.numel(), dtype=torch.bool))
            if self.inner.normalize is None and (~m).any():
                s = s / s[~m].abs().mean().clamp_min(1e-12)
            if (~m).any():
                lows.append(s[~m].min())
            out[gid] = (s, m)
        low = float(min(lows)) - 1.0 if lows else -1.0
        return {gid: torch.where(m, torch.full_like(s, low), s) for gid, (s, m) in out.items()}


class _LayerPruner(Pruner):
    """Pruner restricted to groups whose source modules (or, without one, modules) match ``layers`` patterns."""

    def __init__(self, *a, layers=None, **kw):
        self._layers = list(layers) if layers else None
        super().__init__(*a, **kw)

    def _slots(self):
        slots = super()._slots()
        if self._layers is None:
            return slots
        return [s for s in slots if any(fnmatch.fnmatchcase(m, p) for p in self._layers
                                        for m in (s.group.source or s.group.modules))]


# ---------------------------------------------------------------------------- config
CONFIG: dict[str, Any] = {
    "layers": None,            # fnmatch patterns of source modules whose groups are pruned (None: all)
    "start_epoch": 0,          # first pruning epoch
    "end_epoch": 10,           # the MAC target is reached (and units removed physically) at this epoch
    "epoch_rate": 1,           # prune every N epochs between start and end
    "global_pruning": False,   # rank units across groups instead of the same ratio per group
    "round_to": 1,             # kept channels are a multiple of this (as Pruner's round_to; was "block_size")
    "max_ratio": 1.0,          # at most this fraction of a group's units goes (as Pruner's; was "max_pruning_rate")
    "target": None,            # REQUIRED: fraction of the original MACs kept at the end (0.7 = 30% fewer), or a
                               #   pk.FlopsTarget; was "mac_target"
    "ignore": None,            # modules / fnmatch patterns never pruned (as Pruner's ignore)
    "schedule": "linear",      # "linear": kept MACs ramp linearly to the target at end_epoch; "full": ramp as if
                               #   the target were 0 and stop once the target is reached (SIRC's gentler start)
    "criterion": "l2",         # importance criterion (prunekit.importance names)
    "regularization": None,    # {"type": "channel"|"group_lasso"|"slimming"|"growing"|"none", "strength": ...}
    "reset_optimizer": True,   # drop optimizer state after physical removal (else slice it)
    "slice_args": None,        # slice pruning settings, passed through for prunekit.algorithms.slices
    "input_shape": None,       # example input shape(s) when no example_inputs are given
    "enabled": True,           # False: regularize()/step() do nothing
    "verify": True,            # verify the physical removal against the masked model
}


# deprecated config keys (and the spelling of SIRC-style files): old name -> the name of the Pruner vocabulary
OLD_KEYS = {"mac_target": "target", "block_size": "round_to", "max_pruning_rate": "max_ratio"}


class Config(dict):
    """A loaded pruning config (a dict); reading an old key (``cfg["mac_target"]``) gives the new key's value
    with a DeprecationWarning."""

    def __missing__(self, key: str) -> Any:
        new = OLD_KEYS.get(key)
        if new is None:
            raise KeyError(key)
        deprecated(f"pruning config key {key!r}", f"{new!r}")
        return self[new]


def load_config(config: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A complete, checked config from a dict or a ``.json`` / ``.yaml`` / ``.yml`` file (keys: :data:`CONFIG`).

    A seed-style file with the settings under ``"channel_sparsity_args"`` is accepted too (its
    ``"slice_sparsity_args"`` becomes ``slice_args``; its ``mac_target``, ``block_size``, ``max_pruning_rate``
    are read as ``target``, ``round_to``, ``max_ratio``).  In a plain config those old keys still work with a
    ``DeprecationWarning``.  Unknown keys and bad values raise ``ValueError`` naming the key as it was written.
    """
    src = "config"
    if isinstance(config, (str, Path)):
        src = str(config)
        p = Path(config)
        if not p.is_file():
            raise ValueError(f"pruning config file {src} does not exist")
        text = p.read_text()
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    if not isinstance(config, Mapping):
        raise ValueError(f"{src}: a pruning config must be a mapping of settings, got {type(config).__name__}")
    config = dict(config)
    seed_style = "channel_sparsity_args" in config
    if "channel_sparsity_args" in config:
        outer = config
        config = dict(outer.pop("channel_sparsity_args") or {})
        if "slice_sparsity_args" in outer:
            config.setdefault("slice_args", outer.pop("slice_sparsity_args"))
        for k in outer:
            raise ValueError(f"{src}: unknown top-level key {k!r} (expected channel_sparsity_args, slice_sparsity_args)")
    cfg = Config(CONFIG)
    spelled = {k: k for k in CONFIG}  # config key -> as the user wrote it (for messages)
    for k, v in config.items():
        new = OLD_KEYS.get(k)
        if new is not None:
            if new in config:
                raise ValueError(f"{src}: both {k!r} and {new!r} are given; keep {new!r} ({k!r} is its old name)")
            if not seed_style:
                deprecated(f"pruning config key {k!r}", f"{new!r}", stacklevel=4)
            spelled[new] = k
            k = new
        if k not in CONFIG:
            raise ValueError(f"{src}: unknown key {k!r}; allowed keys: {sorted(CONFIG)}")
        cfg[k] = v
    for k, v in (overrides or {}).items():  # TrainingPruner(..., target=..., round_to=...) win over the file
        if v is not None:
            cfg[k], spelled[k] = v, k

    def bad(key, why):
        return ValueError(f"{src}: {spelled[key]!r} {why}, got {cfg[key]!r}")

    def integer(key, lo):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise bad(key, f"must be an integer >= {lo}")

    for k in ("start_epoch", "end_epoch"):
        integer(k, 0)
    integer("epoch_rate", 1)
    integer("round_to", 1)
    if cfg["end_epoch"] < cfg["start_epoch"]:
        raise bad("end_epoch", f"must be >= start_epoch ({cfg['start_epoch']})")
    mt = cfg["target"]
    if mt is None:
        raise ValueError(f"{src}: 'target' is required: the fraction of the original MACs to keep, e.g. 0.7 (or "
                         "pk.FlopsTarget(0.7); 'mac_target' in older configs)")
    if isinstance(mt, Target):
        cfg["target"] = mt = keep_target(mt, "TrainingPruner", ("flops",)).ratio
    if isinstance(mt, bool) or not isinstance(mt, (int, float)) or not 0.0 < mt <= 1.0:
        raise bad("target", "must be the fraction of MACs kept, in (0, 1]")
    mr = cfg["max_ratio"]
    if isinstance(mr, bool) or not isinstance(mr, (int, float)) or not 0.0 < mr <= 1.0:
        raise bad("max_ratio", "must be in (0, 1]")
    if cfg["ignore"] is not None:
        if isinstance(cfg["ignore"], str):
            cfg["ignore"] = [cfg["ignore"]]
        if not isinstance(cfg["ignore"], (list, tuple)):
            raise bad("ignore", "must be a list of modules / module name patterns")
        cfg["ignore"] = list(cfg["ignore"])
    for k in ("global_pruning", "reset_optimizer", "enabled", "verify"):
        if not isinstance(cfg[k], bool):
            raise bad(k, "must be true or false")
    if cfg["schedule"] not in ("linear", "full"):
        raise bad("schedule", "must be 'linear' or 'full'")
    if cfg["layers"] is not None:
        if isinstance(cfg["layers"], str):
            cfg["layers"] = [cfg["layers"]]
        if not isinstance(cfg["layers"], (list, tuple)) or not all(isinstance(x, str) for x in cfg["layers"]) \
                or not cfg["layers"]:
            raise bad("layers", "must be a non-empty list of module names / fnmatch patterns (or null for all)")
        cfg["layers"] = list(cfg["layers"])
    if not isinstance(cfg["criterion"], (str, Criterion)):
        raise bad("criterion", "must be an importance criterion name such as 'l2'")
    if cfg["regularization"] is not None and not isinstance(cfg["regularization"], Mapping):
        raise bad("regularization", "must be a mapping like {'type': 'channel', 'strength': 1e-4}")
    if cfg["regularization"] is not None:
        kind = str(cfg["regularization"].get("type", "none")).lower()
        if kind not in list(R.REGULARIZERS) + ["none"]:
            raise ValueError(f"{src}: 'regularization.type' must be one of {sorted(R.REGULARIZERS) + ['none']}, "
                             f"got {cfg['regularization'].get('type')!r}")
    if cfg["slice_args"] is not None and not isinstance(cfg["slice_args"], Mapping):
        raise bad("slice_args", "must be a mapping of slice-pruning settings")
    if cfg["input_shape"] is not None:
        shp = cfg["input_shape"]
        ok = isinstance(shp, (list, tuple)) and shp and (all(isinstance(d, int) for d in shp) or all(
            isinstance(s, (list, tuple)) and all(isinstance(d, int) for d in s) for s in shp))
        if not ok:
            raise bad("input_shape", "must be a shape [B, C, H, W] or a list of shapes")
    return cfg


def _inputs_from_shape(shape) -> Any:
    if all(isinstance(d, int) for d in shape):
        return torch.randn(*shape)
    return tuple(torch.randn(*s) for s in shape)


def _forward_from_callable(fwd: Callable, module: nn.Module) -> Callable:
    """A ``forward_fn(model, inputs)`` from SIRC's ``forward_fn(inputs)`` (usually ``model.forward``).

    Analysis also runs structural copies of the model (the dry run on meta): a bound ``forward`` of the model
    is re-bound to whichever copy is being run; any other callable runs for the model itself, and copies use
    their own ``__call__``.
    """
    name = getattr(fwd, "__name__", None)
    bound_to_model = getattr(fwd, "__self__", None) in (module,) and name is not None

    def forward_fn(m: nn.Module, inputs: Any):
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if bound_to_model:
            return getattr(unwrap(m), name)(*args)
        return fwd(*args) if unwrap(m) is module else m(*args)
    return forward_fn


# ---------------------------------------------------------------------------- the training pruner
class TrainingPruner:
    """Pruning-aware training towards a MAC target (SIRC's channel pruning schedule).

    ``config``: a dict or a JSON/YAML file with the keys of :data:`CONFIG` (see :func:`load_config`);
    ``target`` (``pk.FlopsTarget(r)`` or ``r``), ``round_to``, ``max_ratio`` and ``ignore`` given here
    override the config's.
    On the scheduled epochs (``start_epoch``, every ``epoch_rate`` epochs, and ``end_epoch``) :meth:`step`
    masks more units so that the MACs of the model -- counting masked units as removed -- follow a linear
    ramp from 100% to ``target`` at ``end_epoch``; units are chosen by a :class:`prunekit.Pruner` plan
    (``criterion``, ``global_pruning``, ``round_to``, ``max_ratio``, ``ignore``, ``layers``), and units already masked always stay in the plan.  When the target is reached the masked
    units are removed physically (:func:`masked_to_pruned`) and the optimizer, if given, is rebuilt
    (:func:`prunekit.rebuild_optimizer`, state reset per ``reset_optimizer``).  Masks hold through
    training by themselves once an optimizer is known (:func:`keep_masked`).

    ``data`` / ``loss_fn`` are for data-driven criteria (taylor, ...).  Under DDP pass the DDP model:
    scores are averaged over ranks and plans broadcast from rank 0; after the physical removal wrap
    ``pruner.module`` in a new DDP.
    """

    def __init__(self, model: nn.Module, config: Any, example_inputs: Any = None, forward_fn: Callable | None = None,
                 *, optimizer: torch.optim.Optimizer | None = None, data: Any = None,
                 loss_fn: Callable | None = None, target: Any = None, round_to: int | None = None,
                 max_ratio: float | None = None, ignore: Any = None):
        self.model = model
        self.module = unwrap(model)
        self.config = load_config(config, {"target": target, "round_to": round_to, "max_ratio": max_ratio,
                                           "ignore": ignore})
        c = self.config
        if callable(example_inputs) and not isinstance(example_inputs, (torch.Tensor, nn.Module)):
            # SIRC's calling convention: TrainingPruner(model, config, forward_fn) with forward_fn = model.forward
            # (called with the example inputs, which then come from the config's input_shape)
            fwd = example_inputs
            example_inputs = None
            if forward_fn is None:
                forward_fn = _forward_from_callable(fwd, self.module)
            if c["input_shape"] is None:
                raise ValueError("TrainingPruner(model, config, forward_fn): with a forward function in third place the "
                                 "example inputs come from 'input_shape' in the config (e.g. [1, 3, 224, 224]); "
                                 "add it, or pass example_inputs=...")
        if example_inputs is None and forward_fn is None:
            if c["input_shape"] is None:
                raise ValueError("TrainingPruner needs example_inputs (e.g. torch.randn(1, 3, 224, 224)), a forward_fn, "
                                 "or 'input_shape' in the config")
            example_inputs = _inputs_from_shape(c["input_shape"])
        if example_inputs is None and c["input_shape"] is not None:
            example_inputs = _inputs_from_shape(c["input_shape"])
        callback(forward_fn, "forward_fn", "TrainingPruner", ("model", "inputs"), required=2, positional=True,
                 accepted=["forward_fn(model, inputs)", "a function of the inputs alone (model.forward) in third "
                           "place: TrainingPruner(model, config, model.forward)"])
        callback(loss_fn, "loss_fn", "TrainingPruner", ("model", "batch"), required=2, positional=True)
        self.example_inputs, self.forward_fn = example_inputs, forward_fn
        if c["slice_args"] is not None:
            log.info("slice_args given: slice pruning is done by prunekit.algorithms.slices; TrainingPruner keeps the "
                     "settings in .slice_args and does not act on them")
        self.slice_args = c["slice_args"]
        crit = _MaskAwareCriterion(get_criterion(c["criterion"]))
        try:
            self.pruner = _LayerPruner(self.module, example_inputs, crit, FlopsTarget(c["target"]),
                                       forward_fn=forward_fn, global_pruning=c["global_pruning"],
                                       round_to=c["round_to"], max_ratio=c["max_ratio"], ignore=c["ignore"], data=data,
                                       loss_fn=loss_fn, verify=c["verify"], layers=c["layers"])
        except ValueError as e:
            raise ValueError(f"pruning config: {e}") from None
        self.graph = self.pruner.graph
        groups = [s.group for s in self.pruner._slots()]
        if not groups:
            raise ValueError(f"pruning config: no prunable group matches 'layers' = {c['layers']}; "
                             "list source module names (see pk.analyze(model, x).log_groups())")
        log.info("TrainingPruner: %d group(s) eligible; MAC target %.3f between epochs %d and %d",
                 len(groups), c["target"], c["start_epoch"], c["end_epoch"])
        self.regularizer = R.from_config(c["regularization"], self.graph, self.module, [g.id for g in groups])
        self.base_macs = self.pruner.base_macs
        self.optimizer = optimizer
        self.hook: MaskHook | None = keep_masked(self.module, optimizer) if optimizer is not None else None
        self.pruned = False
        self.last_epoch: int | None = None
        self.history: list[dict] = []

    # -- schedule
    @property
    def scheduled_epochs(self) -> list[int]:
        c = self.config
        eps = list(range(c["start_epoch"], c["end_epoch"] + 1, c["epoch_rate"]))
        if eps[-1] != c["end_epoch"]:
            eps.append(c["end_epoch"])
        return eps

    def kept_goal(self, epoch: int) -> float:
        """Fraction of the original MACs the schedule wants kept after the step at ``epoch``."""
        c = self.config
        eps = self.scheduled_epochs
        k = sum(1 for e in eps if e <= epoch)
        frac = k / len(eps)
        if c["schedule"] == "full":
            return max(c["target"], 1.0 - frac)
        return 1.0 - frac * (1.0 - c["target"])

    def macs_fraction(self) -> float:
        """Fraction of the original MACs kept now (masked units count as removed)."""
        if self.pruned:
            return count(self.module, self.example_inputs, self.forward_fn).macs / max(1, self.base_macs)
        kept = {gid: int((~m).sum()) for gid, m in masked_units(self.module, self.graph).items()}
        return self.graph.macs_kept(kept) / max(1, self.base_macs)

    # -- training hooks
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` for keeping masks and for the rebuild after removal."""
        if self.hook is not None:
            self.hook.remove()
        self.optimizer = optimizer
        self.hook = keep_masked(self.module, optimizer) if not self.pruned else None

    def regularize(self) -> None:
        """Apply the configured regularizer (call after ``loss.backward()``); nothing once pruned."""
        if self.regularizer is None or self.pruned or not self.config["enabled"]:
            return
        self.regularizer.step(self.module)

    def step(self, epoch: int, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Run the schedule for ``epoch`` (call once per epoch, e.g. at its end). Returns what was done or None."""
        c = self.config
        if optimizer is not None and optimizer is not self.optimizer:
            self.attach_optimizer(optimizer)
        if self.pruned or not c["enabled"] or epoch < c["start_epoch"]:
            return None
        if epoch <= c["end_epoch"] and epoch not in self.scheduled_epochs:
            return None
        if self.last_epoch is not None and epoch <= self.last_epoch:
            return None  # already done (e.g. resumed)
        goal = self.kept_goal(epoch)
        before = self.macs_fraction()
        new_units = 0
        if before > goal + 1e-9:
            try:
                plan = self.pruner.plan(1.0 - goal)
            except ValueError as e:
                raise ValueError(f"pruning config: epoch {epoch}: {e} (see 'target' (mac_target), "
                                 "'max_ratio' (max_pruning_rate), 'layers', 'round_to' (block_size))") from None
            plan = broadcast_object(plan)
            already = masked_units(self.module, self.graph)
            add = {}
            for gid, units in plan.items():
                have = already.get(gid)
                new = [u for u in units if have is None or not bool(have[u])]
                if new:
                    add[gid] = new
            if add:
                mask(self.module, self.graph, add)
                new_units = sum(map(len, add.values()))
                if self.hook is not None:
                    self.hook.refresh()
        after = self.macs_fraction()
        self.last_epoch = epoch
        entry = {"epoch": epoch, "goal": goal, "macs_fraction": after, "units_masked": new_units, "pruned": False}
        log.info("epoch %d: masked %d more unit(s); MACs kept %.4f (schedule %.4f, target %.4f)", epoch, new_units,
                 after, goal, c["target"])
        if epoch >= c["end_epoch"] or after <= c["target"] + 1e-9:
            self.finalize()
            entry["pruned"] = True
            entry["macs_fraction"] = self.macs_fraction()
        self.history.append(entry)
        return entry

    def finalize(self, optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
        """Remove the masked units physically now and rebuild the optimizer; returns the pruned module."""
        if self.pruned:
            return self.module
        opt = optimizer or self.optimizer
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        masked_to_pruned(self.module, self.graph, verify=self.config["verify"])
        self.pruned = True
        if opt is not None:
            rebuild_optimizer(opt, self.module, reset=self.config["reset_optimizer"])
        log.info("TrainingPruner: units removed physically; optimizer %s", "rebuilt" if opt is not None else "not given")
        return self.module

    # -- resume
    def state_dict(self) -> dict:
        """Schedule state, masks and pruning record (plain tensors, lists and dicts)."""
        store = _store(self.module)
        return {
            "config": {k: v for k, v in self.config.items() if not isinstance(v, Criterion)},
            "last_epoch": self.last_epoch,
            "pruned": self.pruned,
            "masks": {fqn: s["mask"].cpu().clone() for fqn, s in store.items()},
            "record": copy.deepcopy(getattr(self.module, RECORD_ATTR, None) or []),
            "regularizer": self.regularizer.state_dict() if self.regularizer is not None else None,
            "history": list(self.history),
        }

    def _sync_structure(self, state: Mapping) -> None:
        """Bring the model to the recorded pruned architecture (fresh original model + pruned checkpoint)."""
        rec = state.get("record") or []
        have = len(getattr(self.module, RECORD_ATTR, None) or [])
        if len(rec) > have:
            remember_param_names(self.module)
            replay_record(self.module, rec[have:])
            if self.optimizer is not None:
                rebuild_optimizer(self.optimizer, self.module, reset=True)

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` (replays the pruning record on an unpruned model, re-applies the masks)."""
        self._sync_structure(state)
        self.last_epoch = state.get("last_epoch")
        self.pruned = bool(state.get("pruned"))
        self.history = list(state.get("history") or [])
        if self.regularizer is not None and state.get("regularizer") is not None:
            self.regularizer.load_state_dict(state["regularizer"])
        if hasattr(self.module, _MASKS):
            object.__delattr__(self.module, _MASKS)
        masks = state.get("masks") or {}
        if masks:
            store = {}
            for fqn, m in masks.items():
                t = getattr(*module_attr(self.module, fqn))
                if tuple(t.shape) != tuple(m.shape):
                    raise ValueError(f"TrainingPruner.load_state_dict: mask for {fqn} has shape {tuple(m.shape)} but "
                                     f"the model has {tuple(t.shape)}; the state belongs to another model")
                store[fqn] = {"mask": m.to(t.device).bool(), "orig": t.detach().clone()}
            object.__setattr__(self.module, _MASKS, store)
            apply_masks(self.module)
        if self.pruned and self.hook is not None:
            self.hook.remove()
            self.hook = None
        elif self.hook is not None:
            self.hook.refresh()

    def save_checkpoint(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None,
                        **extra: Any) -> None:
        """Save model weights, pruner state and (optionally) optimizer state to ``path`` (atomically)."""
        opt = optimizer or self.optimizer
        ck = {"model": self.module.state_dict(), "pruner": self.state_dict(),
              "optimizer": opt.state_dict() if opt is not None else None, "extra": extra}
        write_torch(path, ck)

    def load_checkpoint(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Resume from :meth:`save_checkpoint`: architecture (pruning record), weights, masks, schedule and
        optimizer state.  Works on a freshly built original model.  Returns the ``extra`` entries."""
        ck = read_torch(path)
        opt = optimizer or self.optimizer
        if opt is not None and opt is not self.optimizer:
            self.attach_optimizer(opt)
        self._sync_structure(ck["pruner"])
        self.module.load_state_dict(ck["model"])
        self.load_state_dict(ck["pruner"])
        if opt is not None and ck.get("optimizer") is not None:
            opt.load_state_dict(ck["optimizer"])
        return ck.get("extra") or {}


__all__ = ["CONFIG", "MaskHook", "TrainingPruner", "average_scores", "broadcast_object", "keep_masked",
           "load_config", "masked_plan", "masked_to_pruned", "masked_units", "unwrap"]
