"""Slice pruning: fine-grained structured sparsity inside conv and linear weights (masks only).

A *slice* is the set of weights at one (input channel, kernel position) across a block of ``block``
consecutive output filters: for a conv weight ``[out, in/groups, kh, kw]`` the slice ``(b, c, i, j)``
is ``weight[b*block:(b+1)*block, c, i, j]``; for a linear weight ``[out, in]`` it is one input column
across a block of rows.  Zeroing whole slices gives sparsity that block-sparse kernels (``block``
filters computed together) can skip; the layer keeps its shape -- nothing is removed physically.

Training loop::

    sp = pk.SlicePruner(model, block=4, target_sparsity=0.5, reg=1e-4, start_step=1000, end_step=5000, every=100)
    sp.attach(optimizer)                 # re-zero masked slices after every optimizer.step()
    for step, (x, y) in enumerate(data):
        loss = task_loss(model(x), y)
        optimizer.zero_grad(); loss.backward()
        sp.regularize()                  # group-lasso gradient on the slices
        optimizer.step()
        sp.step(step)                    # masks more slices on the schedule

* Regularisation (reweighted group lasso): every unmasked slice ``s`` with L2 norm ``n_s`` gets the
  gradient of ``reg * f_s * n_s``, i.e. ``reg * f_s * w_s / n_s``, with ``f_s = 2 m / (n_s + m)`` and ``m``
  the mean slice norm of its layer (``f`` is treated as a constant).  ``f`` is 2 for tiny slices, 1 for
  average ones and tends to 0 for large ones: small slices are pushed to zero up to twice as hard as an
  average slice, the ones that will stay are barely touched.  :meth:`SlicePruner.loss` returns the
  same penalty as a differentiable scalar (use one of the two, not both).
* Schedule: from ``start_step`` to ``end_step`` the scheduled sparsity follows
  ``target * (1 - (1 - t)^3)`` (``ramp="cubic"``, the gradual-pruning schedule of Zhu & Gupta) or
  ``target * t`` (``ramp="linear"``), ``t = (step - start) / (end - start)``; every ``every`` steps
  (and once at or after ``end_step``) each layer masks its smallest-norm slices until
  ``round(sparsity * slices)`` of them are masked.  Masks only grow.
"""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .pruner import _pattern

log = logging.getLogger("prunekit.slices")

RAMPS = ("cubic", "linear")


def _eligible(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """``w`` as ``[n_blocks, block, slices per block]`` (zero rows pad a last, shorter block)."""
    w2 = w.reshape(w.shape[0], -1)
    pad = (-w.shape[0]) % block
    if pad:
        w2 = torch.cat([w2, w2.new_zeros(pad, w2.shape[1])])
    return w2.reshape(-1, block, w2.shape[1])


def slice_norms(weight: torch.Tensor, block: int) -> torch.Tensor:
    """L2 norm of every slice of a conv/linear weight, as ``[n_blocks, in/groups * kernel positions]``."""
    return _blocks(weight, block).pow(2).sum(1).sqrt()


def _expand(per_slice: torch.Tensor, weight: torch.Tensor, block: int) -> torch.Tensor:
    """A ``[n_blocks, slices]`` tensor spread over the weight's shape (each value over its block of filters)."""
    return per_slice.repeat_interleave(block, 0)[:weight.shape[0]].reshape(weight.shape)


class SlicePruner:
    """Slice regularisation and gradual slice masking (see the module docstring).

    Its target is a fraction of weight slices masked (``target_sparsity``), not a FLOPs/params/channel
    target: the layers keep their shapes, so :class:`prunekit.FlopsTarget` and the others do not apply.

    Args:
        model: the model; its conv/linear weights are masked in place.
        block: consecutive output filters (rows) per slice.
        layers: fnmatch name patterns or module objects of the conv/linear layers to sparsify.  Default:
            every ``Conv2d`` and ``Linear`` except the first and the last one in registration order (the
            stem and the classifier are the most sensitive and the least costly).
        ignore: modules (objects or fnmatch name patterns) left dense, as for :class:`prunekit.Pruner`.
        target_sparsity: fraction of each layer's slices masked at the end of the schedule, in [0, 1).
        reg: regularisation strength of :meth:`regularize` / :meth:`loss`.
        start_step, end_step, every: masking schedule (steps are whatever the caller counts: iterations
            or epochs).
        ramp: ``"cubic"`` or ``"linear"`` growth of the scheduled sparsity.
    """

    def __init__(self, model: nn.Module, *, block: int = 4, layers: Iterable[Any] | None = None,
                 ignore: Iterable[Any] | None = None,
                 target_sparsity: float = 0.5, reg: float = 1e-4, start_step: int = 0, end_step: int = 1000,
                 every: int = 100, ramp: str = "cubic"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} expects an nn.Module, got {type(model).__name__}")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ValueError(f"block must be a positive integer (filters per slice), got {block!r}")
        if not 0.0 <= float(target_sparsity) < 1.0:
            raise ValueError(f"target_sparsity is the fraction of slices to mask and must be in [0, 1), "
                             f"got {target_sparsity!r}")
        if float(reg) < 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a positive integer (steps between masking rounds), got {every!r}")
        if not (isinstance(start_step, int) and isinstance(end_step, int) and 0 <= start_step <= end_step):
            raise ValueError(f"need integers 0 <= start_step <= end_step, got {start_step!r}, {end_step!r}")
        if ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
        self.model = model
        self.block = block
        self.target = float(target_sparsity)
        self.reg = float(reg)
        self.start_step, self.end_step, self.every = start_step, end_step, every
        self.ramp = ramp
        self.layers: dict[str, nn.Module] = self._select(layers)
        if ignore:
            names = {id(m): n for n, m in model.named_modules()}
            pats = [_pattern(p, names, "ignore") for p in ignore]
            self.layers = {n: m for n, m in self.layers.items() if not any(fnmatch.fnmatchcase(n, p) for p in pats)}
            if not self.layers:
                raise ValueError(f"ignore={pats} leaves no layer to sparsify; ignore fewer layers")
        self.masks: dict[str, torch.Tensor] = {  # True = slice kept
            n: torch.ones(slice_norms(m.weight.detach(), block).shape, dtype=torch.bool, device=m.weight.device)
            for n, m in self.layers.items()}
        self.last_step: int | None = None
        self._final_done = False
        self._handles: list = []
        log.info("slice pruning on %d layer(s) (block %d, target %.0f%%): %s", len(self.layers), block,
                 100 * self.target, ", ".join(list(self.layers)[:8]) + (" ..." if len(self.layers) > 8 else ""))

    def _select(self, layers: Iterable[Any] | None) -> dict[str, nn.Module]:
        named = [(n, m) for n, m in self.model.named_modules() if _eligible(m)]
        if layers is None:
            cands = [(n, m) for n, m in named if isinstance(m, (nn.Conv2d, nn.Linear))]
            chosen = dict(cands[1:-1])
            if not chosen:
                raise ValueError(f"the model has {len(cands)} Conv2d/Linear layer(s); by default the first and last "
                                 "are left dense, which leaves none: pass layers=[...] (name patterns) explicitly")
            return chosen
        names = {id(m): n for n, m in self.model.named_modules()}
        chosen = {}
        for p in layers:
            pat = _pattern(p, names, "layers")
            hit = [(n, m) for n, m in named if fnmatch.fnmatchcase(n, pat)]
            if not hit:
                raise ValueError(f"layers: {pat!r} matches no conv or linear layer of the model; conv/linear layers "
                                 f"are: {', '.join(n for n, _ in named[:12])}{' ...' if len(named) > 12 else ''}")
            chosen.update(hit)
        return {n: m for n, m in named if n in chosen}  # model order

    def _keep(self, name: str) -> torch.Tensor:
        """The keep-mask of a layer on its weight's device (the model may have moved since)."""
        keep, dev = self.masks[name], self.layers[name].weight.device
        if keep.device != dev:
            keep = self.masks[name] = keep.to(dev)
        return keep

    # ------------------------------------------------------------------ regularisation
    def _factors(self, w: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slice norms, reweighting f = 2m / (n + m)) of one weight; masked slices get f = 0."""
        n = slice_norms(w.detach(), self.block)
        live = n[keep]
        m = live.mean() if live.numel() else n.new_zeros(())
        f = torch.where(keep, 2 * m / (n + m).clamp_min(1e-12), torch.zeros_like(n))
        return n, f

    def loss(self) -> torch.Tensor:
        """The slice penalty ``reg * sum_s f_s * ||w_s||`` as a differentiable scalar (add it to the loss)."""
        total = None
        for name, mod in self.layers.items():
            _, f = self._factors(mod.weight, self._keep(name))
            n = _blocks(mod.weight, self.block).pow(2).sum(1).clamp_min(1e-24).sqrt()
            term = (f * n).sum()
            total = term if total is None else total + term
        return self.reg * total

    @torch.no_grad()
    def regularize(self) -> None:
        """Add the penalty's gradient ``reg * f_s * w_s / ||w_s||`` to the weights' ``.grad`` (after backward)."""
        if self.reg == 0:
            return
        for name, mod in self.layers.items():
            w = mod.weight
            if not w.requires_grad:
                continue
            n, f = self._factors(w, self._keep(name))
            g = _expand(self.reg * f / n.clamp_min(1e-12), w, self.block) * w
            if w.grad is None:
                w.grad = g.to(w.dtype)
            else:
                w.grad.add_(g.to(w.grad.dtype))

    # ------------------------------------------------------------------ schedule & masks
    def scheduled_sparsity(self, step: int) -> float:
        """Fraction of slices the schedule asks for at ``step``."""
        if step < self.start_step:
            return 0.0
        span = self.end_step - self.start_step
        t = 1.0 if span == 0 else min(max((step - self.start_step) / span, 0.0), 1.0)
        return self.target * (1.0 - (1.0 - t) ** 3 if self.ramp == "cubic" else t)

    def step(self, global_step: int) -> bool:
        """Mask more slices if ``global_step`` is a masking step of the schedule; True if masks were updated."""
        step = int(global_step)
        self.last_step = step
        if step < self.start_step:
            return False
        at_end = step >= self.end_step
        due = ((step - self.start_step) % self.every == 0 and not at_end) or (at_end and not self._final_done)
        if not due:
            return False
        self._final_done = self._final_done or at_end
        self.mask_to(self.scheduled_sparsity(step))
        return True

    @torch.no_grad()
    def mask_to(self, sparsity: float) -> None:
        """Mask the smallest-norm slices of every layer until ``round(sparsity * slices)`` are masked."""
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        for name, mod in self.layers.items():
            keep = self._keep(name)
            k = int(round(sparsity * keep.numel()))
            if k <= int((~keep).sum()):
                continue
            score = slice_norms(mod.weight, self.block).flatten()
            score[~keep.flatten()] = -1.0  # masked slices stay masked
            order = torch.argsort(score, stable=True)
            new = torch.ones(keep.numel(), dtype=torch.bool, device=keep.device)
            new[order[:k]] = False
            self.masks[name] = new.reshape(keep.shape)
        self.apply_masks()
        log.info("slice pruning: sparsity %.1f%% (scheduled %.1f%%)", 100 * self.sparsity()["overall"], 100 * sparsity)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Re-zero the masked slices (after each optimizer step; :meth:`attach` does it automatically)."""
        for name, mod in self.layers.items():
            keep = self._keep(name)
            if not keep.all():
                mod.weight.mul_(_expand(keep, mod.weight, self.block).to(mod.weight.dtype))

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`apply_masks` after every ``optimizer.step()``; returns the hook handle."""
        h = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply_masks())
        self._handles.append(h)
        return h

    def detach(self) -> None:
        """Remove the optimizer hooks added by :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def sparsity(self) -> dict[str, Any]:
        """``{"overall": fraction of all-zero slices, "layers": {name: fraction}}`` measured on the weights."""
        layers, zero, total = {}, 0, 0
        for name, mod in self.layers.items():
            z = slice_norms(mod.weight, self.block) == 0
            layers[name] = float(z.float().mean())
            zero, total = zero + int(z.sum()), total + z.numel()
        return {"overall": zero / total if total else 0.0, "layers": layers}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"block": self.block, "last_step": self.last_step, "final_done": self._final_done,
                "masks": {n: m.detach().cpu().clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks (and where the schedule stood) and zero the masked slices."""
        if int(state.get("block", self.block)) != self.block:
            raise ValueError(f"the state was saved with block={state['block']}, this SlicePruning uses "
                             f"block={self.block}: build it with the same block")
        masks = state["masks"]
        if set(masks) != set(self.masks):
            raise ValueError(f"the state has masks for layers {sorted(masks)}, this SlicePruning for "
                             f"{sorted(self.masks)}: build it with the same layers")
        for n, m in masks.items():
            if tuple(m.shape) != tuple(self.masks[n].shape):
                raise ValueError(f"{n}: saved mask has shape {tuple(m.shape)}, expected {tuple(self.masks[n].shape)} "
                                 "(was the layer resized?)")
            self.masks[n] = m.to(self.masks[n].device, torch.bool)
        self.last_step = state.get("last_step")
        self._final_done = bool(state.get("final_done", False))
        self.apply_masks()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self.layers)} layers, block={self.block}, target={self.target}, "
                f"steps {self.start_step}..{self.end_step} every {self.every})")


class SlicePruning(SlicePruner):
    """Deprecated name of :class:`SlicePruner` (same class, with a DeprecationWarning when created)."""

    def __init__(self, *args: Any, **kwargs: Any):
        from ..plan.targets import deprecated
        deprecated("prunekit.SlicePruning", "prunekit.SlicePruner", stacklevel=3)
        super().__init__(*args, **kwargs)
