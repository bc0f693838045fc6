"""``pk.analyze``: capture + channel spaces + groups, and the ``PruneGraph`` it returns."""
from __future__ import annotations

import gc
import logging
import time
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from .capture import Tape, capture
from .cost.graph_cost import GraphCost
from .analysis import spaces as C
from .analysis.analyzer import Analyzer, Binding, Group
from .analysis.groups import build_groups
from .analysis.conventions import (  # noqa: F401  (public here: prunekit.graph.register_*)
    DEFAULT_FORWARDS, default_forward, default_forward_fn, pin_by_convention, register_default_forward,
    register_model_convention)
from .surgery import trial
from .verify import dryrun
from .analysis.modules import source_dim  # noqa: F401  (re-exported: ``prunekit.graph.source_dim``)

log = logging.getLogger("prunekit")

class PruneGraph:
    """Result of :func:`analyze`: the captured tape, channel spaces and groups of one model."""

    def __init__(self, model: nn.Module, tape: Tape, an: Analyzer, example_inputs: Any,
                 forward_fn: Callable | None, prune_outputs: bool, seconds: float):
        self.tape = tape
        self.analyzer = an
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self.prune_outputs = prune_outputs
        self.analysis_seconds = seconds
        self.model_ref = model
        self.stale = False
        self.validation_skipped: str | None = None  # why the dry run could not run, if it could not
        self.validation_backend: str | None = None  # "meta" or "real": where the dry run ran
        self.groups: list[Group] = []
        self.bindings: list[Binding] = list(an.bindings.values())
        self.unsupported_ops = {k: sorted(v) for k, v in an.unsupported.items()}
        self.groups, self._leaf_to_group = build_groups(tape, an, model)
        self.cost = GraphCost(tape, an, self.groups, self._leaf_to_group)

    def validate(self, model: nn.Module) -> list[int]:
        """Dry-run pruning on a view of ``model`` and pin groups whose removal breaks the forward
        (:func:`prunekit.verify.dryrun.validate`).  Returns the ids of newly pinned groups."""
        return dryrun.validate(self, model, trial)

    def _check_scales(self, model: nn.Module) -> list[int]:
        """Mark groups inexact whose pruning changes a scale computed from a size attribute
        (:func:`prunekit.verify.dryrun.check_scales`)."""
        return dryrun.check_scales(self, model, trial)

    def group(self, gid: int) -> Group:
        if not isinstance(gid, int) or gid < 0 or gid >= len(self.groups):
            raise KeyError(f"no group with id {gid!r}: valid ids are 0..{len(self.groups) - 1}")
        return self.groups[gid]

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    # ------------------------------------------------------------------ sizes & FLOPs (see prunekit.cost.graph_cost)
    def drops_by_leaf(self, plan: Mapping[int, Iterable[int]] | None) -> dict[int, int]:
        """{leaf space id: number of units removed} for a plan (or counts)."""
        return self.cost.drops_by_leaf(plan)

    def dim_size(self, nid: int, d: int, drops: dict[int, int] | None = None) -> int:
        """Size of dim ``d`` of tape node ``nid`` after removing ``drops`` ({leaf space id: units})."""
        return self.cost.dim_size(nid, d, drops)

    def macs(self, plan: Mapping[int, Any] | None = None) -> int:
        """Multiply-accumulates of one forward on the example input, optionally after a plan.

        ``plan`` maps group id -> units to drop (an iterable) or a number of units to drop.
        """
        return self.cost.macs(plan)

    def flops(self, plan: Mapping[int, Any] | None = None) -> int:
        """FLOPs (= 2 x MACs, the ``torch.utils.flop_counter`` convention)."""
        return self.cost.flops(plan)

    def macs_kept(self, kept: Mapping[int, Any] | None = None):
        """MACs as a function of how many units each group KEEPS (see :meth:`GraphCost.macs_kept`): exact for
        ints, differentiable for 0-dim tensors (the FLOPs loss of learned pruning)."""
        return self.cost.macs_kept(kept)

    def flops_kept(self, kept: Mapping[int, Any] | None = None):
        """FLOPs (= 2 x :meth:`macs_kept`) as a function of the kept units per group."""
        return self.cost.flops_kept(kept)

    def params_kept(self, kept: Mapping[int, Any] | None = None):
        """Parameter count (tied parameters once) as a function of the kept units per group."""
        return self.cost.params_kept(kept)

    @property
    def prunable_proportion(self) -> float:
        """Fraction of FLOPs that pruning can remove: every prunable group down to one unit."""
        return self.cost.prunable_proportion

    def pruned_copy(self, plan: Mapping[int, Iterable[int]], model: nn.Module | None = None, *,
                    verify: bool = True) -> nn.Module:
        """A pruned deep copy of ``model`` (default: the model this graph was built from) after ``plan``; the
        model and the graph stay as they are (:func:`prunekit.surgery.pruned_copy`).  The way the layers before
        surgery (the latency model's whole-model correction) get a pruned model without importing surgery."""
        from .surgery.apply import pruned_copy
        return pruned_copy(self.model_ref if model is None else model, self, plan, verify=verify)

    # ------------------------------------------------------------------ reports
    def summary(self, show_pinned: bool = True, max_modules: int = 3) -> str:
        """A readable table: id, unit, size, modules, exact, prunable/reason."""
        rows = [("id", "unit", "size", "modules", "exact", "prunable / reason")]
        for g in self.groups:
            if not show_pinned and not g.prunable:
                continue
            mods = ", ".join(m or "<root>" for m in g.modules[:max_modules])  # the root module is named ""
            mods += f" (+{len(g.modules) - max_modules})" if len(g.modules) > max_modules else ""
            rows.append((str(g.id), g.unit, str(g.size), mods, "yes" if g.exact else "no",
                         "yes" if g.prunable else f"no: {g.reason[:90]}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        widths[3] = min(widths[3], 60)
        lines = []
        for k, r in enumerate(rows):
            cells = [r[i][:widths[i]].ljust(widths[i]) for i in range(len(r))]
            lines.append("  ".join(cells).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        n_p = len(self.prunable_groups)
        lines.append(f"{len(self.groups)} groups, {n_p} prunable, "
                     f"{sum(1 for g in self.prunable_groups if g.exact)} exact; "
                     f"prunable FLOPs proportion {self.prunable_proportion:.1%}")
        if self.unsupported_ops:
            lines.append("unsupported ops (channels pinned): " + ", ".join(
                f"{k} in {', '.join(v[:3])}" for k, v in self.unsupported_ops.items()))
        return "\n".join(lines)

    def log_groups(self, level: int = logging.INFO) -> list[str]:
        """One line per prunable group, like "group 3: source conv ...; dependents ..."."""
        lines = [g.describe() for g in self.prunable_groups]
        for line in lines:
            log.log(level, line)
        return lines

    def __repr__(self) -> str:
        return f"PruneGraph({len(self.groups)} groups, {len(self.prunable_groups)} prunable, " \
               f"{len(self.tape.ops)} ops)"






def analyze(model: nn.Module, example_inputs: Any = None, forward_fn: Callable | None = None, *,
            device: str = "auto", prune_outputs: bool = False, validate: bool = True) -> PruneGraph:
    """Capture ``model`` on ``example_inputs`` and find every group of channels that must be pruned together.

    The model is not changed.  ``example_inputs`` is a tensor, a tuple of positional inputs or a
    dict of keyword inputs; ``forward_fn(model, example_inputs)`` customises the call.
    ``device="meta"`` analyses without weight memory (the default ``"auto"`` tries meta first).
    ``prune_outputs=True`` allows pruning channels that reach the model's outputs.
    ``validate=True`` dry-runs pruning on a meta view of the model (its tensors swapped for meta ones,
    every change rolled back) and pins groups whose removal breaks the
    forward (hard-coded sizes); see :meth:`PruneGraph.validate`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"analyze() expects an nn.Module, got {type(model).__name__}")
    if example_inputs is None and forward_fn is None:
        raise ValueError("analyze() needs example_inputs (a tensor, tuple or dict the model accepts, e.g. "
                         "torch.randn(1, 3, 224, 224)) or a forward_fn(model, inputs)")
    # the analysis allocates many small objects that stay alive until it returns: the cyclic GC would
    # rescan them again and again (~8% of the time on a 7B model), so it is paused and restored after
    forward_fn = default_forward(model, forward_fn)  # detectors: their head outputs before post-processing
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _analyze(model, example_inputs, forward_fn, device, prune_outputs, validate)
    finally:
        if gc_was_enabled:
            gc.enable()


def _analyze(model, example_inputs, forward_fn, device, prune_outputs, validate) -> PruneGraph:
    t0 = time.perf_counter()
    tape = capture(model, example_inputs, forward_fn, device=device)
    an = Analyzer(tape, model)
    an.run()
    pin_by_convention(model, tape, an)
    for nid, path in zip(tape.outputs, tape.output_paths):
        what = "model output" if path == "output" else f"model output {path}"  # "output": the one returned tensor
        for d in range(len(tape.nodes[nid].shape)):
            if prune_outputs:
                C.mix(an.lay(nid, d), f"reaches {what} (its shape changes)")
            else:
                C.pin(an.lay(nid, d), f"{what} keeps its shape (pass prune_outputs=True to allow)")
    an.finish()
    graph = PruneGraph(model, tape, an, example_inputs, forward_fn, prune_outputs, time.perf_counter() - t0)
    if validate:
        graph.validate(model)
    graph._check_scales(model)  # after the dry run: only groups that stayed prunable are probed
    graph.analysis_seconds = time.perf_counter() - t0
    log.debug("analysed %s in %.3fs: %r", type(model).__name__, graph.analysis_seconds, graph)
    return graph
