"""Keep an optimizer working after physical pruning.

``pk.prune`` replaces every pruned parameter by a new, smaller ``nn.Parameter``; an optimizer built
before still points at the old tensors (and its state -- momentum, Adam moments -- has the old shapes).
:func:`rebuild_optimizer` repairs the optimizer *in place* (same object, so LR schedulers, AMP grad
scalers and user references stay valid): each stale parameter is replaced by the model's parameter of
the same name, and every per-parameter state tensor with the old parameter's shape is sliced with the
indices the pruning record says were removed, so training continues exactly where it was.

Names are matched through a snapshot ``{name: parameter}`` taken before pruning: pass it as
``old_named_params=dict(model.named_parameters())``, or call :func:`remember_param_names` before
``pk.prune`` (``pk.masked_to_pruned`` and ``TrainingPruner`` do this for you).
"""
from __future__ import annotations

import logging
import weakref
from typing import Iterable, Mapping

import torch
from torch import nn

from ..surgery import RECORD_ATTR, slice_tensor

log = logging.getLogger("prunekit.optim")

NAMES_ATTR = "_prunekit_param_names"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``, else the model itself."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def remember_param_names(model: nn.Module) -> None:
    """Snapshot the model's parameter names (weak references) so :func:`rebuild_optimizer` can later map the
    optimizer's old parameter objects to the new ones.  Call it before ``pk.prune``."""
    module = unwrap(model)
    snap = {n: weakref.ref(p) for n, p in module.named_parameters(remove_duplicate=False)}
    object.__setattr__(module, NAMES_ATTR, snap)


def slice_like_record(t: torch.Tensor, fqn: str, record: Iterable[Mapping]) -> torch.Tensor:
    """Cut ``t`` (laid out like parameter ``fqn`` was at some point) the way the pruning record cut ``fqn``.

    Record steps are applied in order from the first whose recorded shape for ``fqn`` equals ``t.shape``
    (each step that names ``fqn`` removes something, so that step is unique); a tensor whose shape no step
    expects comes back unchanged.
    """
    for step in record:
        info = step.get("params", {}).get(fqn)
        if info is None:
            continue
        want = info.get("shape")
        if want is not None and list(t.shape) != list(want):
            continue
        dims = {int(d): torch.as_tensor(idx, dtype=torch.long) for d, idx in info["remove"].items()}
        t = slice_tensor(t, dims, "remove")
    return t


def rebuild_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, *, reset: bool = False,
                      old_named_params: Mapping[str, torch.Tensor] | Iterable | None = None
                      ) -> torch.optim.Optimizer:
    """Point ``optimizer`` at ``model``'s current parameters after physical pruning; returns the same object.

    * ``param_groups[i]["params"]`` lists are edited in place (order, hyper-parameters and LR scheduler
      bindings are kept).  Parameters still in the model are left alone; a parameter that the model no
      longer has is replaced by the model's parameter with the same name (``old_named_params`` or the
      snapshot of :func:`remember_param_names`).
    * ``reset=False``: per-parameter state tensors with the old parameter's shape (``exp_avg``,
      ``exp_avg_sq``, ``momentum_buffer``, ...) are sliced with the removed indices from
      ``model._prunekit_record``; scalars such as ``step`` are kept.  ``reset=True`` drops all optimizer
      state (every parameter starts fresh; SIRC found this stabilises fine-tuning after pruning).

    Raises ``ValueError`` if an old parameter cannot be matched to the model (name it and say how to fix).
    """
    module = unwrap(model)
    current = dict(module.named_parameters())
    live_ids = {id(p) for p in current.values()}
    name_of: dict[int, str] = {}
    if old_named_params is not None:
        items = old_named_params.items() if isinstance(old_named_params, Mapping) else old_named_params
        for n, p in items:
            name_of.setdefault(id(p), n)
    else:
        for n, ref in getattr(module, NAMES_ATTR, {}).items():
            p = ref()
            if p is not None:
                name_of.setdefault(id(p), n)
    record = getattr(module, RECORD_ATTR, None) or []
    old_state = optimizer.state
    new_state: dict = {}
    replaced = 0
    for gi, group in enumerate(optimizer.param_groups):
        params = group["params"]
        for j, p in enumerate(list(params)):
            st = old_state.get(p)
            if id(p) in live_ids:
                if st is not None:
                    new_state[p] = st
                continue
            name = name_of.get(id(p))
            if name is None or name not in current:
                if name is None and not name_of:
                    raise ValueError(
                        "rebuild_optimizer: the optimizer holds parameters the model no longer has, and no name map is "
                        "available; pass old_named_params=dict(model.named_parameters()) captured before pk.prune, or "
                        "call prunekit.algorithms.optim.remember_param_names(model) before pruning")
                raise ValueError(f"rebuild_optimizer: param_groups[{gi}] parameter {j} "
                                 f"({name or 'unnamed'}, shape {tuple(p.shape)}) is not in the model any more; "
                                 "was the name map captured from this model before pruning?")
            new = current[name]
            params[j] = new
            replaced += 1
            if st is None or reset:
                continue
            ns = {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape:
                    v = slice_like_record(v, name, record)
                    if v.shape != new.shape:
                        log.warning("rebuild_optimizer: state %r of %s could not be sliced to %s (the pruning record "
                                    "does not cover it); that parameter's state is reset", k, name, tuple(new.shape))
                        ns = None
                        break
                ns[k] = v
            if ns is not None:
                new_state[new] = ns
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(f"rebuild_optimizer: two optimizer entries now point at the same parameter "
                                 f"{tuple(p.shape)} (tied weights listed twice?); list each parameter once")
            seen.add(id(p))
    old_state.clear()
    if not reset:
        old_state.update(new_state)
    log.info("rebuild_optimizer: %d parameter(s) replaced, state %s", replaced, "reset" if reset else "sliced")
    return optimizer


__all__ = ["NAMES_ATTR", "rebuild_optimizer", "remember_param_names", "slice_like_record", "unwrap"]
