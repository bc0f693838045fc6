"""The dry run: before any real pruning, prove that every plan the analysis offers applies.

``validate`` removes units on a *view* of the user's model (its tensors swapped for meta ones, or for private
copies when the forward needs real values), re-runs the forward under a shape-only trace and compares every
op's output shape with what the channel analysis predicts; groups whose removal breaks the forward are found
by bisection and pinned with the reason.  ``check_scales`` marks groups inexact whose pruning changes a scale
the forward computes from a size attribute.

Both are given the slicing routine as ``trial(model, graph, plan)``: a context manager that removes the
plan's units and rolls every change back on exit (:func:`prunekit.surgery.trial`).  This package comes before
surgery in the pipeline, so it never imports it: one slicing routine, exercised here and used for real there.
"""
from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import nn

from ..analysis import spaces as C
from ..analysis.analyzer import Group
from ..capture import meta_view, tensor_view, trace_scalars, trace_shapes

log = logging.getLogger("prunekit")

Trial = Callable[[nn.Module, Any, dict], ContextManager]


def validate(graph, model: nn.Module, trial: Trial) -> list[int]:
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
    cands = [g for g in graph.prunable_groups]
    if not cands:
        return []
    plans = [dry_run_plan(cands), dry_run_plan(cands, second=True)]
    plan_all = plans[0]
    errors: dict[int, str] = {}

    def check(gids: list[int]) -> tuple[str | None, set[int]]:
        """(failure message or None, ids of the groups on the failing op)."""
        plan = {i: plan_all[i] for i in gids}
        try:
            with trial(model, graph, plan):  # on the view: the swapped-in tensors and attributes change
                ops, out_shapes = trace_shapes(model, inputs, graph.forward_fn, meta=backend == "meta")
            msg, at = compare_trace(graph, ops, out_shapes, plan, aten_ops, changed_only=backend == "real")
            return msg, groups_at(graph, at)
        except Exception as e:  # noqa: BLE001 - any failure means this plan breaks the forward
            k = getattr(e, "prunekit_ops_recorded", None)  # the k-th ATen op of the tape failed
            at = aten_ops[k].index if k is not None and k < len(aten_ops) else None
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", groups_at(graph, at)

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

    inputs = graph.example_inputs
    aten_ops = [op for op in graph.tape.ops if not op.name.startswith("prunekit.")]
    backend = "meta"
    if graph.tape.device != "meta":
        # the capture needed real values (.item(), data-dependent shapes): if the unpruned forward cannot
        # run on meta either, the dry run runs on real tensors (private copies swapped in, the same checks)
        with meta_view(model):
            try:
                trace_shapes(model, inputs, graph.forward_fn)
            except Exception as e:  # noqa: BLE001
                backend = "real"
                log.info("dry run on real tensors: the forward needs real values (%s: %s)",
                         type(e).__name__, str(e).splitlines()[0][:120])
    graph.validation_backend = backend
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
        clusters = split_clusters(graph, plans[0], set(errors))
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
        g = graph.groups[gid]
        g.prunable = False
        g.reason = f"dry-run pruning breaks the forward: {m}"
    if errors:
        log.info("dry run pinned %d group(s): %s", len(errors), sorted(errors))
    return sorted(errors)


def split_clusters(graph, plan1: Mapping[int, torch.Tensor], skip: set[int]) -> list[tuple[str, dict, list[int]]]:
    """(where, plan) for each split/narrow/slice whose parts hold prunable groups of their own in at least two
    parts, and the ids of those groups: the plan drops about as many channels from the split input as ``plan1`` does, but front-loaded (the
    first parts lose them, the last keep theirs; reversed if that is ``plan1``'s distribution)."""
    ok = {g.leaf_id: g for g in graph.prunable_groups if g.id not in skip and g.id in plan1}
    res, seen = [], set()
    for where, parts in graph.analyzer.splits:
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
            return C.layout_size(p) - C.kept_size(p, {graph.groups[i].leaf_id: n for i, n in counts.items()})

        base = [part_drop(p, {i: len(plan1[i]) for i in gp}) for p, gp in own]
        for order in (own, own[::-1]):
            left, counts = sum(base), {}
            for p, gp in order:
                for i in gp:
                    per = part_drop(p, {i: 1})
                    n = min(graph.groups[i].size - 1, left // per) if per > 0 else 0
                    if n > 0:
                        counts[i] = n
                        left -= n * per
            got = [part_drop(p, {i: counts[i] for i in gp if i in counts}) for p, gp in own]
            if got != base and counts:
                res.append((where, {i: torch.arange(n) for i, n in counts.items()}, [i for k in key for i in k]))
                break
    return res


def check_scales(graph, model: nn.Module, trial: Trial) -> list[int]:
    """Mark groups inexact whose pruning changes a scale the forward computes from a size attribute.

    ``attn / math.sqrt(graph.head_dim)`` or ``q * graph.head_dim ** -0.5``: surgery rewrites ``head_dim``,
    so the pruned model scales differently from the zeroed original (SDPA's default scale, 1/sqrt of the
    actual head_dim, is marked the same way by its rule).  The analyzer lists scalars equal to a power of
    a bound size attribute; whether one is computed from it or is a literal is found by running the
    forward on a meta view of ``model`` with those groups pruned by one unit and comparing the scalar.
    A forward that cannot run that way is assumed to compute it (inexact, never wrongly exact).
    Returns the ids of the groups marked."""
    suspects = []
    for op, value, attr, b in graph.analyzer.scale_suspects:
        lays = b.layouts if isinstance(b.layouts, list) else [b.layouts]
        gids = sorted({g.id for l in lays for s in C.leaves(l)
                       if (g := graph._leaf_to_group.get(s.id)) is not None and g.prunable and g.exact})
        if gids:
            suspects.append((op, value, attr, b, gids))
    if not suspects:
        return []
    aten = [op for op in graph.tape.ops if not op.name.startswith("prunekit.")]
    sdpa = [op for op in graph.tape.ops if op.name == "prunekit.sdpa_scale"]
    pos = {op.index: k for k, op in enumerate(aten)}
    pos.update({op.index: k for k, op in enumerate(sdpa)})
    plan = {gid: torch.arange(1) for _, _, _, _, gids in suspects for gid in gids}
    probe = None
    try:
        with meta_view(model), trial(model, graph, plan):
            probe = trace_scalars(model, graph.example_inputs, graph.forward_fn)
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
            g = graph.groups[gid]
            g.exact = False
            if why not in g.inexact_reasons:
                g.inexact_reasons.append(why)
            marked.append(gid)
    return sorted(set(marked))


def compare_trace(graph, ops: list, out_shapes: list, plan, aten_ops: list,
                   changed_only: bool = False) -> tuple[str | None, int | None]:
    """Compare a dry run's (op name, output shapes) trace with the shapes the analysis predicts
    (``aten_ops``: the tape's ops without the ``prunekit.*`` markers, which the trace does not record).

    ``changed_only``: compare only the dims the plan resizes (a dry run on real tensors, whose other
    dims may depend on values -- e.g. the number of detections -- and differ after any change).
    Returns (mismatch message or None, tape index of the first mismatching op when known)."""
    drops = graph.drops_by_leaf({k: v.tolist() for k, v in plan.items()})
    nodes = graph.tape.nodes

    def mismatch(nid, got) -> tuple | None:
        shape = nodes[nid].shape
        if len(got) != len(shape):
            return tuple(graph.dim_size(nid, d, drops) for d in range(len(shape)))
        exp = tuple(graph.dim_size(nid, d, drops) for d in range(len(shape)))
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
        if len(out_shapes) != len(graph.tape.outputs):
            return f"the model returns {len(out_shapes)} tensors instead of {len(graph.tape.outputs)}", None
        for i, (na, got) in enumerate(zip(graph.tape.outputs, out_shapes)):
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


def groups_at(graph, op_index: int | None) -> set[int]:
    """Ids of the groups whose channels flow through the op at ``op_index`` of the captured tape."""
    if op_index is None or not 0 <= op_index < len(graph.tape.ops):
        return set()
    op = graph.tape.ops[op_index]
    out: set[int] = set()
    for r in op.inputs() + op.outs():
        for lay in graph.analyzer.layouts[r.id] or ():
            if lay is None:
                continue
            for s in C.leaves(lay):
                g = graph._leaf_to_group.get(s.id)
                if g is not None:
                    out.add(g.id)
    return out


def dry_run_plan(groups: list[Group], second: bool = False) -> dict[int, torch.Tensor]:
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
        n = max(1, min(n, g.size - g.min_keep))  # an expert group keeps the router's top-k
        m = g.multiple_of
        if m > 1:  # a kernel needs the kept width aligned: drop whole multiples
            n = min(max(m, n // m * m), (g.size - m) // m * m)
        plan[g.id] = torch.arange(n)
    return plan
