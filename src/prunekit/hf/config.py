"""A transformers model's config follows its modules after pruning.

Every value comes from the module shapes (never from the plan), so a new kind of prunable unit needs no new
code here: the embedding width is ``hidden_size``; per decoder layer the attention projections give
``num_attention_heads`` / ``num_key_value_heads`` (``head_dim`` is the attention's own attribute), the MLP's
down projection gives ``intermediate_size``, and an MoE block's router and expert tensors give the expert count
and the expert FFN width.  A value that is the same in every layer is written to the config; one that differs
per layer cannot be said by a transformers config (the Llama-family layers read ``config.intermediate_size``
etc. directly; transformers' ``per_layer_config`` is read only by a few model classes such as Gemma 4 and
dots3), and is reported in :attr:`ConfigSync.per_layer`.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger("prunekit.hf")

BASE_ATTR = "_prunekit_hf_base"  # the config (dict) the pruning record's first step applies to


@dataclass
class ConfigSync:
    """What :func:`sync_config` found.

    ``values``: every config key it can derive and its value now; ``changed``: ``{key: (old, new)}``;
    ``per_layer``: keys whose value differs per layer ``{key: [value of layer 0, 1, ...]}`` (left unchanged in
    the config: no single value is right)."""

    values: dict[str, Any] = field(default_factory=dict)
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    per_layer: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return not self.per_layer


def require_transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - the hf extra is installed in the test environment
        raise ImportError("prunekit.hf needs transformers: pip install 'prunekit[hf]'") from None
    return transformers


def check_model(model: Any, owner: str) -> None:
    tf = require_transformers()
    if not isinstance(model, tf.PreTrainedModel):
        raise TypeError(f"{owner}: expected a transformers PreTrainedModel (e.g. AutoModelForCausalLM), got "
                        f"{type(model).__name__}; for any other nn.Module use pk.save / pk.load")


def text_config(config):
    get = getattr(config, "get_text_config", None)
    try:
        return get(decoder=True) if get is not None else config
    except TypeError:
        return get()


def decoder_layers(model: nn.Module, cfg) -> list[nn.Module]:
    """The repeated decoder blocks: the longest ModuleList with ``num_hidden_layers`` entries."""
    n = getattr(cfg, "num_hidden_layers", None)
    best: list[nn.Module] = []
    for _name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > len(best) and (n is None or len(mod) == n):
            best = list(mod)
    return best


def _child(mod: nn.Module | None, *names: str) -> nn.Module | None:
    for n in names:
        c = getattr(mod, n, None) if mod is not None else None
        if isinstance(c, nn.Module):
            return c
    return None


def _width(lin: nn.Module | None, dim: str) -> int | None:
    """``out`` / ``in`` width of a Linear-like module (``nn.Linear``, GPT-2's Conv1D)."""
    if lin is None:
        return None
    w = getattr(lin, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if type(lin).__name__ == "Conv1D":  # weight [in, out]
        return int(w.shape[1] if dim == "out" else w.shape[0])
    return int(w.shape[0] if dim == "out" else w.shape[1])


def layer_values(layer: nn.Module, cfg) -> dict[str, int]:
    """Config values one decoder layer's modules say (only the ones it has)."""
    out: dict[str, int] = {}
    attn = _child(layer, "self_attn", "attn", "attention")
    if attn is not None:
        hd = getattr(attn, "head_dim", None)
        hd = hd if isinstance(hd, int) and not isinstance(hd, bool) else getattr(cfg, "head_dim", None)
        o_in = _width(_child(attn, "o_proj", "out_proj", "dense", "c_proj"), "in")
        q_out = _width(_child(attn, "q_proj"), "out")
        k_out = _width(_child(attn, "k_proj"), "out")
        qkv_out = _width(_child(attn, "qkv_proj"), "out")
        if isinstance(hd, int) and hd > 0:
            out["head_dim"] = hd
            q = q_out if q_out is not None else o_in
            if q is not None and q % hd == 0:
                out["num_attention_heads"] = q // hd
            if k_out is not None and k_out % hd == 0:
                out["num_key_value_heads"] = k_out // hd
            elif qkv_out is not None and o_in is not None and (qkv_out - o_in) % (2 * hd) == 0:
                out["num_key_value_heads"] = (qkv_out - o_in) // (2 * hd)  # fused [q | k | v] (Phi3)
    mlp = _child(layer, "mlp", "block_sparse_moe", "feed_forward")
    experts = _child(mlp, "experts")
    if experts is not None:
        count = "num_local_experts" if hasattr(cfg, "num_local_experts") else "num_experts"
        width = "moe_intermediate_size" if hasattr(cfg, "moe_intermediate_size") else "intermediate_size"
        down = getattr(experts, "down_proj", None)
        if isinstance(down, torch.Tensor) and down.dim() == 3:  # fused experts [E, hidden, inter]
            out[count] = int(down.shape[0])
            out[width] = int(down.shape[2])
        elif isinstance(experts, nn.ModuleList) and len(experts):  # one module per expert
            out[count] = len(experts)
            w = _width(_child(experts[0], "down_proj", "w2"), "in")
            if w is not None:
                out[width] = w
        shared = _child(mlp, "shared_expert", "shared_experts")
        w = _width(_child(shared, "down_proj"), "in")
        if w is not None and hasattr(cfg, "shared_expert_intermediate_size"):
            out["shared_expert_intermediate_size"] = w
    else:
        w = _width(_child(mlp, "down_proj", "fc2", "c_proj", "w2"), "in")
        if w is not None:
            out["intermediate_size"] = w
    return out


def derive(model: nn.Module) -> ConfigSync:
    """The config values ``model``'s modules say, without changing anything."""
    cfg = text_config(model.config)
    res = ConfigSync()
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        res.values["hidden_size"] = int(w.shape[1])
    per: dict[str, list[Any]] = {}
    layers = decoder_layers(model, cfg)
    for i, layer in enumerate(layers):
        for k, v in layer_values(layer, cfg).items():
            per.setdefault(k, [None] * len(layers))[i] = v
    for k, vals in per.items():
        seen = [v for v in vals if v is not None]
        # a key some layers lack (e.g. dense layers of a partly-MoE model) is judged on the layers that have it
        if len(set(seen)) == 1:
            res.values[k] = seen[0]
        else:
            res.per_layer[k] = vals
    return res


def _set(cfg, key: str, value: Any) -> None:
    # direct attribute: a strict config validates on save/load, not on assignment (hidden 179 x 4 heads is
    # a valid *module*; whether the config can be reloaded is checked by pk.hf.save_pretrained)
    setattr(cfg, key, value)


def sync_config(model: nn.Module) -> ConfigSync:
    """Update ``model.config`` (the text config of a multimodal model) from the modules and return what was found.

    Sets ``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``
    (explicit where it does not follow from ``hidden_size // num_attention_heads``) and, for MoE,
    ``num_local_experts`` / ``num_experts``, ``moe_intermediate_size``, ``shared_expert_intermediate_size`` --
    each only where the config has the key (``head_dim``: also where it would not follow from the others) and
    the value is the same in every layer.  Widths that differ per layer are reported in ``per_layer``.
    """
    check_model(model, "pk.hf.sync_config")
    cfg = text_config(model.config)
    res = derive(model)
    for k, v in res.values.items():
        if not hasattr(cfg, k) or (k == "head_dim" and getattr(cfg, k) is None):
            if k != "head_dim":
                continue
            # models without the key read getattr(config, "head_dim", hidden // heads): set it where that differs
            hidden = res.values.get("hidden_size", getattr(cfg, "hidden_size", None))
            heads = res.values.get("num_attention_heads", getattr(cfg, "num_attention_heads", None))
            if isinstance(hidden, int) and isinstance(heads, int) and heads and hidden // heads == v:
                continue
            old = getattr(cfg, k, None)
            _set(cfg, k, v)
            res.changed[k] = (old, v)
            continue
        old = getattr(cfg, k)
        if old != v:
            _set(cfg, k, v)
            res.changed[k] = (old, v)
    if res.changed:
        log.info("config of %s follows the pruned modules: %s", type(model).__name__,
                 ", ".join(f"{k} {a} -> {b}" for k, (a, b) in res.changed.items()))
    if res.per_layer:
        log.warning("%s: widths differ per layer (%s); a transformers config cannot say this: save with "
                    "pk.hf.save_pretrained and load with pk.hf.from_pretrained, or prune with "
                    "pk.Pruner(..., uniform=True)", type(model).__name__,
                    ", ".join(f"{k}={v}" for k, v in res.per_layer.items()))
    return res


def changes(model: nn.Module) -> dict[str, tuple[Any, Any]]:
    """``{key: (value before the first prune, value now)}`` of the keys :func:`sync_config` derives."""
    base = getattr(model, BASE_ATTR, None) or {}
    if text_config(model.config) is not model.config and isinstance(base.get("text_config"), dict):
        base = base["text_config"]
    now = derive(model).values
    return {k: (base.get(k), v) for k, v in now.items() if k in base and base.get(k) != v}


def after_prune(model: nn.Module) -> None:
    """The post-prune hook: remember the config the pruning record starts from, then sync the config."""
    if getattr(model, BASE_ATTR, None) is None:
        object.__setattr__(model, BASE_ATTR, copy.deepcopy(model.config.to_dict()))
    sync_config(model)

