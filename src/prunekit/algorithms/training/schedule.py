"""``pk.TrainingPruner``: the epoch schedule that masks towards a MAC target and then removes the masked units
(see :mod:`prunekit.algorithms.training`)."""
from __future__ import annotations

import copy
import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..._callbacks import callback
from ...plan.importance import Criterion, get_criterion
from ...cost import count
from ...surgery import MASKS_ATTR as _MASKS, RECORD_ATTR, apply_masks, mask, module_attr, replay_record
from .. import regularizers as R
from ..optim import rebuild_optimizer, remember_param_names, unwrap
from ..pruner import Pruner
from ...plan.targets import FlopsTarget, LatencyTarget
from ...runs.workdir import ResumeError, Workdir, model_info, read_torch, write_torch
from .config import _inputs_from_shape, load_config
from .distributed import average_scores, broadcast_object
from .masks import MaskHook, _store, keep_masked, masked_to_pruned, masked_units

log = logging.getLogger("prunekit.training")

CHECKPOINT_FORMAT = "prunekit.training"
CHECKPOINT_VERSION = 1


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

    With ``target=pk.LatencyTarget(r, backend=...)`` (or ``latency: {backend: ...}`` in the config) the ramp is on
    the latency instead: each step plans with the latency knapsack of :class:`prunekit.Pruner` on one shared
    :class:`prunekit.LatencyModel` (``latency_model=`` to pass one), and :meth:`latency_fraction` is its prediction.

    ``data`` / ``loss_fn`` are for data-driven criteria (taylor, ...).  Under DDP pass the DDP model:
    scores are averaged over ranks and plans broadcast from rank 0; after the physical removal wrap
    ``pruner.module`` in a new DDP.
    """

    def __init__(self, model: nn.Module, config: Any, example_inputs: Any = None, forward_fn: Callable | None = None,
                 *, optimizer: torch.optim.Optimizer | None = None, data: Any = None,
                 loss_fn: Callable | None = None, target: Any = None, round_to: int | None = None,
                 max_ratio: float | None = None, ignore: Any = None, latency_model: Any = None):
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
            target = FlopsTarget(c["target"]) if c["latency"] is None else LatencyTarget(c["target"], **c["latency"])
            self.pruner = _LayerPruner(self.module, example_inputs, crit, target,
                                       forward_fn=forward_fn, global_pruning=c["global_pruning"],
                                       round_to=c["round_to"], max_ratio=c["max_ratio"], ignore=c["ignore"], data=data,
                                       loss_fn=loss_fn, verify=c["verify"], layers=c["layers"],
                                       latency_model=latency_model)
        except ValueError as e:
            raise ValueError(f"pruning config: {e}") from None
        self.graph = self.pruner.graph
        groups = [s.group for s in self.pruner._slots()]
        if not groups:
            raise ValueError(f"pruning config: no prunable group matches 'layers' = {c['layers']}; "
                             "list source module names (see pk.analyze(model, x).log_groups())")
        log.info("TrainingPruner: %d group(s) eligible; %s target %.3f between epochs %d and %d", len(groups),
                 "MAC" if c["latency"] is None else f"latency ({target.backend})", c["target"], c["start_epoch"],
                 c["end_epoch"])
        self.regularizer = R.from_config(c["regularization"], self.graph, self.module, [g.id for g in groups])
        self.base_macs = self.pruner.base_macs
        self.optimizer = optimizer
        self.hook: MaskHook | None = keep_masked(self.module, optimizer) if optimizer is not None else None
        self.pruned = False
        self.last_epoch: int | None = None
        self.history: list[dict] = []
        self._start = model_info(self.module, shapes=True)  # the model this run starts from (checked on resume)

    # -- schedule
    @property
    def scheduled_epochs(self) -> list[int]:
        c = self.config
        eps = list(range(c["start_epoch"], c["end_epoch"] + 1, c["epoch_rate"]))
        if eps[-1] != c["end_epoch"]:
            eps.append(c["end_epoch"])
        return eps

    def kept_goal(self, epoch: int) -> float:
        """Fraction of the original MACs (or, with a latency target, of the latency) the schedule wants kept after
        the step at ``epoch``."""
        c = self.config
        eps = self.scheduled_epochs
        k = sum(1 for e in eps if e <= epoch)
        frac = k / len(eps)
        if c["schedule"] == "full":
            return max(c["target"], 1.0 - frac)
        return 1.0 - frac * (1.0 - c["target"])

    @property
    def quantity(self) -> str:
        """What the schedule ramps down: ``"macs"`` or ``"latency"`` (config ``latency`` / a ``pk.LatencyTarget``)."""
        return "macs" if self.config["latency"] is None else "latency"

    def kept_fraction(self) -> float:
        """Fraction of the scheduled quantity kept now: :meth:`macs_fraction`, or with a latency target
        :meth:`latency_fraction`."""
        return self.macs_fraction() if self.quantity == "macs" else self.latency_fraction()

    def latency_fraction(self) -> float:
        """Fraction of the original latency kept now, as the shared :class:`prunekit.LatencyModel` predicts it
        (masked units count as removed; built on first use on the target's backend, device and batch size)."""
        lm = self.pruner.latency_model
        if self.pruned:
            from ...cost.latency_model import _widths_of
            return lm.predict_widths(_widths_of(self.module, lm.layers)) / max(lm.base_ms, 1e-12)
        kept = {gid: int((~m).sum()) for gid, m in masked_units(self.module, self.graph).items()}
        return lm.predict(self.graph, kept) / max(lm.base_ms, 1e-12)

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
        before = self.kept_fraction()
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
        macs = self.macs_fraction()
        after = macs if self.quantity == "macs" else self.latency_fraction()
        self.last_epoch = epoch
        entry = {"epoch": epoch, "goal": goal, "macs_fraction": macs, "units_masked": new_units, "pruned": False}
        if self.quantity == "latency":
            entry["latency_fraction"] = after
        log.info("epoch %d: masked %d more unit(s); %s kept %.4f (schedule %.4f, target %.4f)", epoch, new_units,
                 "MACs" if self.quantity == "macs" else "predicted latency", after, goal, c["target"])
        if (epoch >= c["end_epoch"] or after <= c["target"] + 1e-9) and self._sharded():
            log.info("epoch %d: the target is reached; the model is FSDP-sharded, so the masked units are removed "
                     "when you call finalize(into=<unsharded model>) (the masks hold until then)", epoch)
        elif epoch >= c["end_epoch"] or after <= c["target"] + 1e-9:
            self.finalize()
            entry["pruned"] = True
            entry["macs_fraction"] = self.macs_fraction()
            if self.quantity == "latency":
                entry["latency_fraction"] = self.latency_fraction()
        self.history.append(entry)
        return entry

    def _sharded(self) -> bool:
        return any(hasattr(p, "full_tensor") for p in self.module.parameters())

    def finalize(self, optimizer: torch.optim.Optimizer | None = None, *, into: nn.Module | None = None) -> nn.Module:
        """Remove the masked units physically now and rebuild the optimizer; returns the pruned module.

        ``into``: for an FSDP2-sharded model (``fully_shard``; a sharded model cannot be resized in place), a freshly
        built, unsharded model of the same architecture: it receives the gathered weights
        (:func:`prunekit.runs.distributed.full_state_dict`) and the masks, and is pruned and returned (it becomes
        ``self.module``; shard it again to train on).  Every rank must call it (the gathering is collective); every
        rank gets the same pruned model."""
        if self.pruned:
            return self.module
        if into is None and self._sharded():
            raise ValueError("TrainingPruner.finalize: the model's parameters are sharded (FSDP2 fully_shard), and a "
                             "sharded model cannot be resized in place; pass into=<a freshly built unsharded model of "
                             "the same architecture> (every rank): it gets the gathered weights and is pruned")
        opt = optimizer or self.optimizer
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if into is not None:
            from ...runs.distributed import full_state_dict
            store = _store(self.module)
            into.load_state_dict(full_state_dict(self.module))
            full = {fqn: {"mask": st["mask"].cpu().clone(),
                          "orig": (st["orig"].full_tensor() if hasattr(st["orig"], "full_tensor") else st["orig"])
                          .detach().cpu().clone()} for fqn, st in store.items()}
            if hasattr(self.module, RECORD_ATTR):
                object.__setattr__(into, RECORD_ATTR, copy.deepcopy(getattr(self.module, RECORD_ATTR)))
            object.__setattr__(into, _MASKS, full)
            self.model = self.module = into
            opt = optimizer  # the old optimizer holds the sharded parameters: build a new one for the new model
            masked_to_pruned(into, self.example_inputs, forward_fn=self.forward_fn, verify=self.config["verify"])
        else:
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
        """Save model weights, pruner state and (optionally) optimizer state to ``path`` (atomically).

        Under ``torch.distributed`` only rank 0 writes (every rank holds the same model, masks and schedule);
        every rank must call it (the ranks wait for the file before going on)."""
        from ...runs.distributed import barrier, is_main
        if not is_main():
            barrier()
            return
        opt = optimizer or self.optimizer
        ck = {"model": self.module.state_dict(), "pruner": self.state_dict(),
              "optimizer": opt.state_dict() if opt is not None else None, "extra": extra,
              "resume": {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "model": self._start,
                         "config": self.resume_config()}}
        write_torch(path, ck)
        barrier()

    def resume_config(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one (the config as plain JSON values)."""
        c = self.config
        out = {k: v for k, v in c.items() if k not in ("enabled", "verify")}
        out["criterion"] = c["criterion"].name if isinstance(c["criterion"], Criterion) else c["criterion"]
        out["ignore"] = list(self.pruner.ignore)
        return json.loads(json.dumps(out, default=str))

    def _check_resume(self, path: str | Path, ck: Mapping) -> None:
        """The checkpoint was saved by a TrainingPruner of the same model (architecture fingerprint) and config;
        else :class:`prunekit.runs.ResumeError`.  Checkpoints of older releases carry no fingerprint: not checked."""
        saved = ck.get("resume")
        if saved is None:
            return
        p = Path(path)
        wd = Workdir(p.parent, CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, what="a TrainingPruner checkpoint",
                     state_file=p.name)
        if saved.get("format") != CHECKPOINT_FORMAT or int(saved.get("format_version", 0)) > CHECKPOINT_VERSION:
            raise ResumeError(f"{p}: not a TrainingPruner checkpoint of this prunekit (format "
                              f"{saved.get('format')!r}, version {saved.get('format_version')!r})")
        if saved["model"]["fingerprint"] != self._start["fingerprint"]:
            then, now = saved["model"].get("shapes", {}), self._start["shapes"]
            diff = [f"{k}: saved {then[k]}, now {now[k]}" for k in then if k in now and now[k] != then[k]][:3]
            diff += [f"{k} missing" for k in then if k not in now][:2] + [f"{k} unexpected" for k in now
                                                                          if k not in then][:2]
            if saved["model"]["class"] != self._start["class"]:
                diff.insert(0, f"class: saved {saved['model']['class']}, now {self._start['class']}")
            raise ResumeError(f"{p}: the checkpoint was saved from a different model ({'; '.join(diff)}). Resuming "
                              "needs a TrainingPruner built on a freshly built original model of the same "
                              "architecture and config")
        wd.check_config(saved["config"], self.resume_config(), "Pass the same pruning config to resume.")

    def load_checkpoint(self, path: str | Path, optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Resume from :meth:`save_checkpoint`: architecture (pruning record), weights, masks, schedule and
        optimizer state.  Works on a freshly built original model.  Returns the ``extra`` entries."""
        ck = read_torch(path)
        self._check_resume(path, ck)
        opt = optimizer or self.optimizer
        if opt is not None and opt is not self.optimizer:
            self.attach_optimizer(opt)
        self._sync_structure(ck["pruner"])
        self.module.load_state_dict(ck["model"])
        self.load_state_dict(ck["pruner"])
        if opt is not None and ck.get("optimizer") is not None:
            opt.load_state_dict(ck["optimizer"])
        return ck.get("extra") or {}
