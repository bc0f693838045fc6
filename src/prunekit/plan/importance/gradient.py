"""Data-driven criteria: first-order Taylor (weight and activation) and a diagonal-Fisher second-order score."""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ...analysis.modules import spec_of
from ...runs.distributed import all_reduce_sum
from .base import DataCriterion, log, output_dim, reduce_members, unit_view


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (statistics of FSDP2-sharded parameters) as a plain tensor; other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _WeightGrad(DataCriterion):
    """Sums, over batches, a per-unit function of (weight, gradient) for every scorable member.

    Each batch's gradient is the gradient of that batch's loss alone (``.grad`` is cleared between
    batches), so opposite-signed batches do not cancel.  A parameter that gets no gradient (unused
    in the forward) contributes zeros.
    """

    def _unit_value(self, member, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _start(self, model, groups):
        return {"elig": {g.id: self.eligible(model, g) for g in groups}, "acc": {}}

    def _after_backward(self, model, groups, state):
        acc = state["acc"]
        with torch.no_grad():
            for gid, elig in state["elig"].items():
                for m, p, _role in elig:
                    if p.grad is None:
                        continue
                    v = self._unit_value(m, p.detach().float(), p.grad.detach().float())
                    key = (gid, id(m))
                    acc[key] = acc[key] + v if key in acc else v

    def _reduce(self, model, groups, state, group):
        # the keys in a rank-independent order (group id, member position); absent values (no gradient) are zeros
        keys = [(gid, id(m)) for gid, elig in sorted(state["elig"].items()) for m, _p, _r in elig]
        sizes = {g.id: g.size for g in groups}
        vals = [state["acc"].get(k) for k in keys]
        vals = [torch.zeros(sizes[k[0]]) if v is None else _full(v).float().cpu() for k, v in zip(keys, vals)]
        if not vals:
            return
        tot = all_reduce_sum(torch.cat(vals), group)
        pos = 0
        for k, v in zip(keys, vals):
            state["acc"][k] = tot[pos:pos + v.numel()]
            pos += v.numel()

    def _member_score(self, model, group, member, w, ctx):
        v = ctx["acc"].get((group.id, id(member)))
        return v if v is not None else torch.zeros(group.size)


class Taylor(_WeightGrad):
    """First-order Taylor expansion on weights (TaylorFOWeight; Molchanov et al. 2019).

    Per member and unit: ``|sum_{i in unit} w_i * g_i|`` -- the first-order estimate of the loss
    change when the unit's slice is zeroed -- summed over batches, then combined over members with
    ``reduction``.
    """

    name = "taylor"

    def _unit_value(self, member, w, g):
        return unit_view(member, w * g).sum(1).abs()


class Hessian(_WeightGrad):
    """Second-order (OBD-style) saliency with the diagonal empirical Fisher as Hessian estimate.

    ``H_ii ~ g_i^2``, so the saliency of zeroing weight ``i`` is ``0.5 * H_ii * w_i^2 = 0.5 * (g_i w_i)^2``;
    a unit's score is the sum over its slice and over batches, combined over members with ``reduction``.
    """

    name = "hessian"

    def _unit_value(self, member, w, g):
        return 0.5 * unit_view(member, (w * g).pow(2)).sum(1)


def _channel_dim(module: nn.Module, out: torch.Tensor) -> int:
    """Dim of ``out`` that holds ``module``'s output channels (``ModuleSpec.act_dim``): 1 for (batched) convs, last
    for linear/embedding and layers whose spec does not say."""
    spec = spec_of(module)
    if spec is not None and spec.act_dim == 1:  # channel-first (convs): dim 0 when the input was unbatched
        return 1 if out.dim() == module.weight.dim() else 0
    return out.dim() - 1


class TaylorAct(DataCriterion):
    """First-order Taylor expansion on activations (Molchanov et al. 2017).

    Forward hooks on the group's source modules (``group.source``: the layers whose output-channel
    weight is a member) record each output channel's
    ``|sum_{spatial/tokens} a * dL/da|`` per sample, averaged over the batch and summed over batches.
    The source's weight member maps output channels to units (a head sums its head_dim channels);
    sources are combined with ``reduction``.  Consumers, norms and biases do not take part.  Groups
    whose sources never ran as modules (no source, or a weight used through ``F.linear`` by a parent)
    fall back to :class:`Taylor` computed in the same passes (logged).
    """

    name = "taylor_act"
    fallback_name = "taylor (no source module ran)"

    def _start(self, model, groups):
        by_group: dict[int, list] = {}
        for g in groups:
            for m, _p, role in self.eligible(model, g):
                # the group's sources: weights of conv/linear/embedding layers along their output dim -- the rule
                # that builds group.source, here also for subclasses and for a model that is itself one layer
                if role == "source":
                    by_group.setdefault(g.id, []).append((m.fqn.rpartition(".")[0], m))
        fb = Taylor(reduction=self.reduction, include_consumers=self.include_consumers,
                    include_bias=self.include_bias, skip_frozen=self.skip_frozen)
        return {"by_group": by_group, "act": {}, "fallback": fb, "taylor": fb._start(model, groups),
                "fallback_ids": []}

    @contextmanager
    def _hooks(self, model, groups, state):
        names = {name for lst in state["by_group"].values() for name, _m in lst}
        handles = []
        try:
            for name in sorted(names):
                handles.append(model.get_submodule(name).register_forward_hook(partial(self._on_forward, state, name)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _on_forward(self, state, name, module, inputs, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            a = out.detach()
            out.register_hook(lambda g: self._accumulate(state, name, module, a, g))

    def _accumulate(self, state, name, module, a, g):
        with torch.no_grad():
            ch = _channel_dim(module, a)
            prod = (a.float() * g.float()).movedim(ch, -1)
            c = prod.shape[-1]
            if ch == 0:  # unbatched call: one sample
                per = prod.reshape(-1, c).sum(0).abs()
            else:
                per = prod.reshape(prod.shape[0], -1, c).sum(1).abs().mean(0)
            od = output_dim(module)
            if od is None or module.weight.shape[od] != c:
                log.debug("taylor_act: %s produced %d channels, its weight has another count; skipped", name, c)
                return
            acc = state["act"]
            acc[name] = acc[name] + per if name in acc else per

    def _after_backward(self, model, groups, state):
        state["fallback"]._after_backward(model, groups, state["taylor"])

    def _reduce(self, model, groups, state, group):
        names = sorted({name for lst in state["by_group"].values() for name, _m in lst})
        vals = []
        for name in names:
            mod = model.get_submodule(name)
            c = mod.weight.shape[output_dim(mod)]
            v = state["act"].get(name)
            # one extra entry counts the ranks where the module ran (a module that ran nowhere keeps no entry)
            vals.append(torch.cat([torch.zeros(c) if v is None else v.float().cpu(),
                                   torch.tensor([float(v is not None)])]))
        if vals:
            tot = all_reduce_sum(torch.cat(vals), group)
            pos = 0
            for name, v in zip(names, vals):
                seg = tot[pos:pos + v.numel()]
                if seg[-1] > 0:
                    state["act"][name] = seg[:-1]
                pos += v.numel()
        state["fallback"]._reduce(model, groups, state["taylor"], group)

    def _group_score(self, model, group, ctx):
        vecs = [unit_view(m, ctx["act"][name], dim=0).sum(1).cpu()
                for name, m in ctx["by_group"].get(group.id, []) if name in ctx["act"]]
        if vecs:
            return reduce_members(vecs, self.reduction)
        ctx["fallback_ids"].append(group.id)
        return ctx["fallback"]._group_score(model, group, ctx["taylor"])


__all__ = ["Taylor", "TaylorAct", "Hessian"]
