"""``pk.hf.save_pretrained`` / ``pk.hf.from_pretrained``: pruned transformers models as transformers directories.

Where the config can say what the model became (the same widths in every layer, values the config class
accepts, and nothing derived from the config that changed), the directory is what ``model.save_pretrained``
writes -- safetensors shards, ``config.json``, ``generation_config.json``, tokenizer files -- and plain
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.  Gemma's ``embed_scale`` (``sqrt(hidden_size)``,
rebuilt from the config on reload) is folded into the saved weights, so the reloaded model computes the same.

Where it cannot (widths that differ per layer, or e.g. a Llama hidden width that is not a multiple of the
head count: Llama's config rejects it), ``config.json`` is the config the pruning started from and
``prunekit.json`` holds the pruning record: :func:`from_pretrained` builds the model from that config,
replays the record (the same slicing as ``pk.load``) and loads the weights.  Plain transformers refuses such a
directory with a size-mismatch error instead of loading a broken model.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..surgery import RECORD_ATTR, replay_record
from .config import BASE_ATTR, check_model, require_transformers, sync_config, text_config

log = logging.getLogger("prunekit.hf")

RECORD_FILE = "prunekit.json"
FORMAT = "prunekit.hf/1"


class HFSaveError(ValueError):
    """A pruned transformers model that cannot be written or read back as asked (the message says why)."""


# ------------------------------------------------------------------ can the config say it?
def _meta_model(model: nn.Module, cfg_dict: dict) -> nn.Module:
    cfg = type(model.config).from_dict(copy.deepcopy(cfg_dict))  # runs the config class's validation
    with torch.device("meta"):
        return type(model)(cfg)


def config_gaps(model: nn.Module) -> tuple[list[str], list[str]]:
    """Why ``model.config`` cannot rebuild ``model`` (empty: it can), and the embedding modules whose
    ``embed_scale`` is folded into the saved weights (Gemma)."""
    gaps: list[str] = []
    fold: list[str] = []
    try:
        ref = _meta_model(model, model.config.to_dict())
    except Exception as e:
        return [f"transformers rejects the pruned config ({type(e).__name__}: {str(e).strip().splitlines()[-1]})"], []
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    for k in sorted(set(have) | set(want)):
        if have.get(k) != want.get(k):
            gaps.append(f"{k}: the model has {have.get(k)}, the config builds {want.get(k)}")
    refmods = dict(ref.named_modules())
    for name, mod in model.named_modules():
        r = refmods.get(name)
        if r is None:
            gaps.append(f"module {name} is not built by the config")
            continue
        for k, v in vars(mod).items():
            # floats derived from the config (scales) change what the model computes; int attributes are mostly
            # copies of config sizes a forward never reads again (``mlp.hidden_size``), surgery keeps the used
            # ones right and the shapes above decide
            if k.startswith("_") or not isinstance(v, float):
                continue
            rv = getattr(r, k, None)
            if rv == v:
                continue
            if k == "scalar_embed_scale" and isinstance(getattr(mod, "embed_scale", None), torch.Tensor):
                fold.append(name)
            else:
                gaps.append(f"{name}.{k} is {v} but the config gives {rv}")
    return gaps, fold


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(base, "norm", None)
    return norm if isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor) else None


def _fold_embed_scale(model: nn.Module, names: list[str], stack) -> None:
    """Make ``embed_scale = sqrt(config.hidden_size)`` (what a reload builds) and fold ``old / new`` into the
    embedding rows; with tied output embeddings the final norm's output is scaled by ``new / old`` so the logits
    stay the same.  Every change is undone by ``stack`` after saving."""
    cfg = text_config(model.config)
    modules = dict(model.named_modules())
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name in names:
        emb = modules[name]
        old, new = float(emb.scalar_embed_scale), float(cfg.hidden_size) ** 0.5
        r = old / new
        tied = out_emb is not None and out_emb.weight is emb.weight
        norm = _final_norm(model) if tied else None
        if tied and norm is None:
            raise HFSaveError(f"{name}: embed_scale {old:g} is rebuilt as sqrt(hidden_size) = {new:g} on reload and "
                              "the output embeddings are tied, with no final norm to compensate; load with "
                              "pk.hf.from_pretrained")
        saved = [(emb.weight, emb.weight.detach().clone()), (emb.embed_scale, emb.embed_scale.detach().clone())]
        new_norm_w = None
        if norm is not None:
            new_norm_w = _scaled_norm_weight(norm, 1.0 / r)
            saved.append((norm.weight, norm.weight.detach().clone()))
        stack.append(lambda s=saved, e=emb, o=old: (_restore(s), setattr(e, "scalar_embed_scale", o)))
        with torch.no_grad():
            emb.weight.mul_(r)
            emb.embed_scale.fill_(new)
            emb.scalar_embed_scale = new
            if new_norm_w is not None:
                norm.weight.copy_(new_norm_w)


def _restore(saved) -> None:
    with torch.no_grad():
        for t, v in saved:
            t.copy_(v)


def _scaled_norm_weight(norm: nn.Module, f: float) -> torch.Tensor:
    """The norm weight that scales the norm's output by ``f``: ``w * f`` for ``x_hat * w`` norms, ``(1 + w) * f - 1``
    for Gemma's ``x_hat * (1 + w)``; which one is decided by running the norm, not by its class name."""
    w = norm.weight.detach()
    x = torch.randn(4, w.shape[0], dtype=w.dtype, device=w.device)
    with torch.no_grad():
        want = norm(x) * f
        for cand in (w * f, (1.0 + w.float()).mul(f).sub(1.0).to(w.dtype)):
            orig = w.clone()
            norm.weight.copy_(cand)
            got = norm(x)
            norm.weight.copy_(orig)
            if torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                return cand
    raise HFSaveError(f"{type(norm).__name__}: cannot rescale this final norm's output to fold Gemma's embed_scale; "
                      "load with pk.hf.from_pretrained")


# ------------------------------------------------------------------ save
def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, *, overwrite: bool = False,
                    **kwargs: Any) -> Path:
    """Write a (pruned) transformers model as a transformers directory (``model.save_pretrained`` writes it).

    Returns the directory.  Logs a warning when the result needs :func:`from_pretrained` (per-layer widths or
    a config the config class rejects); raises :class:`HFSaveError` when it cannot be written loadably at all.

    Args:
        model: a ``transformers.PreTrainedModel`` (pruned with prunekit, or not).
        out_dir: the directory; it must not exist or be empty unless ``overwrite=True``.
        tokenizer: saved next to the model (``tokenizer.save_pretrained(out_dir)``) if given.
        overwrite: write into a non-empty directory (transformers removes its stale weight shards).
        kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).
    """
    check_model(model, "pk.hf.save_pretrained")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise HFSaveError(f"pk.hf.save_pretrained: {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise HFSaveError(f"pk.hf.save_pretrained: {out} is not empty ({', '.join(sorted(p.name for p in out.iterdir())[:5])}"
                          "...); choose a new directory or pass overwrite=True")
    sync = sync_config(model)
    gaps, fold = config_gaps(model)
    record = getattr(model, RECORD_ATTR, None)
    out.mkdir(parents=True, exist_ok=True)
    if not gaps:
        undo: list = []
        try:
            if fold:
                _fold_embed_scale(model, fold, undo)
            model.save_pretrained(out, **kwargs)
        finally:
            for f in reversed(undo):
                f()
        stale = out / RECORD_FILE
        if stale.exists():
            stale.unlink()
    else:
        base = getattr(model, BASE_ATTR, None)
        if not record or base is None:
            raise HFSaveError("pk.hf.save_pretrained: the config cannot describe this model ("
                              + "; ".join(gaps[:3]) + ") and it has no prunekit pruning record to rebuild it from "
                              "(was it pruned outside pk.prune?)")
        log.warning("%s: plain transformers from_pretrained cannot load this model (%s); the directory holds the "
                    "original config and the pruning record (%s): load it with pk.hf.from_pretrained, or prune "
                    "with pk.Pruner(..., uniform=True) for a config-expressible model", type(model).__name__,
                    "; ".join(gaps[:3]), RECORD_FILE)
        pruned_cfg = model.config
        base_cfg = type(pruned_cfg).from_dict(copy.deepcopy(base))
        base_cfg.architectures = [type(model).__name__]
        rec_kwargs = dict(kwargs)
        if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
            # the weights under the model's own state-dict names (transformers >= 5 otherwise converts some,
            # e.g. stacked MoE experts, back to a checkpoint layout): from_pretrained loads them as they are
            rec_kwargs.setdefault("save_original_format", False)
        try:
            model.config = base_cfg
            model.save_pretrained(out, **rec_kwargs)
        finally:
            model.config = pruned_cfg
        info = {"format": FORMAT, "architecture": type(model).__name__, "config": sync.values,
                "per_layer": sync.per_layer, "why": gaps[:20], "record": record}
        (out / RECORD_FILE).write_text(json.dumps(info))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------ load
def _model_class(config, model_class):
    tf = require_transformers()
    if model_class is not None:
        return model_class
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    return tf.AutoModelForCausalLM


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = d / "model.safetensors.index.json"
    try:
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        out: dict[str, torch.Tensor] = {}
        for f in files:
            if not (d / f).exists():
                raise HFSaveError(f"pk.hf.from_pretrained: {d / f} is missing")
            out.update(load_file(str(d / f)))
        return out
    except HFSaveError:
        raise
    except Exception as e:
        raise HFSaveError(f"pk.hf.from_pretrained: cannot read the weights in {d} ({type(e).__name__}: {e}); the "
                          "directory is incomplete or corrupt") from None


def from_pretrained(path: str | os.PathLike, *, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a directory written by :func:`save_pretrained` (or any transformers directory).

    Without ``prunekit.json`` this is ``model_class.from_pretrained(path, **kwargs)`` (the class named in the
    config's ``architectures``, else ``AutoModelForCausalLM``).  With it, the model is built from the saved
    original config, the pruning record is replayed and the weights are loaded; ``model.config`` then follows
    the modules (:func:`sync_config`).  Returns the model in eval mode.
    """
    tf = require_transformers()
    d = Path(path)
    if not (d / "config.json").is_file():
        raise HFSaveError(f"pk.hf.from_pretrained: {d} has no config.json (not a saved transformers model)")
    rec_file = d / RECORD_FILE
    if not rec_file.exists():
        config = tf.AutoConfig.from_pretrained(d)
        return _model_class(config, model_class).from_pretrained(d, **kwargs)
    try:
        info = json.loads(rec_file.read_text())
        record = info["record"]
        if info.get("format") != FORMAT or not isinstance(record, list):
            raise ValueError(f"format {info.get('format')!r}")
    except Exception as e:
        raise HFSaveError(f"pk.hf.from_pretrained: {rec_file} is not a prunekit record ({type(e).__name__}: {e}); "
                          "the directory is corrupt") from None
    config = tf.AutoConfig.from_pretrained(d)
    base = config.to_dict()
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    if kwargs:
        raise TypeError(f"pk.hf.from_pretrained: options {sorted(kwargs)} are not supported for a per-layer "
                        "pruned directory (only dtype)")
    model = _model_class(config, model_class)._from_config(config, **({"dtype": dtype} if dtype else {}))
    object.__setattr__(model, BASE_ATTR, base)
    replay_record(model, record)  # PruningError if the record does not fit this config
    state = _read_weights(d)
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise HFSaveError("pk.hf.from_pretrained: the weights do not fit the rebuilt model (" + "; ".join(bad[:3])
                          + "); the directory is corrupt or was written for another record")
    res = model.load_state_dict(state, strict=False)
    ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in res.missing_keys if own[k].data_ptr() not in ptrs]  # tied weights are saved once
    if missing or res.unexpected_keys:
        raise HFSaveError(f"pk.hf.from_pretrained: weights missing {missing[:5]} / unexpected "
                          f"{list(res.unexpected_keys)[:5]} in {d}; the directory is corrupt")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    sync_config(model)
    return model.eval()
