"""The tape's data model: tensor nodes, op records, references to recorded tensors, the tape, CaptureError."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("prunekit.capture")


@dataclass
class TNode:
    """A tensor value in the tape."""

    id: int
    shape: tuple[int, ...]
    kind: str  # "input" | "param" | "buffer" | "op" | "const"
    name: str | None = None  # fqn for params/buffers, input path for inputs
    dtype: torch.dtype | None = None


@dataclass
class OpRecord:
    """One ATen call: ``func(*args, **kwargs)`` with tensors replaced by node ids."""

    index: int
    name: str  # e.g. "aten.add.Tensor"
    packet: str  # e.g. "add"
    args: tuple
    kwargs: dict
    outputs: list  # output structure with TRef / None
    module: str  # fqn of the innermost executing module ("" = root)
    inplace_of: int | None = None  # node id of the mutated input, if in-place
    _ins: list | None = field(default=None, repr=False, compare=False)
    _outs: list | None = field(default=None, repr=False, compare=False)
    qualname: str = ""  # the op's namespace-qualified name, e.g. "aten::add": its key in the op registry
    argpos: dict | None = field(default=None, repr=False, compare=False)  # schema argument name -> position

    def arg(self, name: str, default: Any = None) -> Any:
        """The argument called ``name`` in the op's schema (``op.arg("groups")``), positional or keyword;
        ``default`` when the call did not pass it (or the overload has no such argument)."""
        pos = self.argpos.get(name) if self.argpos is not None else None
        if pos is not None and pos < len(self.args):
            return self.args[pos]
        return self.kwargs.get(name, default)

    def inputs(self) -> list["TRef"]:
        if self._ins is None:
            self._ins = _collect_refs((self.args, tuple(self.kwargs.values())), [])
        return self._ins

    def outs(self) -> list["TRef"]:
        if self._outs is None:
            self._outs = _collect_refs(self.outputs, [])
        return self._outs


def _collect_refs(x: Any, acc: list) -> list:
    """The TRefs inside a recorded argument/output structure (lists, tuples and dicts), in order."""
    if isinstance(x, TRef):
        acc.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _collect_refs(y, acc)
    elif isinstance(x, dict):
        for y in x.values():
            _collect_refs(y, acc)
    return acc


@dataclass(frozen=True)
class TRef:
    """Reference to a tape tensor node inside recorded args."""

    id: int


@dataclass
class Tape:
    nodes: list[TNode] = field(default_factory=list)
    ops: list[OpRecord] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    output_paths: list[str] = field(default_factory=list)
    param_aliases: dict[str, list[str]] = field(default_factory=dict)  # fqn -> other names (tied)
    device: str = "meta"
    modules: dict[str, str] = field(default_factory=dict)  # fqn -> class name

    def node(self, ref: TRef | int) -> TNode:
        return self.nodes[ref.id if isinstance(ref, TRef) else ref]


class CaptureError(RuntimeError):
    """The model could not be run on the example input."""
