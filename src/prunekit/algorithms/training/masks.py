"""Masks that survive training (:class:`MaskHook`, :func:`keep_masked`) and the step from a masked model to a
physically smaller one (:func:`masked_units`, :func:`masked_plan`, :func:`masked_to_pruned`)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn

from ...graph import PruneGraph, analyze
from ...plan.importance.base import unit_view
from ...surgery import (MASKS_ATTR as _MASKS, apply_masks, normalize_plan, param_drops, prune, slice_tensor)
from ..optim import remember_param_names, unwrap
from ...analysis.analyzer import module_label

log = logging.getLogger("prunekit.training")


def _store(module: nn.Module) -> dict:
    return getattr(module, _MASKS, None) or {}


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
