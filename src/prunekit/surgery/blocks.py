"""Depth surgery: remove whole blocks (children of an ``nn.ModuleList`` / ``nn.Sequential``) from a model.

What follows the removal, so the model keeps working and saving:

* the container is rebuilt without the removed children (the state-dict keys of the blocks after them
  shift down: ``layers.5.*`` becomes ``layers.4.*``, as a model built with fewer layers has them);
* ``layer_idx`` attributes of the remaining blocks and their submodules (transformers' attention layers use
  them to index the KV cache) are renumbered to the new positions;
* the model's config, when it has one (``model.config``, and its text config): ``num_hidden_layers`` (or
  ``n_layer`` / ``num_layers``) when it equals the container's old length, and every list attribute of that
  length (``layer_types``, per-layer window sizes ...) lose the removed entries;
* the pruning record gets a ``blocks`` step, so ``pk.load`` / ``pk.hf.from_pretrained`` rebuild the model
  from the original code and :func:`slice_state_dict` maps original state dicts to the new keys.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..verify.check import PruningError

__all__ = ["remove_blocks", "replay_blocks_step", "renumber_state_keys"]

_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _container(model: nn.Module, name: str) -> nn.Module:
    try:
        mod = model.get_submodule(name) if name else model
    except AttributeError:
        raise ValueError(f"remove_blocks: the model has no module {name!r}") from None
    if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"remove_blocks: {name or '<root>'} is a {type(mod).__name__}, not an nn.ModuleList or "
                         "nn.Sequential of blocks")
    return mod


def _configs(model: nn.Module) -> list[Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    out = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:  # noqa: BLE001 - configs without a text part
            text = None
        if text is not None and text is not cfg:
            out.append(text)
    return out


def _config_changes(model: nn.Module, old_len: int, removed: list[int]) -> dict[str, Any]:
    """``{"<i>.<key>": new value}`` for the config objects of :func:`_configs` (i: 0 = model.config, 1 = text)."""
    changes: dict[str, Any] = {}
    drop = set(removed)
    for i, cfg in enumerate(_configs(model)):
        for key, val in list(vars(cfg).items()):
            if key.startswith("_"):
                continue
            if key in _LAYER_COUNT_KEYS and isinstance(val, int) and not isinstance(val, bool) and val == old_len:
                changes[f"{i}.{key}"] = old_len - len(drop)
            elif isinstance(val, (list, tuple)) and len(val) == old_len and key not in ("architectures",):
                changes[f"{i}.{key}"] = [v for j, v in enumerate(val) if j not in drop]
    return changes


def _apply(model: nn.Module, name: str, removed: list[int], config: Mapping[str, Any], undo) -> dict[str, int]:
    """Remove the children, renumber layer_idx, set the config values; everything through ``undo``."""
    cont = _container(model, name)
    old_len = len(cont)
    keep = [j for j in range(old_len) if j not in set(removed)]
    old_modules = cont._modules
    undo.items.append(("m", cont, "_modules", old_modules))
    children = list(old_modules.values())
    cont._modules = type(old_modules)((str(k), children[j]) for k, j in enumerate(keep))
    renumbered: dict[str, int] = {}
    prefix = f"{name}." if name else ""
    for new, old in enumerate(keep):
        if new == old:
            continue
        for sub_name, sub in children[old].named_modules():
            val = getattr(sub, "layer_idx", None)
            if isinstance(val, int) and not isinstance(val, bool) and val == old:
                undo.set_attr(sub, "layer_idx", new)
                renumbered[f"{prefix}{new}{'.' + sub_name if sub_name else ''}.layer_idx"] = new
    cfgs = _configs(model)
    for key, val in config.items():
        i, _, attr = key.partition(".")
        if int(i) < len(cfgs):
            undo.set_attr(cfgs[int(i)], attr, list(val) if isinstance(val, tuple) else val)
    return renumbered


def remove_blocks(model: nn.Module, container: str, indices: Iterable[int], undo) -> dict[str, Any]:
    """Remove children ``indices`` of ``container`` (see the module docstring); return the record step.

    ``undo`` (surgery's undo log) receives every change, so a failed check afterwards rolls it all back.
    """
    cont = _container(model, container)
    n = len(cont)
    idx = sorted({int(i) for i in indices})
    if any(isinstance(i, bool) for i in indices):
        raise TypeError("remove_blocks: block indices must be ints")
    if not idx:
        raise ValueError("remove_blocks: no block to remove")
    if idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f"remove_blocks: {container} has {n} blocks (0..{n - 1}); got indices {idx}")
    if len(idx) >= n:
        raise ValueError(f"remove_blocks: removing all {n} blocks of {container} leaves nothing; keep at least one")
    config = _config_changes(model, n, idx)
    renumbered = _apply(model, container, idx, config, undo)
    return {"groups": {}, "params": {}, "attrs": {},
            "blocks": {"container": container, "remove": idx, "length": n, "config": config,
                       "renumbered": renumbered}}


def replay_blocks_step(model: nn.Module, step: Mapping[str, Any], undo, k: int) -> None:
    """Apply a ``blocks`` record step to a freshly built model (checked: the container has the recorded length)."""
    b = step["blocks"]
    try:
        cont = _container(model, b["container"])
    except ValueError as e:
        raise PruningError(f"pruning record step {k}: {e}; the record was made for a different model") from None
    if len(cont) != int(b["length"]):
        raise PruningError(f"pruning record step {k}: {b['container']} has {len(cont)} blocks but the record expects "
                           f"{b['length']}; the record was made for a different model or config")
    _apply(model, b["container"], [int(i) for i in b["remove"]], b.get("config", {}), undo)


def renumber_state_keys(state: Mapping[str, torch.Tensor], step: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict of the model before a ``blocks`` step, mapped to the keys after it (removed blocks dropped)."""
    b = step["blocks"]
    prefix = f"{b['container']}." if b["container"] else ""
    removed = set(int(i) for i in b["remove"])
    new_index = {old: new for new, old in enumerate(j for j in range(int(b["length"])) if j not in removed)}
    out: dict[str, torch.Tensor] = {}
    for key, val in state.items():
        if key.startswith(prefix):
            head, dot, rest = key[len(prefix):].partition(".")
            if head.isdigit() and dot:
                j = int(head)
                if j in removed:
                    continue
                if j in new_index:
                    out[f"{prefix}{new_index[j]}.{rest}"] = val
                    continue
        out[key] = val
    return out
