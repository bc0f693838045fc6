"""Hugging Face transformers layers prunekit knows, registered by class name (transformers is never imported here).

Each spec says which of a layer's size attributes follow its (pruned) parameters, so that a forward reading them
keeps working after surgery.  Attributes updated (the config-sync code reads the same modules):

* ``Conv1D`` (GPT-2, GPT, ...): weight is ``[in, out]``; ``nf`` (out) and ``nx`` (in).
* ``GPT2Attention``: ``split_size`` and ``embed_dim`` (the q width = heads x head_dim = ``c_proj`` input rows),
  ``num_heads`` (= ``split_size // head_dim``); ``head_dim`` follows its reshape.
* ``Phi3Attention``: ``num_key_value_heads``, ``num_key_value_groups`` and the number of query heads.  Its forward
  reads ``self.config.num_attention_heads`` to cut the fused ``qkv_proj`` output, and that config object is shared
  by every layer, so a layer whose head count changed gets its own :class:`LayerConfig` (a view of the shared
  config with ``num_attention_heads`` overridden; every other attribute is read live from the shared config).
* ``T5Attention``: ``n_heads``, ``inner_dim`` (and ``key_value_proj_dim`` through its reshape).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from .modules import register_module_by_name

__all__ = ["LayerConfig", "layer_config_overrides"]


class LayerConfig:
    """A per-layer view of a shared (transformers) config: ``overrides`` win, every other attribute is read from
    ``base`` when asked (so ``model.config`` changes -- attention implementation, flags -- still reach the layer).
    ``base`` is the shared config; a LayerConfig of a LayerConfig flattens to one view of the shared config."""

    def __init__(self, base: Any, **overrides: Any):
        if isinstance(base, LayerConfig):
            overrides = {**base.__dict__["_pk_overrides"], **overrides}
            base = base.__dict__["_pk_base"]
        self.__dict__["_pk_base"] = base
        self.__dict__["_pk_overrides"] = dict(overrides)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if "_pk_base" not in d:  # half-built (copy/pickle): no recursion into __getattr__
            raise AttributeError(name)
        if name in d["_pk_overrides"]:
            return d["_pk_overrides"][name]
        return getattr(d["_pk_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__["_pk_overrides"]:
            self.__dict__["_pk_overrides"][name] = value
        else:
            setattr(self.__dict__["_pk_base"], name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self.__dict__['_pk_base']).__name__}, overrides={self.__dict__['_pk_overrides']})"


def layer_config_overrides(module: nn.Module) -> dict[str, Any]:
    """The per-layer config values surgery gave ``module`` (``{}`` when its config is the shared one)."""
    cfg = getattr(module, "config", None)
    return dict(cfg.__dict__["_pk_overrides"]) if isinstance(cfg, LayerConfig) else {}


def _ints(*vals) -> bool:
    return all(type(v) is int and v > 0 for v in vals)


def _conv1d_after(m: nn.Module, sliced: frozenset) -> dict[str, Any]:
    return {"nf": m.weight.shape[1], "nx": m.weight.shape[0]}


def _gpt2_attn_after(m: nn.Module, sliced: frozenset) -> dict[str, Any]:
    hd, split = getattr(m, "head_dim", None), getattr(m, "split_size", None)
    if _ints(hd, split) and split % hd == 0:
        return {"num_heads": split // hd}
    return {}


def _phi3_attn_after(m: nn.Module, sliced: frozenset) -> dict[str, Any]:
    """Head counts from the fused ``qkv_proj`` rows ((H + 2 KV) x head_dim) and ``o_proj``'s input (H x head_dim)."""
    hd, cfg = getattr(m, "head_dim", None), getattr(m, "config", None)
    qkv, o = getattr(m, "qkv_proj", None), getattr(m, "o_proj", None)
    if cfg is None or not isinstance(qkv, nn.Linear) or not isinstance(o, nn.Linear) or not _ints(hd):
        return {}
    q_rows, rows = o.weight.shape[1], qkv.weight.shape[0]
    if q_rows % hd or (rows - q_rows) % (2 * hd):
        return {}
    heads, kv = q_rows // hd, (rows - q_rows) // (2 * hd)
    out: dict[str, Any] = {"num_key_value_heads": kv}
    if kv and heads % kv == 0:
        out["num_key_value_groups"] = heads // kv
    if getattr(cfg, "num_attention_heads", None) != heads:
        out["config"] = LayerConfig(cfg, num_attention_heads=heads)
    return out


def _t5_attn_after(m: nn.Module, sliced: frozenset) -> dict[str, Any]:
    kv = getattr(m, "key_value_proj_dim", None)
    o = getattr(m, "o", None)
    if not isinstance(o, nn.Linear) or not _ints(kv) or o.weight.shape[1] % kv:
        return {}
    return {"inner_dim": o.weight.shape[1], "n_heads": o.weight.shape[1] // kv}


def _register() -> None:
    # GPT-2/GPT/... "Conv1D": a linear layer with a transposed weight [in, out] and a bias [out]; forward reads nf
    register_module_by_name("transformers.pytorch_utils.Conv1D", out_dim=1, in_dim=0, act_dim=-1, infer_attrs=False,
                            attrs={"nf": ("weight", 1), "nx": ("weight", 0)}, after_surgery=_conv1d_after)
    # the fused c_attn output is split by ``self.split_size`` (the q width, which c_proj's input rows hold)
    register_module_by_name("transformers.models.gpt2.modeling_gpt2.GPT2Attention", after_surgery=_gpt2_attn_after,
                            attrs={"split_size": ("c_proj.weight", 0), "embed_dim": ("c_proj.weight", 0)})
    register_module_by_name("transformers.models.phi3.modeling_phi3.Phi3Attention", after_surgery=_phi3_attn_after)
    register_module_by_name("transformers.models.t5.modeling_t5.T5Attention", after_surgery=_t5_attn_after,
                            attrs={"inner_dim": ("o.weight", 1)}, factory_attrs=("n_heads",))


_register()
