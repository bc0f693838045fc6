"""Checkpoints of pruned models: state dict + pruning record in one file, written atomically, checked on load.

A pruned model cannot be rebuilt from its class alone (its layers are narrower than the code says), so a
checkpoint carries the pruning record (``model._prunekit_record``, see :func:`prunekit.prune`) next to the
weights.  :func:`load` replays the record on a freshly built original model and then loads the weights.

Format: one ``.safetensors`` file whose string metadata holds the record and a few facts (prunekit and torch
versions, model class, a sha256 per tensor and one over the metadata), or, for ``.pt``/``.pth`` paths or when
``safetensors`` is not installed, a ``torch.save`` file ``{"state_dict", "prunekit_record", "meta"}`` with the
same content.  Both are verified the same way on load, so corruption is reported instead of loaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Union

import torch
from torch import nn

from ..surgery import RECORD_ATTR, PruningError, replay_record

log = logging.getLogger("prunekit.io")

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "prunekit.checkpoint"
FORMAT_VERSION = 1
_TORCH_SUFFIXES = (".pt", ".pth")
_MASKS_ATTR = "_prunekit_masks"


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the model was left unchanged."""


class Checkpoint(NamedTuple):
    """What :func:`read_checkpoint` found in a file.

    ``record`` is ``None`` for a plain state dict (not written by :func:`save`); ``meta`` then is empty.
    """

    state_dict: dict[str, torch.Tensor]
    record: list[dict] | None
    meta: dict[str, Any]


# ---------------------------------------------------------------- helpers
def _safetensors():
    """The ``safetensors.torch`` module, or ``None`` when the optional dependency is not installed."""
    try:
        import safetensors.torch as st
    except ImportError:
        return None
    return st


def canonical_json(obj: Any) -> str:
    """JSON text that is equal for equal content: a JSON round trip first, so int dict keys (as in a live
    record) and their string form compare and hash the same."""
    return json.dumps(json.loads(json.dumps(obj)), sort_keys=True, separators=(",", ":"))


def model_shapes(model: nn.Module) -> dict[str, list]:
    """{state-dict key: [shape, dtype]}: what a workdir remembers of the model it was made for."""
    return {k: [list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's class name and the name, shape and dtype of every state-dict entry."""
    body = canonical_json({"class": type(model).__qualname__, "state": model_shapes(model)})
    return hashlib.sha256(body.encode()).hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _digest_meta(record: Any, fields: Mapping[str, Any]) -> str:
    body = {k: v for k, v in fields.items() if k != "meta_sha256"}
    return hashlib.sha256(canonical_json({"record": record, "fields": body}).encode()).hexdigest()


def _digest_tensor(t: torch.Tensor) -> str:
    """sha256 of dtype, shape and raw bytes (so a changed header is caught as well as changed data)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _decode_record(record: list) -> list[dict]:
    """Undo JSON's string keys for the record's integer keys (group ids, dims)."""
    out = []
    for step in record:
        step = dict(step)
        step["groups"] = {int(g): u for g, u in step.get("groups", {}).items()}
        step["params"] = {f: {**info, "remove": {int(d): i for d, i in info["remove"].items()}}
                          for f, info in step.get("params", {}).items()}
        out.append(step)
    return out


def _class_name(model: nn.Module) -> str:
    return type(model).__qualname__


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step (``os.replace``).

    A crash or an exception while writing leaves ``path`` as it was (or absent) and removes the temporary.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # honours the umask, unlike mkstemp
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One tensor per distinct view (tied weights become aliases), cloned where storage is still shared,
    contiguous and on the CPU: what safetensors accepts."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"cannot save {name!r}: it is on the meta device and has no values; "
                                  "materialize the model (e.g. model.to_empty(device='cpu') and load weights) first")
        sid = (t.device, t.untyped_storage().data_ptr())
        key = (sid, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in views:
            aliases[name] = views[key]
            continue
        if t.numel():
            views[key] = name
        if (t.numel() and sid in storages) or not t.is_contiguous():
            t = t.contiguous().clone() if t.is_contiguous() else t.contiguous()
        storages.add(sid)
        tensors[name] = t.cpu()
    return tensors, aliases


def with_module_versions(state: Mapping[str, torch.Tensor], model: nn.Module) -> Mapping[str, torch.Tensor]:
    """``state`` carrying ``model``'s per-module state-dict versions when it has none of its own.

    ``nn.Module.state_dict()`` records each module's ``_version`` in ``state_dict._metadata``; a state dict read
    back from a safetensors file (or rebuilt as a plain dict) has lost it, and modules whose
    ``_load_from_state_dict`` checks the version (torchvision's MNASNet: "version should be set to 1 or 2")
    then refuse to load.  The freshly built model's own versions describe its code, so they are used.
    """
    if getattr(state, "_metadata", None) is not None:
        return state
    meta = getattr(model.state_dict(keep_vars=True), "_metadata", None)
    if meta is None:
        return state
    out = OrderedDict(state)
    out._metadata = meta  # type: ignore[attr-defined]
    return out


# ---------------------------------------------------------------- save
def save(model: nn.Module, path: PathLike, *, extra: dict | None = None) -> Path:
    """Write ``model``'s state dict and pruning record to ``path`` and return the path.

    The file is a ``.safetensors`` file whose metadata carries the record, the prunekit and torch versions,
    the model class name and checksums (sha256 per tensor and over the metadata), so :func:`load` detects
    a corrupt or truncated file.  For a ``.pt``/``.pth`` path, or when the optional ``safetensors`` package
    is missing, a ``torch.save`` file ``{"state_dict", "prunekit_record", "meta"}`` with the same content is
    written instead.  Tied weights are stored once (the other names are recorded as aliases).  The file is
    written to a temporary next to ``path`` and moved into place, so a crash never leaves half a file.

    Unpruned models are saved with an empty record.  Masked models (:func:`prunekit.mask`) are saved with
    their current weights, i.e. the masked units as zeros; the masks themselves are not saved (the names of
    the masked tensors are listed in ``meta["masked"]``), so call :func:`prunekit.prune` first to store a
    physically smaller model.

    Returns the path written: ``path`` itself, except when ``safetensors`` is missing and ``path`` does not
    end in ``.pt``/``.pth``; then the torch.save file goes to ``path.with_suffix(".pt")``.

    ``extra`` is any JSON-serialisable dict (e.g. epoch, metrics); read it back with
    ``read_checkpoint(path).meta["extra"]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save() expects an nn.Module, got {type(model).__name__}")
    path = Path(path)
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save(extra=...) must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None
    record = json.loads(json.dumps(getattr(model, RECORD_ATTR, None) or []))
    tensors, aliases = _dedupe(model.state_dict())
    masked = sorted(getattr(model, _MASKS_ATTR, None) or {})
    if masked:
        log.info("saving %d masked tensor(s) with their masked units as zeros; the masks are not saved", len(masked))
    from .. import __version__
    fields: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "prunekit_version": __version__,
        "torch_version": str(torch.__version__), "model_class": _class_name(model),
        "model_module": type(model).__module__, "aliases": aliases,
        "sha256": {k: _digest_tensor(t) for k, t in tensors.items()}, "extra": extra, "masked": masked,
    }
    fields["meta_sha256"] = _digest_meta(record, fields)
    st = _safetensors()
    use_torch = st is None or path.suffix.lower() in _TORCH_SUFFIXES
    if use_torch and path.suffix.lower() not in _TORCH_SUFFIXES:
        # torch.load() treats a ".safetensors" name as safetensors: give the torch.save file its own suffix
        log.warning("safetensors is not installed; writing %s in torch.save format instead of %s (pip install "
                    "safetensors for the default format)", path.with_suffix(".pt"), path)
        path = path.with_suffix(".pt")
    with atomic_path(path) as tmp:
        if use_torch:
            state = dict(tensors)
            state.update({a: state[c] for a, c in aliases.items()})
            torch.save({"state_dict": state, "prunekit_record": record, "meta": fields}, tmp)
        else:
            header = {k: json.dumps(v) for k, v in fields.items()}
            header["prunekit_record"] = json.dumps(record)
            st.save_file(tensors, str(tmp), metadata=header)
    log.info("saved %s (%d tensors, %d pruning step(s))", path, len(tensors), len(record))
    return path


# ---------------------------------------------------------------- read
def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(9)
        size = f.seek(0, os.SEEK_END)
    # safetensors first: an 8-byte little-endian header length (any first byte, 0x80 included) then JSON
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"
    raise CheckpointError(f"{path}: not a safetensors or torch.save file (it starts with {head!r}); the file is "
                          "truncated or corrupt, or in another format: save it again with prunekit.save()")


def _unwrap(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: the dict itself, or its ``"state_dict"``/``"model"`` entry."""
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], where)
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise CheckpointError(f"{where}: expected a state dict (a dict of name -> tensor, or a dict with a "
                              f"'state_dict' or 'model' entry), got {type(obj).__name__}")
    return dict(obj)


def _read_safetensors(path: Path, map_location: Any) -> tuple[dict, dict[str, str]]:
    st = _safetensors()
    if st is None:
        raise CheckpointError(f"{path} is a safetensors file but the safetensors package is not installed; "
                              "pip install safetensors")
    from safetensors import safe_open
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            header = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise CheckpointError(f"{path}: cannot read the safetensors file ({type(e).__name__}: {e}); the file is "
                              "truncated or corrupt: save it again") from e
    return state, header


def read_checkpoint(path: PathLike, map_location: Any = "cpu") -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save` (or a plain state dict file).

    Checksums are verified for prunekit checkpoints; a mismatch, a truncated file or a bad header raises
    :class:`CheckpointError` naming the file.  Plain ``torch.save`` files are loaded with
    ``weights_only=True`` (no arbitrary code); a dict with a ``"state_dict"`` or ``"model"`` entry is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path (save one with prunekit.save())")
    kind = _sniff(path)
    record: Any = None
    fields: dict[str, Any] = {}
    if kind == "safetensors":
        state, header = _read_safetensors(path, map_location)
        if "prunekit_record" in header:
            try:
                record = json.loads(header.pop("prunekit_record"))
                fields = {k: json.loads(v) for k, v in header.items()}
            except ValueError as e:
                raise CheckpointError(f"{path}: the checkpoint metadata is not valid JSON ({e}); the file is "
                                      "corrupt: save it again") from None
    else:
        try:
            with open(path, "rb") as f:  # a file object: torch.load() would read a "*.safetensors" name as safetensors
                obj = torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/UnpicklingError/EOFError/... here
            raise CheckpointError(f"{path}: cannot read the torch.save file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); the file is truncated or corrupt, "
                                  "or needs arbitrary unpickling (then load it yourself and pass the dict)") from e
        if isinstance(obj, Mapping) and isinstance(obj.get("meta"), Mapping) and "prunekit_record" in obj:
            record, fields = obj["prunekit_record"], dict(obj["meta"])
        state = _unwrap(obj, str(path))
    if record is None:
        return Checkpoint(state, None, {})
    _verify(path, state, record, fields)
    for alias, canon in fields.get("aliases", {}).items():
        state[alias] = state[canon]
    return Checkpoint(state, _decode_record(record), fields)


def _verify(path: Path, state: Mapping[str, torch.Tensor], record: Any, fields: Mapping[str, Any]) -> None:
    if fields.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {fields.get('format')!r}; expected {FORMAT!r}")
    if int(fields.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer prunekit ({fields.get('prunekit_version')}, format "
                              f"{fields.get('format_version')}); upgrade prunekit to read it")
    if fields.get("meta_sha256") != _digest_meta(record, fields):
        raise CheckpointError(f"{path}: checksum mismatch in the checkpoint metadata (pruning record); the file is "
                              "corrupt: save it again")
    sums = fields.get("sha256", {})
    aliases = fields.get("aliases", {})
    missing = sorted(set(sums) - set(state)) + sorted(c for c in aliases.values() if c not in state)
    if missing:
        raise CheckpointError(f"{path}: tensors {missing[:5]} listed in the metadata are missing; the file is "
                              "corrupt: save it again")
    for name, want in sums.items():
        if _digest_tensor(state[name]) != want:
            raise CheckpointError(f"{path}: checksum mismatch for tensor {name!r}; the file is corrupt: save it again")


# ---------------------------------------------------------------- load
def resolve_model(model_or_builder: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """The model itself, or what a zero-argument builder returns (checked to be an ``nn.Module``)."""
    model = model_or_builder
    if not isinstance(model, nn.Module) and callable(model):
        model = model()
    if not isinstance(model, nn.Module):
        raise TypeError("expected a freshly built original nn.Module or a zero-argument callable returning one, "
                        f"got {type(model).__name__}")
    return model


def check_state(source: str, expected: Mapping[str, torch.Size], state: Mapping[str, Any],
                strict: bool, original: Mapping[str, torch.Size] | None = None) -> tuple[list[str], list[str]]:
    """Check ``state`` against the shapes the model will have; return (missing, unexpected) keys.

    Raises :class:`CheckpointError` before anything is loaded on a shape conflict, a non-tensor value, or
    (with ``strict``) missing/unexpected keys, so the model is never left half-loaded.
    """
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries {bad[:5]} are not tensors; pass a state dict of name -> tensor")
    conflicts = []
    for k, want in expected.items():
        if k in state and tuple(state[k].shape) != tuple(want):
            was = f" (originally {tuple(original[k])})" if original is not None and k in original \
                and tuple(original[k]) != tuple(want) else ""
            conflicts.append(f"{k}: the model expects {tuple(want)}{was}, the checkpoint has {tuple(state[k].shape)}")
    if conflicts:
        more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
        raise CheckpointError(f"{source}: shapes do not fit the model: " + "; ".join(conflicts[:5]) + more +
                              ". The checkpoint belongs to another model or config; build the same architecture "
                              "it was saved from. The model was left unchanged.")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{source}: keys do not match the model: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}. Build the architecture the checkpoint was "
                              "saved from, or pass strict=False to load the matching keys. The model was left "
                              "unchanged.")
    return missing, unexpected


def _meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device."""
    import copy
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        mt = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(mt, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else mt
    return copy.deepcopy(model, memo)


def _replayed_shapes(model: nn.Module, record: list[dict], source: str) -> dict[str, torch.Size]:
    """State-dict shapes ``model`` will have after replaying ``record``, computed on a meta copy."""
    meta = _meta_copy(model)
    try:
        replay_record(meta, record)
    except PruningError as e:
        raise CheckpointError(f"{source}: {e}. Pass a freshly built, unpruned model of the architecture and config "
                              "the checkpoint was saved from. The model was left unchanged.") from e
    return {k: v.shape for k, v in meta.state_dict().items()}


def load(path: PathLike, model_or_builder: nn.Module | Callable[[], nn.Module], *, strict: bool = True,
         map_location: Any = "cpu") -> nn.Module:
    """Rebuild a pruned model from a checkpoint written by :func:`save` and return it.

    ``model_or_builder`` is a freshly built *original* (unpruned) model or a zero-argument callable that
    builds one.  The checkpoint is read and verified, its pruning record is replayed on a meta copy to check
    every shape against the checkpoint, and only then replayed on the model and the weights loaded; on any
    error (missing, truncated or corrupt file, record for another model, shape conflict) a
    :class:`CheckpointError` names the file and the fix, and the model is left exactly as it was.

    ``strict=False`` accepts a different model class name and missing/unexpected keys (shapes must still
    fit).  The returned model carries ``_prunekit_record``, so it can be pruned further and saved again.
    """
    ckpt = read_checkpoint(path, map_location)
    source = str(path)
    if ckpt.record is None:
        raise CheckpointError(f"{source}: not a prunekit checkpoint (no pruning record); load a plain state dict "
                              "of a pruned model with prunekit.load_state_dict_pruned(model, path, "
                              "example_inputs=...)")
    model = resolve_model(model_or_builder)
    saved_cls = ckpt.meta.get("model_class")
    if saved_cls != _class_name(model):
        msg = f"{source}: the checkpoint was saved from a {saved_cls}, but the model is a {_class_name(model)}"
        if strict:
            raise CheckpointError(msg + "; build the same architecture, or pass strict=False if the classes are "
                                  "compatible. The model was left unchanged.")
        log.warning("%s; loading anyway (strict=False)", msg)
    expected = _replayed_shapes(model, ckpt.record, source)
    missing, unexpected = check_state(source, expected, ckpt.state_dict, strict)
    replay_record(model, ckpt.record)
    model.load_state_dict(with_module_versions(ckpt.state_dict, model), strict=strict)
    if missing or unexpected:
        log.warning("%s: loaded with %d missing and %d unexpected key(s)", source, len(missing), len(unexpected))
    log.info("loaded %s (%d pruning step(s) replayed)", source, len(ckpt.record))
    return model
