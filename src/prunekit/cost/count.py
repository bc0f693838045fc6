"""``pk.count``: MACs, FLOPs, parameters and a per-module table from one captured forward.

The count runs the model once under the capture tape (on the ``meta`` device where possible,
so no weight memory and no arithmetic) and applies the one FLOPs table of
:mod:`prunekit.metrics.flops` to every recorded ATen op.  The convention is the one of
``torch.utils.flop_counter.FlopCounterMode``: only convolutions, matrix products and attention
are counted, FLOPs = 2 x MACs; the few ops where the two differ are listed in
:mod:`prunekit.metrics.flops`.

Numbers are for the example input as given, batch included.  ``normalized_flops`` (torch-dag's
"kmapp", thousands of FLOPs per input pixel) divides by the pixels of one image of the first
image-like input, and by its batch size, so it is a per-image figure.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from ..capture import Tape, TRef, capture
from .flops import op_macs

log = logging.getLogger("prunekit.metrics")


@dataclass
class ModuleStats:
    """One row of :attr:`Stats.per_module`.

    ``macs``/``flops`` are those of the ops run while this module was the innermost executing
    module (children are separate rows, so rows add up to the total); ``params`` counts this
    module's own parameters (not its children's); ``ops`` is the number of ATen ops recorded.
    """

    module: str  # fully-qualified name, "" for the root
    type: str
    macs: int
    flops: int
    params: int
    ops: int


@dataclass
class Stats:
    """Result of :func:`count`.

    ``macs``: multiply-accumulates of one forward on the example input.  ``flops``: floating-point
    operations = 2 x ``macs`` (the ``torch.utils.flop_counter`` convention).  ``params``: unique
    parameters (a tied weight counts once).  ``input_pixels``: H x W of the first image-like
    (4-D floating) input, ``batch`` its batch size, ``normalized_flops`` = flops / (batch x H x W
    x 1000) ("kmapp"); all three are None without an image-like input.
    """

    macs: int
    flops: int
    params: int
    input_pixels: int | None = None
    batch: int | None = None
    normalized_flops: float | None = None
    per_module: list[ModuleStats] = field(default_factory=list)
    per_op: dict[str, int] = field(default_factory=dict)  # ATen op -> MACs

    @property
    def kmapp(self) -> float | None:
        """Alias of :attr:`normalized_flops`."""
        return self.normalized_flops

    def summary(self) -> str:
        s = f"FLOPs {_human(self.flops)} (MACs {_human(self.macs)}), params {_human(self.params)}"
        if self.normalized_flops is not None:
            s += f", kmapp {self.normalized_flops:.2f} (FLOPs / (H*W*1000) per image)"
        return s

    def table(self, top: int | None = None) -> str:
        """Per-module table in model order; ``top=N`` keeps the N rows with the most FLOPs."""
        rows = list(self.per_module)
        if top is not None:
            rows = sorted(rows, key=lambda r: (-r.flops, -r.params))[:top]
        head = ("module", "type", "MACs", "FLOPs (2xMACs)", "FLOPs %", "params", "ops")
        body = [(r.module or "<root>", r.type, _human(r.macs), _human(r.flops),
                 f"{100.0 * r.flops / self.flops:.1f}" if self.flops else "-", _human(r.params), str(r.ops))
                for r in rows]
        total = ("total", "", _human(self.macs), _human(self.flops), "100.0" if self.flops else "-",
                 _human(self.params), str(sum(r.ops for r in self.per_module)))
        table = [head] + body + [total]
        widths = [min(max(len(r[i]) for r in table), 60) for i in range(len(head))]
        right = {2, 3, 4, 5, 6}

        def fmt(r):
            return "  ".join((c[:widths[i]].rjust(widths[i]) if i in right else c[:widths[i]].ljust(widths[i]))
                             for i, c in enumerate(r)).rstrip()
        lines = [self.summary(), fmt(head), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in body]
        if len(rows) < len(self.per_module):
            lines.append(f"... ({len(self.per_module) - len(rows)} more rows)")
        lines += ["  ".join("-" * w for w in widths), fmt(total)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (plain ints, floats, strings, lists)."""
        return asdict(self)

    def __str__(self) -> str:
        return self.table(top=20)


def human(n: float, unit: str = "", sep: str = " ") -> str:
    """``1234567`` -> ``1.23 M``: two decimals with a K/M/G/T suffix (``sep`` between number and suffix/unit);
    the one number formatter of the tables, reports and the CLI."""
    for suffix, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{sep}{suffix}{unit}"
    return (f"{int(n)}" if float(n).is_integer() else f"{n:.3f}") + (f"{sep}{unit}" if unit else "")


def _human(n: float) -> str:
    """Compact form for tables: ``1.23M``."""
    return human(n, sep="")


def count(model: Any, example_inputs: Any = None, forward_fn: Callable | None = None, *,
          device: str = "auto", plan: Mapping[int, Any] | None = None) -> Stats:
    """Count MACs, FLOPs (= 2 x MACs) and parameters of ``model`` on ``example_inputs``.

    ``model`` is an ``nn.Module`` (captured once, on the meta device where possible:
    ``device`` is ``"auto"``, ``"meta"`` or ``"real"`` as for :func:`prunekit.capture.capture`)
    or a :class:`~prunekit.graph.PruneGraph`, whose tape is reused; with a graph, ``plan``
    ({group id: units or number of units to drop}) gives the counts the model would have after
    that plan, without touching it.  The model is never modified.
    """
    # a PruneGraph (which builds on this package, so it is recognised by what it offers, not imported)
    if not isinstance(model, nn.Module) and isinstance(getattr(model, "tape", None), Tape) \
            and hasattr(model, "drops_by_leaf"):
        if example_inputs is not None or forward_fn is not None:
            raise ValueError("count(graph) reuses the graph's captured forward: do not pass example_inputs or "
                             "forward_fn (call count(model, example_inputs) to count on another input)")
        graph = model
        drops = graph.drops_by_leaf(plan) if plan else None
        size = (lambda r, d: graph.dim_size(r.id, d, drops)) if drops else None
        return _stats(graph.tape, size)
    if plan is not None:
        raise ValueError("count(model, ..., plan=...) needs the graph the plan refers to: "
                         "call count(graph, plan=plan) with graph = pk.analyze(model, example_inputs)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"count() expects an nn.Module or a PruneGraph, got {type(model).__name__}")
    tape = capture(model, example_inputs, forward_fn, device=device)
    return _stats(tape, None)


def _stats(tape: Tape, size: Callable | None) -> Stats:
    nodes = tape.nodes
    shape = lambda r: nodes[r.id].shape  # noqa: E731
    if size is None:
        size = lambda r, d: nodes[r.id].shape[d]  # noqa: E731
    macs_by: dict[str, int] = {}
    ops_by: dict[str, int] = {}
    per_op: dict[str, int] = {}
    for op in tape.ops:
        if op.packet.startswith("prunekit."):  # capture's markers, not ATen ops
            continue
        n = op_macs(op, size, shape)
        macs_by[op.module] = macs_by.get(op.module, 0) + n
        ops_by[op.module] = ops_by.get(op.module, 0) + 1
        if n:
            per_op[op.packet] = per_op.get(op.packet, 0) + n
    params_by: dict[str, int] = {}
    for nd in nodes:
        if nd.kind == "param":
            mod = nd.name.rpartition(".")[0] if nd.name else ""
            params_by[mod] = params_by.get(mod, 0) + math.prod(size(TRef(nd.id), d) for d in range(len(nd.shape)))
    names = list(tape.modules) + [m for m in {**macs_by, **params_by} if m not in tape.modules]
    rows = [ModuleStats(m, tape.modules.get(m, ""), macs_by.get(m, 0), 2 * macs_by.get(m, 0), params_by.get(m, 0),
                        ops_by.get(m, 0))
            for m in names if macs_by.get(m) or params_by.get(m) or ops_by.get(m)]
    macs = sum(macs_by.values())
    stats = Stats(macs=macs, flops=2 * macs, params=sum(params_by.values()), per_module=rows, per_op=per_op)
    for nid in tape.inputs:
        nd = nodes[nid]
        if len(nd.shape) == 4 and nd.dtype is not None and nd.dtype.is_floating_point:
            stats.batch, stats.input_pixels = nd.shape[0], nd.shape[2] * nd.shape[3]
            denom = stats.batch * stats.input_pixels * 1000
            stats.normalized_flops = stats.flops / denom if denom else None
            break
    log.debug("count: %s", stats.summary())
    return stats

