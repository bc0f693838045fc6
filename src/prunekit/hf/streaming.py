"""``pk.hf.prune_checkpoint``: prune a transformers checkpoint larger than memory, shard by shard.

The model is built on the meta device from ``config.json`` and analysed there (the structure never needs the
weights).  The weights are read one tensor at a time with plain file reads of the safetensors shards (no
memory map, so only the tensors held count in the process's memory):

1. **scores** -- a weight criterion whose group score is a reduction of per-member scores (``l1``, ``l2``,
   ``lamp``) is computed member by member as each tensor is read; a calibration criterion (``activation``,
   ``wanda_sp``, ``flap``) first gathers its activation statistics *layer by layer*: the calibration batches are
   embedded, then the hidden states pass through one decoder layer at a time, that layer's weights loaded from
   disk into the (otherwise meta) module, its consumers' input statistics accumulated, the weights freed.  The
   criterion's own functions (``_member_score``, ``_channel_score``, ``_unit_score``, FLAP's standardisation)
   score the members, so the scores are those of the fully loaded model;
2. **plan** -- :class:`prunekit.Pruner`'s planning (targets, ``round_to``, ``uniform``, global ranking) on the
   meta model with those scores (or a plan ``{group id: units}`` given by the caller);
3. **write** -- every tensor is sliced by :func:`prunekit.surgery.slice_tensor` with the indices
   :func:`prunekit.surgery.param_drops` derives from the groups (the slicing ``pk.prune`` uses) and written to
   the output shard of the same name; the meta model is pruned with ``pk.prune`` too, so the config follows
   (:func:`prunekit.hf.sync_config`), every written shape is checked against it, and per-layer widths get the
   pruning record (``prunekit.json``) exactly as :func:`prunekit.hf.save_pretrained` writes it.

At most one input tensor, its sliced copy (output shards are written tensor by tensor) and (with calibration)
one decoder layer plus the embeddings and output head are held at a time.  The source directory is only read; the output is written to a temporary
directory next to ``out_dir`` and renamed when complete, so a failure leaves no partial output.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .config import decoder_layers, require_transformers, text_config
from ..io.checkpoint import _safetensors_header
from .io import FORMAT, RECORD_FILE, HFSaveError, config_gaps

log = logging.getLogger("prunekit.hf")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype names <-> torch dtypes (those this torch has)
_ST_DTYPES: dict[str, torch.dtype] = {n: getattr(torch, t) for n, t in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")) if hasattr(torch, t)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(HFSaveError):
    """A checkpoint directory that cannot be pruned by streaming (the message names the file and the fix)."""


# ------------------------------------------------------------------ reading
class Checkpoint:
    """A transformers safetensors checkpoint directory, read one tensor at a time.

    ``weight_map``: ``{tensor name: shard file name}``.  :meth:`tensors` yields the tensors shard by shard;
    every tensor it returns (and every tensor passed to :meth:`track`) is counted in ``live_bytes`` until it is
    garbage collected, and the maximum is ``peak_bytes``: the memory bound the tests check.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._headers: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"pk.hf.prune_checkpoint: {self.path} has no config.json (not a transformers "
                                  "checkpoint directory)")
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                info = json.loads(index.read_text())
                wm = info["weight_map"]
                if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                    raise ValueError("weight_map is not {name: file}")
            except Exception as e:
                raise CheckpointError(f"pk.hf.prune_checkpoint: {index} is not a safetensors index ({type(e).__name__}: "
                                      f"{e}); the checkpoint is corrupt") from None
            self.weight_map: dict[str, str] = dict(wm)
            self.sharded = True
        elif (self.path / SINGLE_FILE).exists():
            self.weight_map = {k: SINGLE_FILE for k in self._keys(SINGLE_FILE)}
            self.sharded = False
        else:
            shards = sorted(p.name for p in self.path.glob("*.safetensors"))
            raise CheckpointError(f"pk.hf.prune_checkpoint: {self.path} has no {INDEX_FILE}" + (
                f" for its shards ({', '.join(shards[:3])}...)" if shards else f" and no {SINGLE_FILE}")
                + "; re-save the model with model.save_pretrained(...) (safetensors)")
        self.files = sorted(set(self.weight_map.values()))
        self.names: dict[str, list[str]] = {f: [] for f in self.files}  # shard file -> its tensor names (sorted)
        for k in sorted(self.weight_map):
            self.names[self.weight_map[k]].append(k)
        for f in self.files:
            if not (self.path / f).is_file():
                raise CheckpointError(f"pk.hf.prune_checkpoint: {self.path / f} is listed in {INDEX_FILE} but "
                                      "missing; the checkpoint is incomplete")
        self.live_bytes = 0
        self.peak_bytes = 0
        self.reads = 0

    def header(self, f: str) -> dict:
        """The parsed safetensors header of shard ``f`` (``{name: {"dtype", "shape", "data_offsets"}}``), read
        once; :class:`CheckpointError` when the file is not safetensors or its offsets do not fit."""
        h = self._headers.get(f)
        if h is None:
            path = self.path / f
            try:
                size = path.stat().st_size
                with open(path, "rb") as fh:
                    h = _safetensors_header(fh, size)
                    data_start = fh.tell()
            except OSError as e:
                raise CheckpointError(f"pk.hf.prune_checkpoint: cannot read {path} ({type(e).__name__}: {e})") from None
            if h is None:
                raise CheckpointError(f"pk.hf.prune_checkpoint: cannot read {path}: its header does not parse; the "
                                      "shard is corrupt or not safetensors")
            h = {k: v for k, v in h.items() if k != "__metadata__"}
            for k, v in h.items():
                a, b = v["data_offsets"]
                dt = _ST_DTYPES.get(v["dtype"])
                if dt is None or not 0 <= a <= b <= size - data_start or b - a != _numel(v["shape"]) * dt.itemsize:
                    raise CheckpointError(f"pk.hf.prune_checkpoint: {k} in {path} has dtype {v['dtype']}, shape "
                                          f"{v['shape']} and bytes {a}..{b} of {size - data_start}; the shard is "
                                          "corrupt (or uses a dtype this torch lacks)")
            self._headers[f] = h
            self._data_start[f] = data_start
        return h

    def _keys(self, f: str) -> list[str]:
        return list(self.header(f))

    def dtype_of(self, key: str) -> torch.dtype:
        """The stored dtype of tensor ``key`` (from its shard's header)."""
        return _ST_DTYPES[self.header(self.weight_map[key])[key]["dtype"]]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` from the shard headers (no tensor data is read); checks the index against the files."""
        out: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            have = self.header(f)
            for k in self.names[f]:
                if k not in have:
                    raise CheckpointError(f"pk.hf.prune_checkpoint: {INDEX_FILE} puts {k} in {f}, which does not "
                                          "hold it; the checkpoint is corrupt")
                out[k] = tuple(have[k]["shape"])
        return out

    def track(self, t: torch.Tensor) -> torch.Tensor:
        """Count ``t`` in ``live_bytes`` until it is freed."""
        n = t.numel() * t.element_size()
        self.live_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        self.live_bytes -= n

    def _get(self, fh, f: str, k: str) -> torch.Tensor:
        """Tensor ``k`` of shard ``f`` read into fresh memory with plain file reads (no memory map, so the
        shard's pages never count in the process's resident memory)."""
        entry = self.header(f)[k]
        a, b = entry["data_offsets"]
        buf = torch.empty(b - a, dtype=torch.uint8)
        try:
            fh.seek(self._data_start[f] + a)
            got = fh.readinto(memoryview(buf.numpy())) if b > a else 0
        except OSError as e:
            raise CheckpointError(f"pk.hf.prune_checkpoint: cannot read {k} from {self.path / f} ({type(e).__name__}: "
                                  f"{e}); the shard is corrupt") from None
        if got != b - a:
            raise CheckpointError(f"pk.hf.prune_checkpoint: {self.path / f} ends inside {k}; the shard is truncated")
        self.reads += 1
        return self.track(buf.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"]))

    def tensors(self, keys: Any = None) -> Iterator[tuple[str, str, torch.Tensor]]:
        """``(name, shard file, tensor)`` shard by shard, in file order (``keys``: only these names)."""
        want = None if keys is None else set(keys)
        for f in self.files:
            names = [k for k in self.names[f] if want is None or k in want]
            if not names:
                continue
            header = self.header(f)
            with open(self.path / f, "rb", buffering=0) as fh:
                for k in sorted(names, key=lambda n: header[n]["data_offsets"][0]):
                    yield k, f, self._get(fh, f, k)

    def load(self, keys) -> dict[str, torch.Tensor]:
        return {k: t for k, _f, t in self.tensors(keys)}


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header is written first from the known names, shapes and
    dtypes, then each tensor's bytes as it comes (any order), so at most one tensor is held.  The file is standard
    safetensors (header padded to 8 bytes, tensors laid out contiguously in name order), read by ``safe_open`` and
    ``from_pretrained``."""

    def __init__(self, path: str | os.PathLike, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]]):
        self.path, self._offsets, pos = Path(path), {}, 0
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for k in sorted(layout):
            shape, dtype = layout[k]
            n = _numel(shape) * dtype.itemsize
            header[k] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self._offsets[k] = (pos, n, tuple(shape), dtype)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start, self._written = 8 + len(raw), set()
        self._fh = open(self.path, "wb")
        self._fh.write(len(raw).to_bytes(8, "little") + raw)
        self._fh.truncate(self._data_start + pos)

    def write(self, key: str, t: torch.Tensor) -> None:
        pos, n, shape, dtype = self._offsets[key]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise CheckpointError(f"pk.hf.prune_checkpoint: {key} is {tuple(t.shape)} {t.dtype}, the shard header says "
                                  f"{shape} {dtype}")
        self._fh.seek(self._data_start + pos)
        if n:
            self._fh.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._written.add(key)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._fh.close()
        missing = set(self._offsets) - self._written
        if exc_type is None and missing:
            raise CheckpointError(f"pk.hf.prune_checkpoint: {self.path.name}: no data written for {sorted(missing)[:5]}")


# ------------------------------------------------------------------ models on meta
def load_config(src: str | os.PathLike):
    tf = require_transformers()
    try:
        return tf.AutoConfig.from_pretrained(str(src))
    except Exception as e:
        raise CheckpointError(f"pk.hf.prune_checkpoint: cannot read {Path(src) / 'config.json'} "
                              f"({type(e).__name__}: {e})") from None


def _model_class(config):
    tf = require_transformers()
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(tf, name, None)
        if cls is not None:
            return cls
    return tf.AutoModelForCausalLM


def meta_model(src: str | os.PathLike, *, attn_implementation: str | None = "eager") -> nn.Module:
    """The checkpoint's model built on the meta device from its ``config.json`` (no weights are read), in eval mode.

    ``attn_implementation="eager"`` (the default) is the attention path that runs on meta for every size
    (SDPA's mask code reads data); pass ``None`` for the config's own choice.  Analyse it with
    ``pk.analyze(model, example_inputs(model))`` or build a ``pk.Pruner`` on it for :func:`prune_checkpoint`."""
    config = load_config(src)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    config.use_cache = False
    dtype = _config_dtype(config)
    cls = _model_class(config)
    with torch.device("meta"):
        model = cls._from_config(config, **({"dtype": dtype} if dtype else {})) if hasattr(cls, "_from_config") \
            else cls(config)
    return model.eval()


def _config_dtype(config) -> torch.dtype | None:
    """The checkpoint's dtype as its config states it (``dtype`` / ``torch_dtype``), else None."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def example_inputs(model_or_config: Any, seq_len: int = 16) -> dict[str, torch.Tensor]:
    """Token inputs for analysing a causal LM on meta: ``input_ids`` ``[1, seq_len]`` and a full attention mask."""
    cfg = text_config(getattr(model_or_config, "config", model_or_config))
    vocab = int(getattr(cfg, "vocab_size", 2) or 2)
    ids = torch.arange(seq_len).remainder(vocab).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _name_map(model: nn.Module) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``{state name: canonical name}`` (tied parameters share one canonical name) and the reverse."""
    canon: dict[int, str] = {}
    out: dict[str, str] = {}
    for n, p in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        out[n] = canon.setdefault(id(p), n)
    rev: dict[str, list[str]] = {}
    for n, c in out.items():
        rev.setdefault(c, []).append(n)
    return out, rev


def _persistent(model: nn.Module) -> set[str]:
    return set(model.state_dict(keep_vars=True).keys())


def _check_against(model: nn.Module, ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """The checkpoint's names and shapes must be the model's (tied parameters may be stored once)."""
    shapes = ckpt.shapes()
    names, rev = _name_map(model)
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(k for k in shapes if k not in state)
    if unexpected:
        raise CheckpointError(f"pk.hf.prune_checkpoint: {ckpt.path} holds tensors {type(model).__name__} does not "
                              f"have ({', '.join(unexpected[:4])}); the checkpoint is in another layout (e.g. a "
                              "per-expert MoE layout that transformers converts on load) or for another config: "
                              "prune it in memory (pk.Pruner on from_pretrained) instead")
    have = {names.get(k, k) for k in shapes}
    missing = sorted(k for k in state if names.get(k, k) not in have)
    if missing:
        raise CheckpointError(f"pk.hf.prune_checkpoint: {ckpt.path} lacks {', '.join(missing[:4])}; the checkpoint "
                              "is incomplete")
    bad = [f"{k}: file {shapes[k]}, config {tuple(state[k].shape)}" for k in shapes
           if tuple(state[k].shape) != shapes[k]]
    if bad:
        raise CheckpointError("pk.hf.prune_checkpoint: tensor shapes do not fit config.json (" + "; ".join(bad[:3])
                              + f"); the checkpoint in {ckpt.path} is corrupt or its config.json belongs to another "
                              "model")
    return shapes


# ------------------------------------------------------------------ scores, member by member
def _supports(criterion) -> str:
    from ..plan.importance.base import Criterion
    from ..plan.importance.calibration import CalibrationCriterion
    if isinstance(criterion, CalibrationCriterion):
        return "calibration"
    if type(criterion)._group_score is Criterion._group_score:
        return "weight"
    raise CheckpointError(f"pk.hf.prune_checkpoint: criterion {criterion.name!r} scores a group from all its tensors "
                          "at once, which streaming cannot do shard by shard; use a per-member weight criterion "
                          "('l1', 'l2', 'lamp') or a calibration criterion ('activation', 'wanda_sp', 'flap')")


@dataclass
class _MemberJob:
    gid: int
    idx: int  # position in group.members (the reduction order)
    member: Any
    fn: Callable[[torch.Tensor], torch.Tensor | None]


@dataclass
class StreamScores:
    scores: dict[int, torch.Tensor]
    stats: Any = None
    fallback: list[int] = field(default_factory=list)


def stream_scores(model: nn.Module, graph, groups, criterion, ckpt: Checkpoint, stats=None) -> StreamScores:
    """``criterion.scores(model, graph, groups)`` of the fully loaded model, computed while the checkpoint's tensors
    are read one at a time (``model`` stays on meta).  ``stats``: a calibration criterion's statistics
    (:func:`layerwise_input_stats`)."""
    from ..plan.importance.base import member_role, normalize_scores, reduce_members, resolve_groups
    from ..plan.importance.calibration import consumer_members
    from ..plan.importance.weight import L2
    kind = _supports(criterion)
    gs = resolve_groups(graph, groups)
    names, _rev = _name_map(model)
    jobs: dict[str, list[_MemberJob]] = {}
    fallback: list[int] = []

    def add(fqn, job):
        jobs.setdefault(names.get(fqn, fqn), []).append(job)

    def weight_jobs(crit, g):
        for i, m in enumerate(g.members):
            try:
                p = model.get_parameter(m.fqn)
            except AttributeError:
                continue
            if not p.is_floating_point() or (crit.skip_frozen and not p.requires_grad):
                continue
            role = member_role(model, m)
            if (role == "consumer" and not crit.include_consumers) or (role == "bias" and not crit.include_bias):
                continue
            add(m.fqn, _MemberJob(g.id, i, m, partial(
                lambda w, c, gg, mm: c._member_score(model, gg, mm, w.float(), None), c=crit, gg=g, mm=m)))

    fb = None
    if kind == "calibration":
        fb = L2(reduction=criterion.reduction, include_consumers=criterion.include_consumers,
                include_bias=criterion.include_bias, skip_frozen=criterion.skip_frozen)
    for g in gs:
        if kind == "weight":
            weight_jobs(criterion, g)
            continue
        n = 0
        for i, (name, m, w) in enumerate(consumer_members(model, g)):
            st = stats.get(name) if stats is not None else None
            if st is None or st.channels != w.shape[m.dim]:
                continue
            n += 1
            idx = next((j for j, mm in enumerate(g.members) if mm is m), i)
            add(m.fqn, _MemberJob(g.id, idx, m, partial(
                lambda w, s, mm: criterion._unit_score(mm, criterion._channel_score(s, w, mm.dim)).float(),
                s=st, mm=m)))
        if not n:
            fallback.append(g.id)
            weight_jobs(fb, g)
    vecs: dict[int, dict[int, torch.Tensor]] = {g.id: {} for g in gs}
    for key, _f, t in ckpt.tensors():
        for job in jobs.get(names.get(key, key), ()):
            v = job.fn(t)
            if v is not None:
                vecs[job.gid][job.idx] = v.to(torch.float32).cpu()
        del t
    out: dict[int, torch.Tensor] = {}
    for g in gs:
        vs = [vecs[g.id][i] for i in sorted(vecs[g.id])]
        how = criterion.reduction if g.id not in fallback else fb.reduction
        s = reduce_members(vs, how) if vs else torch.zeros(g.size)
        if not vs:
            log.info("%s: group %d has no scorable parameter slice; scores are zero", criterion.name, g.id)
        out[g.id] = normalize_scores(s.detach().float().cpu(), criterion.normalize)
    if fallback:
        log.info("%s: %d group(s) use %s instead: %s", criterion.name, len(fallback), criterion.fallback_name,
                 fallback[:20])
    std = getattr(criterion, "standardize_scores", None)
    if kind == "calibration" and std is not None and getattr(criterion, "standardize", False):
        out = std(model, gs, out)
    return StreamScores(out, stats, fallback)


# ------------------------------------------------------------------ layer-by-layer calibration
class _Caught(Exception):
    def __init__(self, args, kwargs):
        super().__init__("captured")
        self.args_, self.kwargs_ = args, kwargs


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records what the model passes to it and stops the forward."""

    def forward(self, *args, **kwargs):
        raise _Caught(args, kwargs)


class _Replay(nn.Module):
    """Stands in for a decoder layer on the tail pass: layer 0 returns the last layer's output for the batch,
    the others pass it on."""

    def __init__(self, out: Callable[[], Any] | None, tuple_out: bool):
        super().__init__()
        self.out, self.tuple_out = out, tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        h = self.out() if self.out is not None else hidden_states
        return (h,) if self.tuple_out else h


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    cfg = text_config(model.config)
    layers = decoder_layers(model, cfg)
    if not layers:
        raise CheckpointError(f"pk.hf.prune_checkpoint: {type(model).__name__} has no ModuleList of "
                              f"{getattr(cfg, 'num_hidden_layers', '?')} decoder layers; layer-by-layer calibration "
                              "needs one (use a weight criterion such as 'l2')")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == len(layers) and mod[0] is layers[0]:
            return name, mod
    raise AssertionError("unreachable")


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


def _materialize(model: nn.Module, ckpt: Checkpoint, keys, names: Mapping[str, str], rev) -> None:
    for k, _f, t in ckpt.tensors(keys):
        for n in rev.get(names.get(k, k), [k]):
            _set_tensor(model, n, t)


def _to_meta(model: nn.Module, prefix: str) -> None:
    mod = model.get_submodule(prefix)
    for m in mod.modules():
        for a, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                m._parameters[a] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for a, b in list(m._buffers.items()):
            if b is not None and not b.is_meta and a not in m._non_persistent_buffers_set:
                m._buffers[a] = torch.empty_like(b, device="meta")


def _real_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are not in a checkpoint: computed as transformers does after
    a meta-device build (empty CPU tensors, then the model's ``_init_weights`` on their module)."""
    for mod in model.modules():
        nonp = [a for a in mod._non_persistent_buffers_set if mod._buffers.get(a) is not None]
        if not nonp:
            continue
        for a in nonp:
            mod._buffers[a] = torch.empty_like(mod._buffers[a], device="cpu")
        init = getattr(model, "_init_weights", None)
        if init is not None:
            init(mod)
        for a in nonp:
            b = mod._buffers[a]
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise CheckpointError(f"pk.hf.prune_checkpoint: cannot compute the buffer {a} of "
                                      f"{type(mod).__name__} without loading the model; use a weight criterion")


def runner_model(src: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The checkpoint's model on meta (its own attention implementation) with its non-persistent buffers real:
    the model layer-by-layer calibration loads one layer at a time into."""
    config = load_config(src)
    config.use_cache = False
    if dtype is not None:
        config.dtype = dtype
    with torch.device("meta"):
        cls = _model_class(config)
        model = cls._from_config(config, **({"dtype": dtype} if dtype else {})) if hasattr(cls, "_from_config") \
            else cls(config)
    _real_buffers(model)
    return model.eval()


def layerwise_input_stats(model: nn.Module, ckpt: Checkpoint, names, data: Any, *, forward_fn: Callable | None = None,
                          max_batches: int | None = None):
    """:func:`prunekit.plan.importance.collect_input_stats` of the fully loaded model, one decoder layer in
    memory at a time.

    ``model`` is a :func:`runner_model`.  The parts outside the decoder layers (embeddings, final norm, output
    head) are loaded once; layer 0's inputs are captured per batch, then each layer is loaded, run on every
    batch's hidden states with hooks on its consumers, and freed; a last pass runs the model's tail on the
    final hidden states (the layers replaced by their recorded outputs)."""
    from ..plan.importance.base import iter_batches
    from ..plan.importance.calibration import CalibrationStats, ChannelStats, _mask_of, _tokens, calib_forward
    lname, layers = _layer_list(model)
    pnames, rev = _name_map(model)
    keys = list(ckpt.weight_map)
    prefix = [f"{lname}.{i}." for i in range(len(layers))]
    outside = [k for k in keys if not k.startswith(f"{lname}.")]
    stats = CalibrationStats()
    state: dict[str, Any] = {"mask": None}
    warned: set[str] = set()
    want = sorted(set(names))

    def hook(name, module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
            return
        rows = _tokens(module, x, state["mask"], name, warned)
        st = stats.get(name)
        if st is None:
            st = stats[name] = ChannelStats(rows.shape[-1])
        elif st.channels != rows.shape[-1]:
            return
        st.update(rows)

    @contextlib.contextmanager
    def hooks(which):
        hs = [model.get_submodule(n).register_forward_pre_hook(partial(hook, n)) for n in which]
        try:
            yield
        finally:
            for h in hs:
                h.remove()

    batches = list(iter_batches(data, max_batches))
    if not batches:
        raise ValueError("calibration: data yielded no batches")
    originals = list(layers)
    caught: list[tuple[torch.Tensor, tuple, dict]] = []
    tuple_out = False
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            _materialize(model, ckpt, outside, pnames, rev)
            layers[0] = _Catcher()
            for batch in batches:
                state["mask"] = _mask_of(batch)
                try:
                    calib_forward(model, batch, forward_fn)
                except _Caught as c:
                    h, *rest = c.args_ if c.args_ else (c.kwargs_.pop("hidden_states"),)
                    caught.append((h, tuple(rest), c.kwargs_))
                    continue
                raise CheckpointError(f"pk.hf.prune_checkpoint: the forward of {type(model).__name__} never reached "
                                      f"{lname}.0; layer-by-layer calibration cannot capture its input")
            layers[0] = originals[0]
            for i, layer in enumerate(originals):
                _materialize(model, ckpt, [k for k in keys if k.startswith(prefix[i])], pnames, rev)
                mine = [n for n in want if n.startswith(prefix[i])]
                with hooks(mine):
                    for b, (h, rest, kw) in enumerate(caught):
                        state["mask"] = _mask_of(batches[b])
                        out = layer(h, *rest, **kw)
                        tuple_out = isinstance(out, tuple)
                        caught[b] = (out[0] if tuple_out else out, rest, kw)
                _to_meta(model, f"{lname}.{i}")
            cur = {"b": 0}
            for i in range(len(layers)):
                layers[i] = _Replay((lambda: caught[cur["b"]][0]) if i == 0 else None, tuple_out)
            tail = [n for n in want if not n.startswith(f"{lname}.")]
            with hooks(tail):
                for b, batch in enumerate(batches):
                    cur["b"] = b
                    state["mask"] = _mask_of(batch)
                    calib_forward(model, batch, forward_fn)
                    stats.batches += 1
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for k in outside:
            for n in rev.get(pnames.get(k, k), [k]):
                owner = n.rpartition(".")[0]
                if owner:
                    _to_meta(model, owner)
    return stats


# ------------------------------------------------------------------ the entry point
@dataclass
class StreamResult:
    """What :func:`prune_checkpoint` did: the output directory, the plan (``{group id: units}`` of ``graph``),
    the config values that changed, whether the widths differ per layer (``prunekit.json`` written), and the
    memory figures: ``peak_tensor_bytes`` (most bytes of checkpoint tensors and output shards alive at once),
    ``largest_shard_bytes`` of the source, ``params`` before / after."""

    out_dir: Path
    plan: dict[int, list[int]]
    graph: Any
    changed: dict[str, tuple[Any, Any]]
    per_layer: bool
    peak_tensor_bytes: int
    largest_shard_bytes: int
    largest_layer_bytes: int
    params_before: int
    params_after: int
    scores: dict[int, torch.Tensor] | None = None


def _shard_bytes(ckpt: Checkpoint, shapes, dtypes) -> int:
    per: dict[str, int] = {}
    for k, f in ckpt.weight_map.items():
        per[f] = per.get(f, 0) + _numel(shapes[k]) * dtypes[k]
    return max(per.values()) if per else 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _out_dir(out: Path, src: Path, overwrite: bool) -> None:
    if out.resolve() == src.resolve():
        raise CheckpointError("pk.hf.prune_checkpoint: out_dir is the source directory; write to a new directory")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"pk.hf.prune_checkpoint: {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"pk.hf.prune_checkpoint: {out} is not empty; choose a new directory or pass "
                              "overwrite=True")


def prune_checkpoint(src_dir: str | os.PathLike, out_dir: str | os.PathLike, plan_or_pruner: Any = None, *,
                     criterion: Any = "l2", target: Any = None, round_to: int = 1, uniform: bool = True,
                     global_pruning: bool = False, data: Any = None, forward_fn: Callable | None = None,
                     max_batches: int | None = None, overwrite: bool = False, seq_len: int = 16,
                     **pruner_kwargs: Any) -> StreamResult:
    """Prune the transformers checkpoint in ``src_dir`` into ``out_dir`` without loading it (see the module
    docstring).

    Args:
        src_dir: ``config.json`` + ``model.safetensors`` or sharded ``model-0000x-of-0000y.safetensors`` with
            ``model.safetensors.index.json``.  Only read.
        out_dir: the pruned checkpoint (same shard names, updated index and ``config.json``; other files such as
            the tokenizer's are copied); plain ``from_pretrained`` loads it when the widths are uniform, otherwise
            :func:`prunekit.hf.from_pretrained` (``prunekit.json`` holds the pruning record).
        plan_or_pruner: ``None`` (a ``pk.Pruner`` is made from ``criterion``, ``target``, ``round_to``,
            ``uniform``, ``global_pruning``, ``data`` and ``pruner_kwargs``), a plan ``{group id: units}`` for
            ``pk.analyze(meta_model(src_dir), example_inputs(...))``, or a ``pk.Pruner`` built on
            :func:`meta_model` (its criterion is computed by streaming).
        data: calibration batches for ``"activation"`` / ``"wanda_sp"`` / ``"flap"`` (run layer by layer).
    Returns a :class:`StreamResult`.
    """
    from ..algorithms.pruner import Pruner
    from ..graph import analyze
    from ..surgery import RECORD_ATTR, normalize_plan, param_drops, slice_tensor
    from ..surgery import prune as _prune
    src, out = Path(src_dir), Path(out_dir)
    ckpt = Checkpoint(src)
    if (src / RECORD_FILE).exists():
        raise CheckpointError(f"pk.hf.prune_checkpoint: {src} is a per-layer pruned checkpoint ({RECORD_FILE}); "
                              "streaming prunes checkpoints plain transformers can build: load it with "
                              "pk.hf.from_pretrained and prune it in memory")
    _out_dir(out, src, overwrite)

    pruner = plan_or_pruner if isinstance(plan_or_pruner, Pruner) else None
    if pruner is not None:
        model, graph = pruner.model, pruner.graph
        x = pruner.example_inputs
    else:
        model = meta_model(src)
        x = example_inputs(model, seq_len)
        if isinstance(plan_or_pruner, Mapping):
            graph = analyze(model, x)
        elif plan_or_pruner is None:
            if target is None:
                raise ValueError("pk.hf.prune_checkpoint: pass target=... (e.g. pk.ParamsTarget(0.5)), a plan "
                                 "{group id: units} or a pk.Pruner")
            pruner = Pruner(model, x, criterion, target, round_to=round_to, uniform=uniform,
                            global_pruning=global_pruning, data=data, forward_fn=forward_fn,
                            criterion_kwargs={"max_batches": max_batches} if max_batches else None, **pruner_kwargs)
            graph = pruner.graph
        else:
            raise TypeError("pk.hf.prune_checkpoint: plan_or_pruner must be None, a plan {group id: units} or a "
                            f"pk.Pruner, got {type(plan_or_pruner).__name__}")
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("pk.hf.prune_checkpoint: the Pruner's model must be built on the meta device "
                         "(pk.hf.meta_model(src_dir)); the weights come from the checkpoint")
    shapes = _check_against(model, ckpt)
    esize = {k: t.element_size() for k, t in model.state_dict(keep_vars=True).items()}
    esize.update({k: ckpt.dtype_of(k).itemsize for k in ckpt.weight_map})
    largest_shard = _shard_bytes(ckpt, shapes, esize)
    try:
        lname, layers = _layer_list(model)
        per_layer = [sum(_numel(s) * esize[k] for k, s in shapes.items() if k.startswith(f"{lname}.{i}."))
                     for i in range(len(layers))]
        largest_layer = max(per_layer) if per_layer else 0
    except CheckpointError:
        largest_layer = 0

    scores = None
    if pruner is not None:
        if getattr(pruner, "bias_compensation", False):
            raise ValueError("pk.hf.prune_checkpoint: bias_compensation is not supported by streaming; prune in memory")
        crit = pruner.criterion
        kind = _supports(crit)
        stats = None
        if kind == "calibration":
            if pruner.data is None:
                raise ValueError(f"criterion {crit.name!r} needs data=... calibration batches")
            from ..plan.importance.calibration import consumer_members
            slots = pruner._slots()
            names = {n for sl in slots for n, _m, _w in consumer_members(model, sl.group)}
            runner = runner_model(src, dtype=_dtype_of(model))
            stats = layerwise_input_stats(runner, ckpt, names, pruner.data, forward_fn=pruner.forward_fn,
                                          max_batches=getattr(crit, "max_batches", None))
            del runner
        cache: dict = {}

        def streamed(groups=None):
            if groups is None:
                groups = [s.group for s in pruner._slots()]
            key = tuple(g.id for g in groups)
            if key not in cache:
                res = stream_scores(model, graph, groups, crit, ckpt, stats)
                cache[key] = res.scores
                if stats is not None:
                    stats.graph = graph
                    crit.last_stats = stats
            return cache[key]
        pruner.scores = streamed  # the Pruner's own planning, with the streamed scores
        try:
            plan = pruner.plan()
        finally:
            del pruner.scores
        scores = next(iter(cache.values()), None)
    else:
        plan = {int(k): [int(u) for u in v] for k, v in plan_or_pruner.items()}

    norm = normalize_plan(graph, plan)
    drops = param_drops(graph, norm)
    names, rev = _name_map(model)
    aliases = getattr(graph.tape, "param_aliases", {}) or {}
    drops_by_canon: dict[str, Any] = {}
    for fqn, dims in drops.items():
        for n in [fqn] + list(aliases.get(fqn, [])):
            drops_by_canon[names.get(n, n)] = dims
    params_before = sum(p.numel() for p in model.parameters())
    # the meta model follows (config sync, pruning record); its shapes check every written tensor
    base_cfg = copy.deepcopy(model.config.to_dict())
    attn = getattr(model.config, "_attn_implementation", None)
    if norm:
        _prune(model, graph, plan, verify=False)
    want = model.state_dict(keep_vars=True)
    params_after = sum(p.numel() for p in model.parameters())

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for f in ckpt.files:
            keys = ckpt.names[f]
            with ShardWriter(tmp / f, {k: (tuple(want[k].shape), ckpt.dtype_of(k)) for k in keys}) as w:
                for key, _f, t in ckpt.tensors(keys):
                    dims = drops_by_canon.get(names.get(key, key))
                    new = ckpt.track(slice_tensor(t, dims, "remove").contiguous()) if dims else t
                    del t
                    if tuple(new.shape) != tuple(want[key].shape):
                        raise CheckpointError(f"pk.hf.prune_checkpoint: {key} sliced to {tuple(new.shape)} but the "
                                              f"pruned model has {tuple(want[key].shape)}")
                    w.write(key, new)
                    weight_map[key] = f
                    total += new.numel() * new.element_size()
                    del new
        if ckpt.sharded:
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total, "total_parameters": params_after},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        _write_config(model, base_cfg, attn, tmp)
        for p in src.iterdir():
            if p.is_file() and p.name not in ckpt.files and p.name not in (INDEX_FILE, "config.json", RECORD_FILE):
                shutil.copy2(p, tmp / p.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync = getattr(model, "_prunekit_stream_sync", None)
    from .config import changes
    res = StreamResult(out, {g: list(map(int, u)) for g, u in norm.items()}, graph, changes(model) if norm else {},
                       bool(sync), ckpt.peak_bytes, largest_shard, largest_layer, params_before, params_after, scores)
    log.info("pruned %s -> %s: %d -> %d parameters, peak %.1f MB of tensors held (largest shard %.1f MB)", src, out,
             params_before, params_after, res.peak_tensor_bytes / 2**20, largest_shard / 2**20)
    _ = RECORD_ATTR
    return res


def _dtype_of(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        return p.dtype
    return None


def _write_config(model: nn.Module, base_cfg: dict, attn, out: Path) -> None:
    """config.json the way :func:`prunekit.hf.save_pretrained` writes it: the pruned config where it can say what
    the model became, else the original config plus ``prunekit.json`` (the pruning record)."""
    from ..surgery import RECORD_ATTR
    from .config import derive
    cfg = model.config
    if attn is not None:
        cfg._attn_implementation = attn
    gaps, fold = config_gaps(model)
    if fold:
        raise CheckpointError(f"pk.hf.prune_checkpoint: {', '.join(fold)} scale the embeddings by sqrt(hidden_size), "
                              "which a pruned hidden width changes; streaming cannot fold the scale into the saved "
                              "weights: prune this model in memory and save with pk.hf.save_pretrained")
    model_cfg_dict = base_cfg
    if not gaps:
        cfg.save_pretrained(out)
        object.__setattr__(model, "_prunekit_stream_sync", False)
        return
    sync = derive(model)
    base = type(cfg).from_dict(copy.deepcopy(model_cfg_dict))
    base.architectures = [type(model).__name__]
    base.save_pretrained(out)
    info = {"format": FORMAT, "architecture": type(model).__name__, "config": sync.values,
            "per_layer": sync.per_layer, "why": gaps[:20], "record": getattr(model, RECORD_ATTR, None)}
    (out / RECORD_FILE).write_text(json.dumps(info))
    object.__setattr__(model, "_prunekit_stream_sync", True)
    log.warning("%s: widths differ per layer (%s); the output holds the original config and the pruning record "
                "(%s): load it with pk.hf.from_pretrained", type(model).__name__, "; ".join(gaps[:3]), RECORD_FILE)


__all__ = ["Checkpoint", "CheckpointError", "StreamResult", "example_inputs", "layerwise_input_stats", "meta_model",
           "prune_checkpoint", "runner_model", "stream_scores"]
