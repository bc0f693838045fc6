"""Bias compensation (FLAP): the mean contribution of removed input channels moves into the consumer's bias.

When a plan removes input channels ``R`` of a linear consumer ``y = W x + b`` (``o_proj`` when heads go,
``down_proj`` when MLP neurons go), the removed part ``W[:, R] x_R`` is replaced by its calibration mean
``W[:, R] mean(x_R)``, added to ``b``.  On an input equal to the calibration mean the compensated consumer
gives exactly the unpruned output; elsewhere the error is the removed channels' fluctuation around their mean
(what FLAP's criterion minimises).

Which consumers are compensated:

* ``nn.Linear`` (and subclasses) only: layers that are affine in their input, so the contribution of the
  removed channels is an additive term.  Convolutions with padding, embeddings, norms and attention matmuls are
  not (skipped, logged).
* Only for groups without a normalisation layer among their members: removing channels of a normalised width
  (the hidden/residual width under RMSNorm/LayerNorm) changes the normalisation of the *kept* channels too, so
  a constant cannot stand in for what was removed.  In a transformers decoder this leaves attention heads
  (kv heads, query heads within kv groups, head_dim of v/o) and MLP neurons -- FLAP's structures.

For a transformers model the compensated layers gain a bias parameter; so that a reloaded model has it, the
config flag that gives those layers a bias is set (``attention_bias`` for the linear layers of the attention
module, ``mlp_bias`` for the MLP's), and every other linear layer that the flag controls gets a zero bias (the
state dict then matches a model built from the new config).  Architectures whose config has no such flag
(Qwen2's ``o_proj``, Mistral, ...) cannot express the new bias in ``config.json``: the pruner logs a warning and
lists them in ``Pruner.history[-1]["bias_unsaveable"]``; ``pk.save`` / ``pk.load`` still rebuild them from the
pruning record (note for ``pk.hf.save_pretrained``: such a model needs ``pk.hf.from_pretrained``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..plan.importance.base import member_role, module_and_attr
from ..surgery import normalize_plan, param_drops, slice_tensor

log = logging.getLogger("prunekit.compensation")

_FLAGS = (("attention", "attention_bias"), ("mlp", "mlp_bias"))


@dataclass
class Compensation:
    """What :func:`bias_compensation` decided: ``biases`` ``{module: vector}`` in the pruned model's output
    coordinates (for :func:`prunekit.prune`'s ``biases=``), ``config`` values to set with them, the consumers
    ``skipped`` (with why) and the ones whose bias no config flag can express (``unsaveable``)."""

    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    compensated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unsaveable: list[str] = field(default_factory=list)


def eligible_groups(model: nn.Module, graph, gids) -> list[int]:
    """Groups of ``gids`` whose removed channels a bias can stand in for (no norm layer among the members)."""
    return [gid for gid in gids if not any(member_role(model, m) == "norm" for m in graph.group(gid).members)]


def consumers_to_compensate(model: nn.Module, graph, gids) -> list[str]:
    """Names of the linear layers whose input channels the eligible groups of ``gids`` own."""
    out = set()
    for gid in eligible_groups(model, graph, gids):
        for m in graph.group(gid).members:
            mod, attr = module_and_attr(model, m.fqn)
            if isinstance(mod, nn.Linear) and attr == "weight" and m.dim == 1:
                out.add(m.fqn.rpartition(".")[0])
    return sorted(out)


def _flag_for(model: nn.Module, name: str):
    """(config index, flag, parent class) of the config flag that gives module ``name`` a bias, or None."""
    from ..surgery.blocks import _configs
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    cls = type(parent).__name__.lower()
    for word, flag in _FLAGS:
        if word in cls:
            for i, cfg in enumerate(_configs(model)):
                if isinstance(getattr(cfg, flag, None), bool):
                    return i, flag, type(parent)
    return None


def bias_compensation(model: nn.Module, graph, plan: Mapping[int, Any], stats: Mapping[str, Any]) -> Compensation:
    """Bias updates for ``plan`` on ``model`` (which ``graph`` describes) from calibration ``stats``
    (``{module name: ChannelStats}`` of each consumer's input, see :func:`prunekit.importance.collect_input_stats`)."""
    norm = normalize_plan(graph, plan)
    res = Compensation()
    elig = eligible_groups(model, graph, norm)
    for gid in norm:
        if gid not in elig:
            for name in {m.fqn.rpartition(".")[0] for m in graph.group(gid).members
                         if member_role(model, m) == "consumer"}:
                res.skipped.setdefault(name, f"group {gid} contains a normalisation layer (its removal changes the "
                                             "kept channels too)")
    all_drops = param_drops(graph, norm)
    drops = param_drops(graph, {g: norm[g] for g in elig})
    for fqn, dims in sorted(drops.items()):
        mod, attr = module_and_attr(model, fqn)
        name = fqn.rpartition(".")[0]
        if attr != "weight" or mod is None:
            continue
        if not isinstance(mod, nn.Linear):
            if any(m.fqn == fqn and member_role(model, m) == "consumer" for g in elig for m in graph.group(g).members):
                res.skipped[name] = f"{type(mod).__name__} is not an nn.Linear (not affine in its input)"
            continue
        idx = dims.get(1)  # nn.Linear: input channels along dim 1
        if idx is None:
            continue
        st = stats.get(name)
        if st is None or st.channels != mod.weight.shape[1]:
            res.skipped[name] = "no calibration statistics (the layer did not run as a module on the data)"
            continue
        w = mod.weight.detach()
        delta = w[:, idx.to(w.device)].double() @ st.mean.to(w.device)[idx.to(w.device)]
        rows = all_drops.get(fqn, {}).get(0)
        if rows is not None:  # the same plan also removes output channels of this layer (e.g. the hidden width)
            delta = slice_tensor(delta, {0: rows})
        res.biases[name] = delta.to(w.dtype)
        res.compensated.append(name)
    # transformers: the config flag that makes a rebuilt model have these biases, and zero biases for the other
    # layers that flag controls
    zero_for: dict[str, int] = {}
    for name in list(res.compensated):
        if model.get_submodule(name).bias is not None:
            continue
        found = _flag_for(model, name)
        if found is None:
            if getattr(model, "config", None) is not None:
                res.unsaveable.append(name)
            continue
        i, flag, parent_cls = found
        res.config[f"{i}.{flag}"] = True
        for pname, parent in model.named_modules():
            if type(parent) is not parent_cls:
                continue
            for cname, child in parent.named_children():
                full = f"{pname}.{cname}" if pname else cname
                if isinstance(child, nn.Linear) and child.bias is None and full not in res.biases:
                    rows = all_drops.get(f"{full}.weight", {}).get(0)
                    zero_for[full] = child.weight.shape[0] - (0 if rows is None else len(set(rows.tolist())))
    for full, n in zero_for.items():
        mod = model.get_submodule(full)
        res.biases[full] = torch.zeros(n, dtype=mod.weight.dtype, device=mod.weight.device)
    if res.unsaveable:
        log.warning("bias compensation: %s gained a bias that %s's config cannot express (no attention_bias / "
                    "mlp_bias flag for it); pk.save/pk.load rebuild it, a plain from_pretrained would not",
                    ", ".join(res.unsaveable[:6]), type(model).__name__)
    if res.skipped:
        log.info("bias compensation skipped: %s", "; ".join(f"{k}: {v}" for k, v in list(res.skipped.items())[:6]))
    return res


__all__ = ["Compensation", "bias_compensation", "consumers_to_compensate", "eligible_groups"]
