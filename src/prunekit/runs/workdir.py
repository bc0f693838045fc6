"""One resumable workdir for every long-running algorithm (``prune_iteratively``, ``AdaptivePruner``,
``TrainingPruner`` checkpoints).

A :class:`Workdir` is a folder with a JSON state file (``state.json``) and checkpoints next to it.  Every
file is written atomically (a temporary file replaced in one step, :func:`prunekit.io.checkpoint.atomic_path`),
so a crash at any point leaves the previous complete state.  The state names the checkpoint of the last
completed step; resuming means:

1. :meth:`Workdir.read_state` -- the state, checked for its format (which algorithm wrote it) and version;
2. :meth:`Workdir.check_config` / :meth:`Workdir.check_model` -- the saved run was started with the same
   settings and from the same model (architecture fingerprint: class, state-dict names, shapes, dtypes);
3. :meth:`Workdir.restore` -- the last checkpoint's pruning record replayed on the freshly built original
   model and its weights loaded (checked on a meta copy before the model is touched).

Steps are committed with :meth:`Workdir.save_checkpoint` then :meth:`Workdir.commit` (the state, pointing at
the new checkpoint, then removal of the checkpoint it replaces).  A mismatch raises :class:`ResumeError`
(or the subclass the algorithm passes as ``error``) naming the workdir and the fix.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..io.checkpoint import (CheckpointError, _replayed_shapes, atomic_path, canonical_json, check_state,
                             model_fingerprint, model_shapes, read_checkpoint, save, with_module_versions,
                             write_json)
from ..surgery import RECORD_ATTR, replay_record

__all__ = ["ResumeError", "Workdir", "model_info", "read_torch", "write_torch"]

STATE_FILE = "state.json"


class ResumeError(ValueError):
    """A workdir's saved run does not fit this call (another model, other settings, an already pruned model,
    a corrupt or foreign state file)."""


def model_info(model: nn.Module, *, shapes: bool = False, **extra: Any) -> dict[str, Any]:
    """What a state remembers of the model a run started from: class, fingerprint (and shapes, for messages)."""
    info: dict[str, Any] = {"class": type(model).__qualname__, "fingerprint": model_fingerprint(model)}
    if shapes:
        info["shapes"] = model_shapes(model)
    info.update(extra)
    return info


def write_torch(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)


def read_torch(path: str | Path) -> Any:
    """What :func:`write_torch` wrote (tensors, containers and plain values only: ``weights_only``)."""
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


class Workdir:
    """A resumable run's folder (see the module docstring).

    Args:
        path: the folder (created on the first write).
        format: the state's ``format`` tag, e.g. ``"prunekit.iterative"``; a state with another tag is refused.
        version: the state format version this code writes; newer saved versions are refused.
        what: how messages name the state, e.g. ``"a prunekit iterative-pruning"`` (``"... state"``).
        error: the exception class raised (a :class:`ResumeError` subclass keeps ``except ResumeError`` working).
        state_file: name of the JSON state inside the folder.
    """

    def __init__(self, path: str | Path, format: str, *, version: int = 1, what: str | None = None,
                 error: type[Exception] = ResumeError, state_file: str = STATE_FILE):
        self.path = Path(path)
        self.format, self.version = format, int(version)
        self.what = what or f"a {format}"
        self.error = error
        self.state_file = state_file

    # ------------------------------------------------------------------ files
    @property
    def state_path(self) -> Path:
        return self.path / self.state_file

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def has_state(self) -> bool:
        """True when a saved run is there (its state file exists)."""
        return self.state_path.is_file()

    def mkdir(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        with atomic_path(self.path / name) as tmp:
            tmp.write_text(text)

    def append_line(self, name: str, obj: Any) -> None:
        """Append ``obj`` as one JSON line (a log; not atomic, rewritten from the state on resume)."""
        with open(self.path / name, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def write_torch(self, name: str, obj: Any) -> None:
        write_torch(self.path / name, obj)

    def read_torch(self, name: str, missing: str) -> Any:
        """What :meth:`write_torch` wrote; a missing file raises the workdir's error with ``missing`` as the fix."""
        p = self.path / name
        if not p.is_file():
            raise self.error(f"{p}: {missing}")
        return read_torch(p)

    def clear(self, patterns: Iterable[str]) -> None:
        """Remove the files matching ``patterns`` and the state (a run started over)."""
        for pattern in (*patterns, self.state_file):
            for p in self.path.glob(pattern):
                p.unlink()

    # ------------------------------------------------------------------ state
    def new_state(self, **fields: Any) -> dict[str, Any]:
        """A state dict carrying this workdir's format tag and version, then ``fields``."""
        return {"format": self.format, "format_version": self.version, **fields}

    def read_state(self, corrupt_fix: str = "use another workdir") -> dict[str, Any]:
        """The saved state, checked for format and version (``corrupt_fix`` ends the invalid-JSON message)."""
        path = self.state_path
        try:
            state = json.loads(path.read_text())
        except ValueError as e:
            raise self.error(f"{path} is not valid JSON ({e}); the workdir is corrupt: {corrupt_fix}") from None
        if not isinstance(state, dict) or state.get("format") != self.format:
            fmt = state.get("format") if isinstance(state, dict) else None
            raise self.error(f"{path}: not {self.what} state (format {fmt!r}); use another workdir")
        if int(state.get("format_version", 0)) > self.version:
            raise self.error(f"{path}: written by a newer prunekit; upgrade prunekit to resume it")
        return state

    def write_state(self, state: Mapping[str, Any]) -> None:
        write_json(self.state_path, state)

    def commit(self, state: Mapping[str, Any], *, checkpoint: str | None = None, previous: str | None = None
               ) -> None:
        """A completed step: write ``state`` (which names ``checkpoint``), then remove the ``previous``
        checkpoint it replaces (kept when it is the same file).  A crash before the state is written
        leaves the previous step's state and checkpoint intact."""
        self.write_state(state)
        if previous and previous != checkpoint:
            (self.path / previous).unlink(missing_ok=True)

    # ------------------------------------------------------------------ resume checks
    def check_config(self, saved: Mapping[str, Any], now: Mapping[str, Any], fix: str) -> None:
        """Every setting in ``now`` equals the saved one (compared as canonical JSON)."""
        diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in now.items()
                 if canonical_json(saved.get(k)) != canonical_json(v)]
        if diffs:
            raise self.error(f"{self.path}: the saved run used other settings ({'; '.join(diffs)}). {fix}")

    def check_model(self, saved: Mapping[str, Any], model: nn.Module, lead: str, fix: str) -> None:
        """``model`` has the fingerprint of :func:`model_info` ``saved``; else the error says what differs
        (the first differing shapes when the state has them)."""
        if model_fingerprint(model) == saved["fingerprint"]:
            return
        now_cls = type(model).__qualname__
        if "shapes" in saved:
            now, then = model_shapes(model), saved["shapes"]
            diff = [f"{k}: saved {then[k]}, now {now[k]}" for k in then if k in now and now[k] != then[k]][:3]
            diff += [f"{k} missing" for k in then if k not in now][:2]
            diff += [f"{k} unexpected" for k in now if k not in then][:2]
            if saved["class"] != now_cls:
                diff.insert(0, f"class: saved {saved['class']}, now {now_cls}")
            detail = "; ".join(diff)
        else:
            detail = f"a {saved['class']} with other layer shapes; this is a {now_cls}"
        raise self.error(f"{self.path}: {lead} ({detail}). {fix}")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, model: nn.Module, name: str, extra: Mapping[str, Any] | None = None) -> str:
        """``pk.save`` the model (weights + pruning record) as ``name``; returns the file name written
        (``.pt`` instead of ``.safetensors`` where safetensors is missing)."""
        return save(model, self.path / name, extra=dict(extra or {})).name

    def restore(self, model: nn.Module, name: str, start_len: int = 0) -> None:
        """Bring ``model`` (a fresh original carrying ``start_len`` pruning-record steps) to checkpoint ``name``:
        replay the record steps after ``start_len`` and load the weights.  Everything is checked (file, record,
        every shape, on a meta copy) before the model changes; a failure raises the workdir's error."""
        path = self.path / name
        try:
            ckpt = read_checkpoint(path)
            if ckpt.record is None or len(ckpt.record) < start_len:
                raise CheckpointError(f"{path}: no pruning record beyond the starting model's")
            new = ckpt.record[start_len:]
            expected = _replayed_shapes(model, new, str(path))
            check_state(str(path), expected, ckpt.state_dict, strict=True)
        except CheckpointError as e:
            raise self.error(f"cannot resume from {path}: {e}") from e
        replay_record(model, new)
        model.load_state_dict(with_module_versions(ckpt.state_dict, model))

    @staticmethod
    def record(model: nn.Module) -> list:
        """The model's pruning record as plain JSON values (``[]`` for an unpruned model)."""
        return json.loads(json.dumps(getattr(model, RECORD_ATTR, None) or []))

    def __repr__(self) -> str:
        return f"Workdir({str(self.path)!r}, format={self.format!r})"
