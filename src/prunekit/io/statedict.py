"""Load a plain state dict of a pruned model (no pruning record) into a freshly built original model.

The checkpoint's shapes say how many units each channel group lost, not which ones; since the weights are
overwritten anyway, the model is resized by dropping that many units of each group and then loaded.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from collections import defaultdict
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

from ..graph import PruneGraph, analyze
from ..surgery import PruningError, normalize_plan, param_drops, prune
from .checkpoint import CheckpointError, PathLike, _unwrap, check_state, read_checkpoint, with_module_versions
from ..analysis.analyzer import module_label

log = logging.getLogger("prunekit.io")

Key = tuple[str, int]  # (parameter/buffer fqn, dim)
_MAX_JOINT = 200_000  # largest joint search over groups that share every tensor dim (heads x head_dim)


class IncompatibleKeys(NamedTuple):
    """Keys of the state dict that the model lacks (``unexpected_keys``) and the reverse (``missing_keys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class _Solver:
    """Infer how many units each group lost from the checkpoint's shapes.

    A tensor dim is a sum of terms (concatenated ranges); a term is a product of factors (e.g. heads x
    head_dim), each factor owned by at most one group.  Removing ``n`` units of the group at a factor shrinks
    that factor by ``n``; the dim loses ``sum(prod(sizes) - prod(kept sizes))`` entries.
    """

    def __init__(self, graph: PruneGraph, current: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor],
                 source: str):
        self.graph, self.source = graph, source
        aliases = graph.tape.param_aliases
        terms: dict[Key, dict[tuple, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
        for g in graph.groups:
            for m in g.members:
                terms[(m.fqn, m.dim)][(m.offset, tuple(m.sizes))][m.pos] = g.id
        self.terms = terms
        self.target: dict[Key, int] = {}
        self.shapes: dict[Key, tuple[int, int]] = {}
        for (fqn, dim) in terms:
            name = next((n for n in [fqn] + aliases.get(fqn, []) if n in state and n in current), None)
            if name is None:
                continue
            have, want = current[name], state[name].shape
            if len(have) == len(want):
                self.target[(fqn, dim)] = have[dim] - want[dim]
                self.shapes[(fqn, dim)] = (have[dim], want[dim])
        self.n: dict[int, int] = {}
        self.why: dict[int, Key] = {}

    def removed(self, key: Key, n: Mapping[int, int], gid: int = -1, count: int = 0) -> int:
        """Entries ``key`` loses when group g loses ``n[g]`` units (and group ``gid`` loses ``count``)."""
        total = 0
        for (_off, sizes), owners in self.terms[key].items():
            kept = math.prod(s - (count if owners.get(k) == gid else n.get(owners[k], 0)) if k in owners else s
                             for k, s in enumerate(sizes))
            total += math.prod(sizes) - kept
        return total

    def groups_of(self, key: Key) -> set[int]:
        return {g for owners in self.terms[key].values() for g in owners.values()}

    def describe(self, key: Key) -> str:
        have, want = self.shapes[key]
        return f"{key[0]} dim {key[1]} (model {have}, checkpoint {want})"

    def solve(self) -> dict[int, int]:
        progress = True
        while progress:
            progress = False
            for key in self.target:
                unknown = self.groups_of(key) - set(self.n)
                if len(unknown) == 1:
                    gid = unknown.pop()
                    self._solve_one(gid, key)
                    progress = True
            self._check_known()
        rest = {g for key in self.target for g in self.groups_of(key)} - set(self.n)
        while rest:
            comp = self._component(next(iter(rest)))
            self._solve_joint(comp)
            rest -= comp
        self._check_known()
        return {g: c for g, c in self.n.items() if c}

    def _solve_one(self, gid: int, key: Key) -> None:
        size = self.graph.group(gid).size
        lo, hi = 0, size  # removed() grows with the count: find the smallest count that reaches the target
        while lo < hi:
            mid = (lo + hi) // 2
            if self.removed(key, self.n, gid, mid) < self.target[key]:
                lo = mid + 1
            else:
                hi = mid
        sols = [c for c in (lo, lo + 1) if c <= size and self.removed(key, self.n, gid, c) == self.target[key]]
        if len(sols) != 1:
            raise CheckpointError(f"{self.source}: {self.describe(key)} cannot be explained by removing units of "
                                  f"{self._name(gid)} (size {size}); the checkpoint does not come from pruning this "
                                  "architecture. The model was left unchanged.")
        self.n[gid], self.why[gid] = sols[0], key

    def _check_known(self) -> None:
        for key, want in self.target.items():
            gids = self.groups_of(key)
            if gids <= set(self.n) and self.removed(key, self.n) != want:
                votes = "; ".join(f"{self.describe(self.why[g])} implies {self.n[g]} unit(s) of {self._name(g)} "
                                  "removed" for g in sorted(gids) if g in self.why)
                raise CheckpointError(f"{self.source}: inconsistent shapes: {self.describe(key)} disagrees with "
                                      f"{votes}. The model was left unchanged.")

    def _component(self, start: int) -> set[int]:
        comp, todo = set(), [start]
        while todo:
            g = todo.pop()
            if g in comp:
                continue
            comp.add(g)
            for key in self.target:
                gids = self.groups_of(key)
                if g in gids:
                    todo.extend(gids - set(self.n) - comp)
        return comp

    def _solve_joint(self, comp: set[int]) -> None:
        gids = sorted(comp)
        # a pinned group cannot have lost units: search only its 0 (a count of 1 in range(1))
        sizes = [self.graph.group(g).size + 1 if self.graph.group(g).prunable else 1 for g in gids]
        keys = [k for k in self.target if self.groups_of(k) & comp]
        names = ", ".join(self._name(g) for g in gids if self.graph.group(g).prunable)
        if math.prod(sizes) > _MAX_JOINT:
            raise CheckpointError(f"{self.source}: cannot infer how many units of {names} were removed (they share "
                                  "every tensor dim); save pruned models with prunekit.save() and load them with "
                                  "prunekit.load(), which stores the exact pruning record")
        sols = []
        for combo in itertools.product(*(range(s) for s in sizes)):
            n = {**self.n, **dict(zip(gids, combo))}
            if all(self.removed(k, n) == self.target[k] for k in keys):
                sols.append(combo)
                if len(sols) > 3:
                    break
        if not sols:
            raise CheckpointError(f"{self.source}: the shapes of {', '.join(self.describe(k) for k in keys[:4])} "
                                  f"cannot be explained by removing units of {names}. The model was left unchanged.")
        if len(sols) > 1:
            opts = " or ".join(str(dict(zip(gids, s))) for s in sols[:3])
            raise CheckpointError(f"{self.source}: ambiguous: {self.describe(keys[0])} fits several ways of removing "
                                  f"units of {names} ({opts}, as {{group: units removed}}); a plain state dict cannot "
                                  "tell them apart. Save with prunekit.save() and load with prunekit.load(), which "
                                  "store the pruning record. The model was left unchanged.")
        for g, c in zip(gids, sols[0]):
            self.n[g], self.why[g] = c, keys[0]

    def plan(self) -> dict[int, list[int]]:
        """{group id: the last n units} for every group that lost n > 0 units."""
        plan = {}
        for gid, n in self.solve().items():
            g = self.graph.group(gid)
            why = f"{self.describe(self.why[gid])} implies that {n} unit(s) of {self._name(gid)} were removed"
            if not g.prunable:
                raise CheckpointError(f"{self.source}: {why}, but that group cannot be pruned in this model: "
                                      f"{g.reason}. Build the model with the checkpoint's config. The model was left "
                                      "unchanged.")
            if n >= g.size:
                raise CheckpointError(f"{self.source}: {why}, i.e. all of them. The model was left unchanged.")
            plan[gid] = list(range(g.size - n, g.size))  # which units does not matter: the weights are overwritten
        return plan

    def _name(self, gid: int) -> str:
        g = self.graph.group(gid)
        return f"group {gid} ({g.unit}s of {', '.join(map(module_label, g.modules[:2])) or '?'})"




def _pruned_shapes(graph: PruneGraph, current: Mapping[str, torch.Size], plan: Mapping[int, list[int]]
                   ) -> dict[str, torch.Size]:
    shapes = {k: list(v) for k, v in current.items()}
    for fqn, dims in param_drops(graph, normalize_plan(graph, plan)).items():
        for name in [fqn] + graph.tape.param_aliases.get(fqn, []):
            if name in shapes:
                for d, idx in dims.items():
                    shapes[name][d] -= idx.numel()
    return {k: torch.Size(v) for k, v in shapes.items()}


def load_state_dict_pruned(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | PathLike, *,
                           example_inputs: Any = None, strict: bool = True) -> IncompatibleKeys:
    """Load a pruned model's plain state dict into a freshly built *original* ``model``, resizing it first.

    ``state_dict`` is a dict of tensors, a dict with a ``"state_dict"``/``"model"`` entry, or a path to a
    ``torch.save`` or safetensors file.  If every shape already fits, this is a plain ``load_state_dict``.
    Otherwise ``example_inputs`` is required: the model is analysed, the number of units each channel group
    lost is inferred from the checkpoint's shapes (consistently across all tensors of the group), the model is
    pruned in place by that many units per group, and the weights are loaded.  Shapes that no group explains,
    conflicting or ambiguous shapes (e.g. heads vs head_dim) and, with ``strict``, missing/unexpected keys
    raise :class:`CheckpointError` before the model is touched.

    Returns ``(missing_keys, unexpected_keys)`` like ``nn.Module.load_state_dict``.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        source = str(state_dict)
        state = read_checkpoint(state_dict).state_dict
    else:
        source = "state_dict"
        state = _unwrap(state_dict, source)
    current = {k: v.shape for k, v in model.state_dict().items()}
    differ = [k for k, v in state.items() if k in current and tuple(v.shape) != tuple(current[k])]
    if not differ:
        expected: Mapping[str, torch.Size] = current
        graph = plan = None
    else:
        if example_inputs is None:
            listed = "; ".join(f"{k} (model {tuple(current[k])}, checkpoint {tuple(state[k].shape)})"
                               for k in differ[:5])
            raise CheckpointError(f"{source}: {len(differ)} tensor(s) differ in shape from the model: {listed}. Pass "
                                  "example_inputs=... (an input the model accepts) so prunekit can analyse the model "
                                  "and resize it to the checkpoint. The model was left unchanged.")
        graph = analyze(model, example_inputs)
        covered = {(m.fqn, m.dim) for g in graph.groups for m in g.members}
        covered |= {(a, d) for (f, d) in covered for a in graph.tape.param_aliases.get(f, [])}
        for k in differ:
            have, want = tuple(current[k]), tuple(state[k].shape)
            dims = [d for d in range(len(have)) if len(have) != len(want) or have[d] != want[d]]
            if len(have) != len(want) or any((k, d) not in covered for d in dims):
                raise CheckpointError(f"{source}: {k} has shape {want} in the checkpoint but {have} in the model, and "
                                      "no channel group of the model explains the difference; the checkpoint belongs "
                                      "to another architecture or config. The model was left unchanged.")
        plan = _Solver(graph, current, state, source).plan()
        expected = _pruned_shapes(graph, current, plan)
    missing, unexpected = check_state(source, expected, state, strict, original=current)
    if plan:
        try:
            prune(model, graph, plan, verify=False)
        except PruningError as e:
            raise CheckpointError(f"{source}: resizing the model failed: {e}") from e
        log.info("%s: resized %d group(s) to the checkpoint: %s", source, len(plan),
                 {g: len(u) for g, u in plan.items()})
    res = model.load_state_dict(with_module_versions(state, model), strict=strict)
    return IncompatibleKeys(list(res.missing_keys), list(res.unexpected_keys))
