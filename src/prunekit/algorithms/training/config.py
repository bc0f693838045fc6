"""The configuration of :class:`~prunekit.TrainingPruner`: its keys and defaults (:data:`CONFIG`), the
deprecated SIRC-style key names (:data:`OLD_KEYS`) and :func:`load_config` (dict / JSON / YAML, checked)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ...plan.importance import Criterion
from .. import regularizers as R
from ...plan.targets import LatencyTarget, Target, deprecated, keep_target

LATENCY_KEYS = ("backend", "batch_size", "threads", "device", "repeats", "method")


CONFIG: dict[str, Any] = {
    "layers": None,            # fnmatch patterns of source modules whose groups are pruned (None: all)
    "start_epoch": 0,          # first pruning epoch
    "end_epoch": 10,           # the MAC target is reached (and units removed physically) at this epoch
    "epoch_rate": 1,           # prune every N epochs between start and end
    "global_pruning": False,   # rank units across groups instead of the same ratio per group
    "round_to": 1,             # kept channels are a multiple of this (as Pruner's round_to; was "block_size")
    "max_ratio": 1.0,          # at most this fraction of a group's units goes (as Pruner's; was "max_pruning_rate")
    "target": None,            # REQUIRED: fraction of the original MACs kept at the end (0.7 = 30% fewer), or a
                               #   pk.FlopsTarget; was "mac_target"
    "latency": None,           # {"backend", "batch_size", "threads", "device", "repeats", "method"}: 'target' is then the
                               #   fraction of the measured LATENCY kept, planned with the shared pk.LatencyModel
                               #   (a pk.LatencyTarget given as target fills this in)
    "ignore": None,            # modules / fnmatch patterns never pruned (as Pruner's ignore)
    "schedule": "linear",      # "linear": kept MACs ramp linearly to the target at end_epoch; "full": ramp as if
                               #   the target were 0 and stop once the target is reached (SIRC's gentler start)
    "criterion": "l2",         # importance criterion (prunekit.importance names)
    "regularization": None,    # {"type": "channel"|"group_lasso"|"slimming"|"growing"|"none", "strength": ...}
    "reset_optimizer": True,   # drop optimizer state after physical removal (else slice it)
    "slice_args": None,        # slice pruning settings, passed through for prunekit.algorithms.slices
    "input_shape": None,       # example input shape(s) when no example_inputs are given
    "enabled": True,           # False: regularize()/step() do nothing
    "verify": True,            # verify the physical removal against the masked model
}


# deprecated config keys (and the spelling of SIRC-style files): old name -> the name of the Pruner vocabulary
OLD_KEYS = {"mac_target": "target", "block_size": "round_to", "max_pruning_rate": "max_ratio"}


class Config(dict):
    """A loaded pruning config (a dict); reading an old key (``cfg["mac_target"]``) gives the new key's value
    with a DeprecationWarning."""

    def __missing__(self, key: str) -> Any:
        new = OLD_KEYS.get(key)
        if new is None:
            raise KeyError(key)
        deprecated(f"pruning config key {key!r}", f"{new!r}")
        return self[new]


def load_config(config: Any, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A complete, checked config from a dict or a ``.json`` / ``.yaml`` / ``.yml`` file (keys: :data:`CONFIG`).

    A seed-style file with the settings under ``"channel_sparsity_args"`` is accepted too (its
    ``"slice_sparsity_args"`` becomes ``slice_args``; its ``mac_target``, ``block_size``, ``max_pruning_rate``
    are read as ``target``, ``round_to``, ``max_ratio``).  In a plain config those old keys still work with a
    ``DeprecationWarning``.  Unknown keys and bad values raise ``ValueError`` naming the key as it was written.
    """
    src = "config"
    if isinstance(config, (str, Path)):
        src = str(config)
        p = Path(config)
        if not p.is_file():
            raise ValueError(f"pruning config file {src} does not exist")
        text = p.read_text()
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    if not isinstance(config, Mapping):
        raise ValueError(f"{src}: a pruning config must be a mapping of settings, got {type(config).__name__}")
    config = dict(config)
    seed_style = "channel_sparsity_args" in config
    if "channel_sparsity_args" in config:
        outer = config
        config = dict(outer.pop("channel_sparsity_args") or {})
        if "slice_sparsity_args" in outer:
            config.setdefault("slice_args", outer.pop("slice_sparsity_args"))
        for k in outer:
            raise ValueError(f"{src}: unknown top-level key {k!r} (expected channel_sparsity_args, slice_sparsity_args)")
    cfg = Config(CONFIG)
    spelled = {k: k for k in CONFIG}  # config key -> as the user wrote it (for messages)
    for k, v in config.items():
        new = OLD_KEYS.get(k)
        if new is not None:
            if new in config:
                raise ValueError(f"{src}: both {k!r} and {new!r} are given; keep {new!r} ({k!r} is its old name)")
            if not seed_style:
                deprecated(f"pruning config key {k!r}", f"{new!r}", stacklevel=4)
            spelled[new] = k
            k = new
        if k not in CONFIG:
            raise ValueError(f"{src}: unknown key {k!r}; allowed keys: {sorted(CONFIG)}")
        cfg[k] = v
    for k, v in (overrides or {}).items():  # TrainingPruner(..., target=..., round_to=...) win over the file
        if v is not None:
            cfg[k], spelled[k] = v, k

    def bad(key, why):
        return ValueError(f"{src}: {spelled[key]!r} {why}, got {cfg[key]!r}")

    def integer(key, lo):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise bad(key, f"must be an integer >= {lo}")

    for k in ("start_epoch", "end_epoch"):
        integer(k, 0)
    integer("epoch_rate", 1)
    integer("round_to", 1)
    if cfg["end_epoch"] < cfg["start_epoch"]:
        raise bad("end_epoch", f"must be >= start_epoch ({cfg['start_epoch']})")
    mt = cfg["target"]
    if mt is None:
        raise ValueError(f"{src}: 'target' is required: the fraction of the original MACs to keep, e.g. 0.7 (or "
                         "pk.FlopsTarget(0.7); 'mac_target' in older configs)")
    if isinstance(mt, Target):
        mt = keep_target(mt, "TrainingPruner", ("flops", "latency"))
        cfg["latency"] = {k: getattr(mt, k) for k in LATENCY_KEYS} if mt.kind == "latency" else None
        cfg["target"] = mt = mt.ratio
    lat = cfg["latency"]
    if lat is not None:
        if not isinstance(lat, Mapping) or set(lat) - set(LATENCY_KEYS):
            raise bad("latency", f"must be a mapping with keys among {', '.join(LATENCY_KEYS)} (the settings of "
                                 "pk.LatencyTarget)")
        try:
            LatencyTarget(0.5, **dict(lat))
        except (TypeError, ValueError) as e:
            raise bad("latency", str(e)) from None
        cfg["latency"] = dict(lat)
    if isinstance(mt, bool) or not isinstance(mt, (int, float)) or not 0.0 < mt <= 1.0:
        raise bad("target", "must be the fraction of MACs kept, in (0, 1]")
    mr = cfg["max_ratio"]
    if isinstance(mr, bool) or not isinstance(mr, (int, float)) or not 0.0 < mr <= 1.0:
        raise bad("max_ratio", "must be in (0, 1]")
    if cfg["ignore"] is not None:
        if isinstance(cfg["ignore"], str):
            cfg["ignore"] = [cfg["ignore"]]
        if not isinstance(cfg["ignore"], (list, tuple)):
            raise bad("ignore", "must be a list of modules / module name patterns")
        cfg["ignore"] = list(cfg["ignore"])
    for k in ("global_pruning", "reset_optimizer", "enabled", "verify"):
        if not isinstance(cfg[k], bool):
            raise bad(k, "must be true or false")
    if cfg["schedule"] not in ("linear", "full"):
        raise bad("schedule", "must be 'linear' or 'full'")
    if cfg["layers"] is not None:
        if isinstance(cfg["layers"], str):
            cfg["layers"] = [cfg["layers"]]
        if not isinstance(cfg["layers"], (list, tuple)) or not all(isinstance(x, str) for x in cfg["layers"]) \
                or not cfg["layers"]:
            raise bad("layers", "must be a non-empty list of module names / fnmatch patterns (or null for all)")
        cfg["layers"] = list(cfg["layers"])
    if not isinstance(cfg["criterion"], (str, Criterion)):
        raise bad("criterion", "must be an importance criterion name such as 'l2'")
    if cfg["regularization"] is not None and not isinstance(cfg["regularization"], Mapping):
        raise bad("regularization", "must be a mapping like {'type': 'channel', 'strength': 1e-4}")
    if cfg["regularization"] is not None:
        kind = str(cfg["regularization"].get("type", "none")).lower()
        if kind not in list(R.REGULARIZERS) + ["none"]:
            raise ValueError(f"{src}: 'regularization.type' must be one of {sorted(R.REGULARIZERS) + ['none']}, "
                             f"got {cfg['regularization'].get('type')!r}")
    if cfg["slice_args"] is not None and not isinstance(cfg["slice_args"], Mapping):
        raise bad("slice_args", "must be a mapping of slice-pruning settings")
    if cfg["input_shape"] is not None:
        shp = cfg["input_shape"]
        ok = isinstance(shp, (list, tuple)) and shp and (all(isinstance(d, int) for d in shp) or all(
            isinstance(s, (list, tuple)) and all(isinstance(d, int) for d in s) for s in shp))
        if not ok:
            raise bad("input_shape", "must be a shape [B, C, H, W] or a list of shapes")
    return cfg


def _inputs_from_shape(shape) -> Any:
    if all(isinstance(d, int) for d in shape):
        return torch.randn(*shape)
    return tuple(torch.randn(*s) for s in shape)
