"""``pk.analyze``: capture + channel spaces + groups, and the ``PruneGraph`` it returns."""
from __future__ import annotations

import gc
import logging
import math
import time
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from .capture import Tape, capture
from .cost.flops import op_macs
from .analysis import spaces as C
from .analysis.analyzer import Analyzer, Binding, Group, Member, pin_reason
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
        self._leaf_to_group: dict[int, Group] = {}
        self._build_groups(model)

    # ------------------------------------------------------------------ groups
    def _build_groups(self, model: nn.Module) -> None:
        tape, an = self.tape, self.analyzer
        members: dict[int, list[Member]] = defaultdict(list)
        leaf_obj: dict[int, C.Space] = {}
        order: list[int] = []
        # a parameter or buffer that no op of the captured forward reads (transformers' ``original_inv_freq``,
        # a cached copy kept for re-initialisation) is not part of the computation: it never forms or joins a
        # group, so no plan slices it (that would corrupt state the model keeps for later)
        read = {r.id for op in tape.ops for r in op.inputs()}
        read.update(tape.outputs)
        for nd in tape.nodes:
            if nd.kind not in ("param", "buffer") or an.layouts[nd.id] is None or nd.id not in read:
                continue
            for d, lay in enumerate(an.layouts[nd.id]):
                if lay is None or nd.shape[d] < 2:
                    continue
                off = 0
                for term in C.expand(lay):
                    sizes = tuple(s.size for s in term)
                    for pos, s in enumerate(term):
                        if s.size < 2:
                            continue
                        if s.id not in leaf_obj:
                            leaf_obj[s.id] = s
                            order.append(s.id)
                        members[s.id].append(Member(nd.name, d, off, sizes, pos))
                    off += C.term_size(term)
        mod_objs = dict(model.named_modules())
        shapes = {nd.name: nd.shape for nd in tape.nodes if nd.kind in ("param", "buffer")}
        order_ch = [lid for lid in order if "nonchannel" not in leaf_obj[lid].tags]
        keep = {C.find(sp).id: k for sp, k in an.min_keep_spaces}
        multiple: dict[int, tuple[int, str]] = {}
        for lay, n, why in an.multiples:
            for s in C.leaves(lay):
                m, w = multiple.get(s.id, (1, ""))
                multiple[s.id] = (math.lcm(m, n), w or why)
        for gid, lid in enumerate(order_ch):
            s = leaf_obj[lid]
            mem = members[lid]
            mods = []
            src = []
            for m in mem:
                mod, _, attr = m.fqn.rpartition(".")
                if mod not in mods:
                    mods.append(mod)
                if attr == "weight" and source_dim(mod_objs.get(mod)) == m.dim and mod not in src:
                    src.append(mod)
            reason = pin_reason(s.pins)
            prunable = not s.pins
            bad = [m for m in mem if m.offset + math.prod(m.sizes) > shapes[m.fqn][m.dim]]
            if bad:  # never cut with indices the tensor does not have: pin and say so
                prunable = False
                reason = (f"inconsistent channel layout for {bad[0].fqn} dim {bad[0].dim} "
                          "(prunekit could not map this group safely)")
            if prunable and s.size < 2:
                prunable, reason = False, "single unit"
            unit = "expert" if "expert" in s.tags else "head" if "head" in s.tags else \
                "head_dim" if "head_dim" in s.tags else "group" if "group" in s.tags else "channel"
            g = Group(id=gid, size=s.size, unit=unit, prunable=prunable, reason=reason, exact=not s.mix,
                      inexact_reasons=list(s.mix), modules=mods, members=mem, source=src, leaf_id=lid,
                      min_keep=keep.get(lid, 1))
            if g.prunable and g.size <= g.min_keep:
                g.prunable, g.reason = False, f"only {g.size} {unit}s and {g.min_keep} must stay"
            m, why = multiple.get(lid, (1, ""))
            if m > 1:
                g.multiple_of, g.multiple_why = m, why
                if g.prunable and (s.size % m or s.size < 2 * m):
                    g.prunable, g.reason = False, f"kept units must be a multiple of {m} ({why})"
            self.groups.append(g)
            self._leaf_to_group[lid] = g


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

    # ------------------------------------------------------------------ sizes & FLOPs
    def drops_by_leaf(self, plan: Mapping[int, Iterable[int]] | None) -> dict[int, int]:
        """{leaf space id: number of units removed} for a plan (or counts)."""
        res: dict[int, int] = {}
        for gid, units in (plan or {}).items():
            g = self.group(gid)
            n = units if isinstance(units, int) else len(set(int(u) for u in units))
            res[g.leaf_id] = n
        return res

    def dim_size(self, nid: int, d: int, drops: dict[int, int] | None = None) -> int:
        lay = self.analyzer.layouts[nid][d] if self.analyzer.layouts[nid] is not None else None
        if lay is None or not drops:
            return self.tape.nodes[nid].shape[d]
        return C.kept_size(lay, drops)

    def macs(self, plan: Mapping[int, Any] | None = None) -> int:
        """Multiply-accumulates of one forward on the example input, optionally after a plan.

        ``plan`` maps group id -> units to drop (an iterable) or a number of units to drop.
        """
        drops = self.drops_by_leaf(plan) if plan else None
        shape = lambda r: self.tape.nodes[r.id].shape  # noqa: E731
        size = lambda r, d: self.dim_size(r.id, d, drops)  # noqa: E731
        return sum(op_macs(op, size, shape) for op in self.tape.ops)

    def flops(self, plan: Mapping[int, Any] | None = None) -> int:
        """FLOPs (= 2 x MACs, the ``torch.utils.flop_counter`` convention)."""
        return 2 * self.macs(plan)

    # ------------------------------------------------------------------ MACs / params as functions of kept units
    def macs_kept(self, kept: Mapping[int, Any] | None = None):
        """MACs of one forward as a function of how many units each group KEEPS.

        ``kept`` maps group id -> number of units kept: an int (exact: equals
        ``self.macs({gid: group.size - kept})``), a float, or a 0-dim ``torch.Tensor`` (the result
        is then a tensor and differentiable with respect to it -- the FLOPs loss of learned
        pruning).  Groups not in ``kept`` keep all their units.  MACs are a polynomial in the kept
        counts, built once from the FLOPs table and cached, so a call costs microseconds.
        """
        poly = self.__dict__.get("_macs_poly")
        if poly is None:
            poly = self._compile_kept(self._macs_polynomial())
            self._macs_poly = poly
        return poly(self._check_kept(kept))

    def flops_kept(self, kept: Mapping[int, Any] | None = None):
        """FLOPs (= 2 x :meth:`macs_kept`) as a function of the kept units per group."""
        return 2 * self.macs_kept(kept)

    def params_kept(self, kept: Mapping[int, Any] | None = None):
        """Parameter count (tied parameters once) as a function of the kept units per group.

        Same ``kept`` convention as :meth:`macs_kept`; each parameter's numel is the product of its
        dims' kept sizes.
        """
        poly = self.__dict__.get("_params_poly")
        if poly is None:
            total = 0
            for nd in self.tape.nodes:
                if nd.kind == "param":
                    total = total + math.prod((self._dim_poly(nd.id, d) for d in range(len(nd.shape))), start=1)
            poly = self._compile_kept(total)
            self._params_poly = poly
        return poly(self._check_kept(kept))

    def _macs_polynomial(self):
        from .cost.flops import MACS
        shape = lambda r: self.tape.nodes[r.id].shape  # noqa: E731
        size = lambda r, d: self._dim_poly(r.id, d)  # noqa: E731
        total = 0
        for op in self.tape.ops:
            fn = MACS.get(op.packet)
            if fn is not None:
                total = total + fn(op, size, shape)
        return total

    def _dim_poly(self, nid: int, d: int):
        """A dim's size as a polynomial in the kept units of groups (an int where no group reaches it)."""
        from .cost.flops import Poly
        lays = self.analyzer.layouts[nid]
        lay = lays[d] if lays is not None else None
        if lay is None:
            return self.tape.nodes[nid].shape[d]

        def leaf(s):
            g = self._leaf_to_group.get(s.id)
            return Poly.var(g.id) if g is not None else s.size
        return C.kept_size(lay, leaf_size=leaf)

    def _compile_kept(self, poly):
        from .cost.flops import CompiledPoly
        return CompiledPoly(poly, {g.id: g.size for g in self.groups})

    def _check_kept(self, kept: Mapping[int, Any] | None) -> Mapping[int, Any]:
        if not kept:
            return {}
        for gid, k in kept.items():
            g = self.group(gid)
            if isinstance(k, (int, float)) and not 0 <= k <= g.size:
                raise ValueError(f"group {gid} has {g.size} units, cannot keep {k}: "
                                 f"pass a number of kept units between 0 and {g.size}")
        return kept

    @property
    def prunable_proportion(self) -> float:
        """Fraction of FLOPs that pruning can remove: every prunable group down to one unit."""
        total = self.macs()
        if total == 0:
            return 0.0
        plan = {g.id: g.size - 1 for g in self.prunable_groups}
        return 1.0 - self.macs(plan) / total

    # ------------------------------------------------------------------ dry run



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






# model conventions of optional libraries (ultralytics YOLO, torchvision detectors): ``(module prefix, resolver,
# pins)``; for a model whose class lives in a module starting with the prefix, ``resolver(model)`` may return the
# forward_fn to use when the user gave none (e.g. one returning the outputs before post-processing), and
# ``pins(model)`` returns ``{module name: reason}``: every channel of those modules' parameters is pinned with that
# reason (``"name:out"``: only dim 0 of its parameters, a conv/linear/norm's output channels).  Registered by name (prunekit.detection), so the core never imports those libraries.
_CONVENTIONS: list[tuple[str, Callable[[nn.Module], Callable | None], Callable[[nn.Module], dict] | None]] = []


def register_model_convention(module_prefix: str, resolver: Callable[[nn.Module], Callable | None],
                              pins: Callable[[nn.Module], Mapping[str, str]] | None = None) -> None:
    """Give models whose class module starts with ``module_prefix`` (``"ultralytics."``) a default forward_fn
    (``resolver(model)`` returns one, or None to call the model as usual; a user's ``forward_fn`` always wins)
    and modules pinned by name (``pins(model) -> {module name: reason}``)."""
    _CONVENTIONS[:] = [c for c in _CONVENTIONS if c[0] != module_prefix] + [(module_prefix, resolver, pins)]


def _conventions_of(model: nn.Module):
    mod = type(model).__module__ + "."
    return [c for c in _CONVENTIONS if mod.startswith(c[0])]


def default_forward_fn(model: nn.Module) -> Callable | None:
    """The forward_fn a registered model convention gives ``model`` (None: call the model as usual)."""
    for _, resolver, _ in _conventions_of(model):
        fn = resolver(model)
        if fn is not None:
            return fn
    return None


# Default forwards by model class: ``{"pkg.module.Class": forward_fn}``.  A model of such a class (or a subclass)
# analysed without a forward_fn is called through it -- e.g. torchvision's detectors, whose full forward ends in
# data-dependent post-processing (proposals, NMS): prunekit.detection registers forwards returning the head outputs
# before post-processing, so analysis and verification see the parts that carry channels.  Filled by name, so no
# optional package is imported to look a model up.
DEFAULT_FORWARDS: dict[str, Callable] = {}


def register_default_forward(class_qualname: str, forward_fn: Callable) -> None:
    """Call models of class ``class_qualname`` (``type(m).__module__ + "." + type(m).__qualname__``, or a base
    class's) through ``forward_fn(model, inputs)`` when no forward_fn is given."""
    DEFAULT_FORWARDS[class_qualname] = forward_fn


def default_forward(model: nn.Module, forward_fn: Callable | None = None) -> Callable | None:
    """``forward_fn`` if given, else the registered default forward of ``model``'s class (None: call the model)."""
    if forward_fn is not None:
        return forward_fn
    for cls in type(model).__mro__ if DEFAULT_FORWARDS else ():
        fn = DEFAULT_FORWARDS.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            return fn
    return default_forward_fn(model)  # a convention registered by module prefix (ultralytics)


def _pin_by_convention(model: nn.Module, tape: Tape, an: Analyzer) -> None:
    pins: dict[str, str] = {}
    for _, _, fn in _conventions_of(model):
        pins.update(fn(model) if fn is not None else {})
    if not pins:
        return
    for nd in tape.nodes:
        if nd.kind != "param" or an.layouts[nd.id] is None:
            continue
        for key, reason in pins.items():
            name, _, which = key.partition(":")
            if nd.name.startswith(name + "."):
                for d in (range(len(nd.shape)) if which != "out" else range(min(1, len(nd.shape)))):
                    C.pin(an.lay(nd.id, d), reason)


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
    _pin_by_convention(model, tape, an)
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
