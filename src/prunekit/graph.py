"""``pk.analyze``: capture + channel spaces + groups, and the ``PruneGraph`` it returns."""
from __future__ import annotations

import gc
import logging
import math
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .capture.tape import Tape, capture, meta_view, tensor_view, trace_shapes
from .metrics.flops import op_macs
from .spaces import core as C
from .spaces.graph import Analyzer, Binding, Group, Member, pin_reason

log = logging.getLogger("prunekit")

_SOURCE_DIM = {  # module class -> weight dim that holds its output channels
    "Conv1d": 0, "Conv2d": 0, "Conv3d": 0, "Linear": 0, "ConvTranspose1d": 1, "ConvTranspose2d": 1,
    "ConvTranspose3d": 1, "Embedding": 1, "NonDynamicallyQuantizableLinear": 0,
}


def source_dim(module: nn.Module | None) -> int | None:
    """Weight dim that holds ``module``'s output channels (subclasses such as timm's Conv2dSame included)."""
    if module is None:
        return None
    for cls in type(module).__mro__:
        if cls.__name__ in _SOURCE_DIM:
            return _SOURCE_DIM[cls.__name__]
    return None


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
            unit = "head" if "head" in s.tags else "head_dim" if "head_dim" in s.tags else \
                "group" if "group" in s.tags else "channel"
            g = Group(id=gid, size=s.size, unit=unit, prunable=prunable, reason=reason, exact=not s.mix,
                      inexact_reasons=list(s.mix), modules=mods, members=mem, source=src, leaf_id=lid)
            self.groups.append(g)
            self._leaf_to_group[lid] = g

    def _check_scales(self, model: nn.Module) -> list[int]:
        """Mark groups inexact whose pruning changes a scale the forward computes from a size attribute.

        ``attn / math.sqrt(self.head_dim)`` or ``q * self.head_dim ** -0.5``: surgery rewrites ``head_dim``,
        so the pruned model scales differently from the zeroed original (SDPA's default scale, 1/sqrt of the
        actual head_dim, is marked the same way by its rule).  The analyzer lists scalars equal to a power of
        a bound size attribute; whether one is computed from it or is a literal is found by running the
        forward on a meta view of ``model`` with those groups pruned by one unit and comparing the scalar.
        A forward that cannot run that way is assumed to compute it (inexact, never wrongly exact).
        Returns the ids of the groups marked."""
        from .surgery.apply import _Undo, remove

        suspects = []
        for op, value, attr, b in self.analyzer.scale_suspects:
            lays = b.layouts if isinstance(b.layouts, list) else [b.layouts]
            gids = sorted({g.id for l in lays for s in C.leaves(l)
                           if (g := self._leaf_to_group.get(s.id)) is not None and g.prunable and g.exact})
            if gids:
                suspects.append((op, value, attr, b, gids))
        if not suspects:
            return []
        aten = [op for op in self.tape.ops if not op.name.startswith("prunekit.")]
        sdpa = [op for op in self.tape.ops if op.name == "prunekit.sdpa_scale"]
        pos = {op.index: k for k, op in enumerate(aten)}
        pos.update({op.index: k for k, op in enumerate(sdpa)})
        plan = {gid: torch.arange(1) for _, _, _, _, gids in suspects for gid in gids}
        probe = None
        undo = _Undo()
        try:
            with meta_view(model):
                try:
                    remove(model, self, plan, undo)
                    probe = _trace_scalars(model, self.example_inputs, self.forward_fn)
                finally:
                    undo.rollback()
        except Exception as e:  # noqa: BLE001 - cannot tell: assume the scale follows the attribute
            log.debug("scale probe failed: %r", e)
        if probe is not None and ([n for n, _ in probe[0]] != [op.name for op in aten] or len(probe[1]) != len(sdpa)):
            probe = None
        marked = []
        for op, value, attr, b, gids in suspects:
            if probe is not None:
                got = probe[1][pos[op.index]] if op.name == "prunekit.sdpa_scale" else probe[0][pos[op.index]][1]
                if any(v is not None and math.isclose(v, value, rel_tol=1e-9) for v in got):
                    continue  # the same scalar after pruning: a literal or a constant, not computed from attr
                why = (f"{op.packet} in {op.module or '<root>'}: the scale {value:.4g} is computed from "
                       f"{b.module or '<root>'}.{attr} in forward and changes when it is pruned")
            else:
                why = (f"{op.packet} in {op.module or '<root>'}: the scale {value:.4g} may be computed from "
                       f"{b.module or '<root>'}.{attr} in forward (it would change when that is pruned)")
            for gid in gids:
                g = self.groups[gid]
                g.exact = False
                if why not in g.inexact_reasons:
                    g.inexact_reasons.append(why)
                marked.append(gid)
        return sorted(set(marked))

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
        from .metrics.flops import MACS
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
        from .metrics.flops import Poly
        lays = self.analyzer.layouts[nid]
        lay = lays[d] if lays is not None else None
        if lay is None:
            return self.tape.nodes[nid].shape[d]

        def leaf(s):
            g = self._leaf_to_group.get(s.id)
            return Poly.var(g.id) if g is not None else s.size
        return C.kept_size(lay, leaf_size=leaf)

    def _compile_kept(self, poly):
        from .metrics.flops import CompiledPoly
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
    def validate(self, model: nn.Module) -> list[int]:
        """Dry-run pruning on a meta view of ``model`` and pin groups whose removal breaks the forward.

        The user's parameters and buffers are swapped for empty meta tensors (no copy of the model, no
        weight memory); every prunable group loses a few units (different counts per group), the model
        is re-captured and each op's output shape must equal the shape the channel analysis predicts.  A forward that
        hard-codes a size (a reshape with a constant, a check against an attribute prunekit does not
        know) fails here, and the offending groups are found by bisection and pinned with the reason.
        Every change is rolled back after each check and the original tensors are restored on exit.
        When the forward cannot run on meta at all (it reads values: ``.item()``, data-dependent shapes),
        the same checks run on real tensors (private copies of the parameters and buffers swapped in),
        comparing only the dims the plan resizes (``validation_backend`` says which ran).
        Returns the ids of newly pinned groups.
        """
        from .surgery.apply import _Undo, remove

        cands = [g for g in self.prunable_groups]
        if not cands:
            return []
        plans = [_dry_run_plan(cands), _dry_run_plan(cands, second=True)]
        plan_all = plans[0]
        errors: dict[int, str] = {}

        def check(gids: list[int]) -> tuple[str | None, set[int]]:
            """(failure message or None, ids of the groups on the failing op)."""
            plan = {i: plan_all[i] for i in gids}
            undo = _Undo()
            try:
                remove(model, self, plan, undo)  # on the view: the swapped-in tensors and attributes change
                ops, out_shapes = trace_shapes(model, inputs, self.forward_fn, meta=backend == "meta")
                msg, at = self._compare_trace(ops, out_shapes, plan, aten_ops, changed_only=backend == "real")
                return msg, self._groups_at(at)
            except Exception as e:  # noqa: BLE001 - any failure means this plan breaks the forward
                k = getattr(e, "prunekit_ops_recorded", None)  # the k-th ATen op of the tape failed
                at = aten_ops[k].index if k is not None and k < len(aten_ops) else None
                return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", self._groups_at(at)
            finally:
                undo.rollback()

        def bisect(gids: list[int], msg: str, near: set[int]) -> None:
            if len(gids) == 1:
                errors[gids[0]] = msg
                return
            inside = [i for i in gids if i in near]
            if inside and len(inside) < len(gids):
                # localised: the groups on the failing op (usually one block's heads), each alone when few,
                # then the rest; if none of them fails alone, they are tried together
                rest = [i for i in gids if i not in near]
                singles = [[i] for i in inside] if len(inside) <= 3 else [inside]
                failed = False
                for part in singles:
                    m, where = check(part)
                    if m:
                        failed = True
                        bisect(part, m, where)
                if not failed and len(singles) > 1:
                    m, where = check(inside)
                    if m:
                        failed = True
                        for i in inside:  # only their combination fails
                            errors[i] = m
                m, where = check(rest)
                if m:
                    bisect(rest, m, where)
                elif not failed:  # only the combination of inside and rest fails: pin all of them
                    for i in gids:
                        errors[i] = msg
                return
            mid = len(gids) // 2
            found = False
            for part in (gids[:mid], gids[mid:]):
                m, where = check(part)
                if m:
                    found = True
                    bisect(part, m, where)
            if not found:  # only the combination fails: pin all of them
                for i in gids:
                    errors[i] = msg

        inputs = self.example_inputs
        aten_ops = [op for op in self.tape.ops if not op.name.startswith("prunekit.")]
        backend = "meta"
        if self.tape.device != "meta":
            # the capture needed real values (.item(), data-dependent shapes): if the unpruned forward cannot
            # run on meta either, the dry run runs on real tensors (private copies swapped in, the same checks)
            with meta_view(model):
                try:
                    trace_shapes(model, inputs, self.forward_fn)
                except Exception as e:  # noqa: BLE001
                    backend = "real"
                    log.info("dry run on real tensors: the forward needs real values (%s: %s)",
                             type(e).__name__, str(e).splitlines()[0][:120])
        self.validation_backend = backend
        # the user's tensors are swapped out; every change is rolled back per check
        with tensor_view(model, backend), torch.no_grad():
            # two plans with different counts: one plan can pass by luck (a count that keeps a hard-coded
            # divisibility, ``n // kv`` that rounds to the old value); the second runs on the groups the first kept
            for plan_all in plans:
                gids = [g.id for g in cands if g.id not in errors]
                if plan_all is not plans[0] and all(torch.equal(plan_all[i], plans[0][i]) for i in gids):
                    break  # the same counts as the first plan: nothing new to learn
                if gids:
                    msg, near = check(gids)
                    if msg:
                        bisect(gids, msg, near)
            # a split whose sizes are computed from the input's width (``x.shape[-1] // 2``) fits any plan that
            # shrinks its parts evenly (as the plans above may, by coincidence) and breaks when they shrink
            # unevenly: one more plan moves each split's drops to its first parts; a split that fails it is
            # pinned as a whole (every part's groups: pinning one part would still let the others shrink alone)
            clusters = self._split_clusters(plans[0], set(errors))
            if clusters:
                plan_all = {}
                for _w, skew, _own in clusters:
                    plan_all.update(skew)
                msg, _near = check(list(plan_all))
                if msg:
                    todo = [clusters]
                    while todo:
                        cl = todo.pop()
                        if len(cl) == 1:
                            where, _skew, members = cl[0]
                            for i in members:
                                errors.setdefault(i, f"{msg} (the part sizes of {where} follow the input's width, "
                                                     "not its parts: they cannot shrink unevenly)")
                            continue
                        halves = (cl[:len(cl) // 2], cl[len(cl) // 2:])
                        bad = []
                        for h in halves:
                            plan_all = {i: u for _w, sk, _o in h for i, u in sk.items()}
                            m, _near = check(list(plan_all))
                            if m:
                                msg = m
                                bad.append(h)
                        if not bad:  # only their combination fails
                            bad = [[c] for c in cl]
                        todo.extend(bad)
        for gid, m in errors.items():
            g = self.groups[gid]
            g.prunable = False
            g.reason = f"dry-run pruning breaks the forward: {m}"
        if errors:
            log.info("dry run pinned %d group(s): %s", len(errors), sorted(errors))
        return sorted(errors)

    def _split_clusters(self, plan1: Mapping[int, torch.Tensor], skip: set[int]) -> list[tuple[str, dict, list[int]]]:
        """(where, plan) for each split/narrow/slice whose parts hold prunable groups of their own in at least two
        parts, and the ids of those groups: the plan drops about as many channels from the split input as ``plan1`` does, but front-loaded (the
        first parts lose them, the last keep theirs; reversed if that is ``plan1``'s distribution)."""
        ok = {g.leaf_id: g for g in self.prunable_groups if g.id not in skip and g.id in plan1}
        res, seen = [], set()
        for where, parts in self.analyzer.splits:
            gparts = [list(dict.fromkeys(ok[s.id].id for s in C.leaves(p) if s.id in ok)) for p in parts]
            count = Counter(i for p in gparts for i in p)
            own = [(p, [i for i in gp if count[i] == 1]) for p, gp in zip(parts, gparts)]
            own = [(p, gp) for p, gp in own if gp]
            if len(own) < 2:
                continue
            key = tuple(tuple(gp) for _p, gp in own)
            if key in seen:
                continue
            seen.add(key)

            def part_drop(p, counts):
                return C.layout_size(p) - C.kept_size(p, {self.groups[i].leaf_id: n for i, n in counts.items()})

            base = [part_drop(p, {i: len(plan1[i]) for i in gp}) for p, gp in own]
            for order in (own, own[::-1]):
                left, counts = sum(base), {}
                for p, gp in order:
                    for i in gp:
                        per = part_drop(p, {i: 1})
                        n = min(self.groups[i].size - 1, left // per) if per > 0 else 0
                        if n > 0:
                            counts[i] = n
                            left -= n * per
                got = [part_drop(p, {i: counts[i] for i in gp if i in counts}) for p, gp in own]
                if got != base and counts:
                    res.append((where, {i: torch.arange(n) for i, n in counts.items()}, [i for k in key for i in k]))
                    break
        return res

    def _compare_trace(self, ops: list, out_shapes: list, plan, aten_ops: list,
                       changed_only: bool = False) -> tuple[str | None, int | None]:
        """Compare a dry run's (op name, output shapes) trace with the shapes the analysis predicts
        (``aten_ops``: the tape's ops without the ``prunekit.*`` markers, which the trace does not record).

        ``changed_only``: compare only the dims the plan resizes (a dry run on real tensors, whose other
        dims may depend on values -- e.g. the number of detections -- and differ after any change).
        Returns (mismatch message or None, tape index of the first mismatching op when known)."""
        drops = self.drops_by_leaf({k: v.tolist() for k, v in plan.items()})
        nodes = self.tape.nodes

        def mismatch(nid, got) -> tuple | None:
            shape = nodes[nid].shape
            if len(got) != len(shape):
                return tuple(self.dim_size(nid, d, drops) for d in range(len(shape)))
            exp = tuple(self.dim_size(nid, d, drops) for d in range(len(shape)))
            if changed_only:
                bad = any(e != g for e, g, s in zip(exp, got, shape) if e != s)
            else:
                bad = exp != tuple(got)
            return exp if bad else None
        n_same = next((i for i, (a, (name, _)) in enumerate(zip(aten_ops, ops)) if a.name != name),
                      min(len(ops), len(aten_ops)))
        if n_same < len(aten_ops) or len(ops) != len(aten_ops):
            # the op sequence changed (e.g. a dim became 1, so a copy is skipped): the ops before the change
            # still correspond one to one (a reshape by a hard-coded size usually comes first), then the outputs
            for a, (_, shapes) in zip(aten_ops[:n_same], ops[:n_same]):
                for ra, got in zip(a.outs(), shapes):
                    exp = mismatch(ra.id, got)
                    if exp is not None:
                        return (f"{a.name} in {a.module or '<root>'} produces shape {got}, expected {exp} "
                                "(the forward hard-codes a size)"), a.index
            if len(out_shapes) != len(self.tape.outputs):
                return f"the model returns {len(out_shapes)} tensors instead of {len(self.tape.outputs)}", None
            for i, (na, got) in enumerate(zip(self.tape.outputs, out_shapes)):
                exp = mismatch(na, got)
                if exp is not None:
                    return f"output {i} has shape {got}, expected {exp}", None
            return None, None
        for a, (_, shapes) in zip(aten_ops, ops):
            for ra, got in zip(a.outs(), shapes):
                exp = mismatch(ra.id, got)
                if exp is not None:
                    return (f"{a.name} in {a.module or '<root>'} produces shape {got}, expected {exp} "
                            "(the forward hard-codes a size)"), a.index
        return None, None

    def _groups_at(self, op_index: int | None) -> set[int]:
        """Ids of the groups whose channels flow through the op at ``op_index`` of the captured tape."""
        if op_index is None or not 0 <= op_index < len(self.tape.ops):
            return set()
        op = self.tape.ops[op_index]
        out: set[int] = set()
        for r in op.inputs() + op.outs():
            for lay in self.analyzer.layouts[r.id] or ():
                if lay is None:
                    continue
                for s in C.leaves(lay):
                    g = self._leaf_to_group.get(s.id)
                    if g is not None:
                        out.add(g.id)
        return out

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


def _trace_scalars(model: nn.Module, example_inputs: Any, forward_fn: Callable | None):
    """One forward's (ATen op name, Python numbers among its arguments) per op, and the ``scale`` argument of
    each ``F.scaled_dot_product_attention`` call (as a one-element list; the scale probe)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from .capture.tape import _SKIP, _meta_inputs, _no_mha_fastpath, call_model, eval_mode

    class _Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[tuple[str, list]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket.__name__ not in _SKIP:
                flat, _ = tree_flatten((args, kwargs))
                self.ops.append((str(func), [float(a) for a in flat
                                             if isinstance(a, (int, float)) and not isinstance(a, bool)]))
            return func(*args, **kwargs)

    class _SDPA(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.scales: list[list] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                sc = kwargs.get("scale", args[6] if len(args) > 6 else None)
                self.scales.append([float(sc) if isinstance(sc, (int, float)) else None])
            return func(*args, **kwargs)

    tr, fm = _Trace(), _SDPA()
    inputs = _meta_inputs(example_inputs)
    with eval_mode(model), torch.no_grad(), _no_mha_fastpath(), fm, tr:
        call_model(model, inputs, forward_fn)
    return tr.ops, fm.scales


def _dry_run_plan(groups: list[Group], second: bool = False) -> dict[int, torch.Tensor]:
    """Units each group loses in the dry run: different counts for groups of equal size.

    Two groups whose sizes meet in one op (a reshape that takes its target width from another tensor,
    e.g. ``x.reshape(B, N, C)`` of an attention output sized by the block input) can only fail the
    dry run if they shrink differently: with equal counts the shapes coincide and a model that breaks
    for any other plan would pass.  So groups of the same size get distinct counts (1, 2, 3, ... by
    id, wrapping at about half the size); at least 2 units are kept where possible.

    ``second=True``: the counts of the dry run's second plan, about half of each group (again distinct for
    groups of equal size: half, half+1, half-1, ...), so sizes derived by integer arithmetic from a bound
    attribute (``self.n // self.kv``) or a divisibility the first counts kept by chance are exercised."""
    rank: dict[int, int] = defaultdict(int)
    plan = {}
    for g in sorted(groups, key=lambda g: g.id):
        k = rank[g.size]
        rank[g.size] += 1
        if second:
            off = (k + 1) // 2 * (1 if k % 2 else -1)
            n = min(g.size - 1, max(1, g.size // 2 + off))
        else:
            span = max(1, min(g.size - 2, max(3, g.size // 2)))
            n = 1 + k % span
        plan[g.id] = torch.arange(n)
    return plan


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
