"""``pk.DepthPruner``: remove whole residual blocks (decoder layers of an LLM, blocks of a ViT or CNN stage).

    dp = pk.DepthPruner(model, x, data=calib_batches, n_blocks=4)            # or target=pk.ParamsTarget(0.8)
    print(dp.scores())                                                       # {block name: importance}
    result = dp.prune()                                                      # removed in place, verified

Candidates: the children of every ``nn.ModuleList`` / ``nn.Sequential`` whose class repeats in it, that hold
parameters and whose output has the shape of their input on the example input (so removing one leaves the
next block a valid input); containers nested inside a candidate are not searched.  ``blocks=`` overrides
this with container names (``"model.layers"``) or block names (``"model.layers.3"``).

Criteria:

* ``"block_influence"`` (ShortGPT / Minitron): 1 - cos(input, output) of each block, averaged over the
  positions of the calibration data (tokens of an LLM -- padding excluded by the batch's ``attention_mask`` --
  or spatial positions of a CNN, channel vectors compared); a block that barely changes its input matters least.
  Running sums only: memory does not grow with the data.
* ``"perplexity"``: the increase of the loss when the block alone is skipped (its output replaced by its
  input), over the data; ``loss_fn(model, batch)`` (default: the criteria's, :func:`prunekit.plan.importance.base.
  default_loss` -- token batches get the causal-LM ``out.loss`` with ``labels=input_ids``, padding left out;
  ``(x, y)`` batches cross-entropy).

Blocks with the lowest scores are removed: ``n_blocks`` of them, or as many as ``target`` (``ParamsTarget`` /
``FlopsTarget``) needs.  After the removal the model runs the example input again (output shapes
unchanged, outputs finite); a failure restores it.  The model's config and the blocks' ``layer_idx`` follow
(:mod:`prunekit.surgery.blocks`), so a transformers model still generates with its KV cache and saves /
reloads.  Width pruning composes: run a :class:`prunekit.Pruner` on the result (``pk.Pruner`` analyses the
model as it is then).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import call_model, eval_mode, flatten_outputs
from ..plan.importance.base import default_loss
from ..plan.targets import FlopsTarget, ParamsTarget, Target
from ..runs.progress import progress_bar
from ..surgery.apply import RECORD_ATTR, PruningError, _Undo
from ..surgery.blocks import remove_blocks

log = logging.getLogger("prunekit.depth")

__all__ = ["DepthPruner", "DepthResult", "find_blocks"]

CRITERIA = ("block_influence", "perplexity")


@dataclass
class DepthResult:
    """What :meth:`DepthPruner.prune` did: the removed blocks (names before removal) and every score."""

    removed: list[str]
    scores: dict[str, float]
    params_before: int
    params_after: int
    blocks_before: int
    blocks_after: int
    details: dict[str, Any] = field(default_factory=dict)


def _first_tensor(args: Sequence, kwargs: Mapping) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs
    for v in kwargs.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    return None


def _main_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _nparams(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None,
                blocks: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """``[(container name, index), ...]`` of removable blocks (see the module docstring)."""
    modules = dict(model.named_modules())
    if blocks is not None:
        out = []
        for name in blocks:
            if name not in modules:
                raise ValueError(f"DepthPruner: blocks names {name!r}, which is not a module of the model")
            mod = modules[name]
            if isinstance(mod, (nn.ModuleList, nn.Sequential)):
                out += [(name, i) for i in range(len(mod))]
            else:
                parent, _, idx = name.rpartition(".")
                if not idx.isdigit() or not isinstance(modules.get(parent), (nn.ModuleList, nn.Sequential)):
                    raise ValueError(f"DepthPruner: {name!r} is neither a ModuleList/Sequential of blocks nor one of "
                                     "its children")
                out.append((parent, int(idx)))
        return sorted(set(out), key=lambda t: (t[0], t[1]))
    containers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) < 2:
            continue
        if any(name.startswith(c + ".") for c in containers):
            continue  # nested inside a container already taken (its blocks' insides)
        counts = Counter(type(c) for c in mod)
        if max(counts.values()) >= 2:
            containers.append(name)
    shapes: dict[tuple[str, int], bool] = {}
    hooks = []
    for cname in containers:
        cont = modules[cname]
        counts = Counter(type(c) for c in cont)
        for i, child in enumerate(cont):
            if counts[type(child)] < 2 or not any(True for _ in child.parameters()):
                continue

            def hook(mod, args, kwargs, out, key=(cname, i)):
                x, y = _first_tensor(args, kwargs), _main_output(out)
                shapes[key] = shapes.get(key, True) and x is not None and y is not None and x.shape == y.shape
            hooks.append(child.register_forward_hook(hook, with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs, forward_fn)
    finally:
        for h in hooks:
            h.remove()
    return [k for k, ok in shapes.items() if ok]


class DepthPruner:
    """Remove the least important blocks of ``model`` (see the module docstring).

    Args:
        model: the model, changed in place by :meth:`prune`.
        example_inputs: an input the model takes (finds the blocks, verifies the result).
        data: calibration batches (tensor / tuple / dict of keyword inputs); default: the example input alone.
        n_blocks: how many blocks to remove; or
        target: a :class:`~prunekit.ParamsTarget` / :class:`~prunekit.FlopsTarget`: remove blocks, least important
            first, until the model has at most that share of its parameters / MACs.
        criterion: ``"block_influence"`` or ``"perplexity"``.
        blocks: container or block names to choose from (default: found, see :func:`find_blocks`).
        loss_fn: ``loss_fn(model, batch) -> scalar`` for ``"perplexity"``.
        forward_fn: ``forward_fn(model, inputs)`` when the model is not called as ``model(inputs)``.
        max_batches: use at most that many batches of ``data``.
        progress: a progress bar while scoring.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, data: Iterable | None = None, *,
                 n_blocks: int | None = None, target: Target | None = None, criterion: str = "block_influence",
                 blocks: Sequence[str] | None = None, loss_fn: Callable | None = None,
                 forward_fn: Callable | None = None, max_batches: int | None = None, progress: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"DepthPruner expects an nn.Module, got {type(model).__name__}")
        if example_inputs is None:
            raise ValueError("DepthPruner needs example_inputs (what the model takes, e.g. {'input_ids': ids})")
        if (n_blocks is None) == (target is None):
            raise ValueError("DepthPruner needs exactly one of n_blocks=K (how many blocks to remove) or "
                             "target=pk.ParamsTarget(r) / pk.FlopsTarget(r)")
        if n_blocks is not None and (isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 1):
            raise ValueError(f"DepthPruner: n_blocks must be a positive int, got {n_blocks!r}")
        if target is not None and not isinstance(target, (ParamsTarget, FlopsTarget)):
            raise ValueError(f"DepthPruner: target must be pk.ParamsTarget or pk.FlopsTarget, got {target!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"DepthPruner: unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        self.model, self.example_inputs, self.forward_fn = model, example_inputs, forward_fn
        self.data = data
        self.n_blocks, self.target, self.criterion = n_blocks, target, criterion
        self.loss_fn = loss_fn or default_loss(forward_fn)  # token batches: causal-LM loss, padding left out
        self.max_batches, self.progress = max_batches, progress
        self.candidates = find_blocks(model, example_inputs, forward_fn, blocks)
        if not self.candidates:
            raise ValueError("DepthPruner: no removable block found (blocks are repeated children of a ModuleList/"
                             "Sequential whose output has their input's shape); pass blocks=[container names]")
        if n_blocks is not None:
            per = Counter(c for c, _ in self.candidates)
            room = sum(min(k, len(model.get_submodule(c) if c else model) - 1) for c, k in per.items())
            if n_blocks > room:
                raise ValueError(f"DepthPruner: n_blocks={n_blocks} but at most {room} of the {len(self.candidates)} "
                                 f"candidate blocks (in {len(per)} container(s)) can go: each container keeps a block")
        self._scores: dict[str, float] | None = None

    # -------------------------------------------------------------- names
    @staticmethod
    def name(container: str, index: int) -> str:
        return f"{container}.{index}" if container else str(index)

    def _module(self, container: str, index: int) -> nn.Module:
        cont = self.model.get_submodule(container) if container else self.model
        return cont[index]

    def _batches(self) -> list[Any]:
        data = [self.example_inputs] if self.data is None else self.data
        out = []
        for i, b in enumerate(data):
            if self.max_batches is not None and i >= self.max_batches:
                break
            out.append(b)
        if not out:
            raise ValueError("DepthPruner: data has no batches")
        return out

    # -------------------------------------------------------------- scores
    def scores(self) -> dict[str, float]:
        """``{block name: importance}`` (higher = more important); computed once."""
        if self._scores is None:
            batches = self._batches()
            self._scores = (self._block_influence(batches) if self.criterion == "block_influence"
                            else self._perplexity(batches))
        return dict(self._scores)

    def _call(self, batch: Any) -> Any:
        return call_model(self.model, batch, self.forward_fn)

    def _block_influence(self, batches: list) -> dict[str, float]:
        sums = {k: 0.0 for k in self.candidates}
        counts = {k: 0 for k in self.candidates}
        state: dict[str, Any] = {}
        hooks = []
        for key in self.candidates:
            def hook(mod, args, kwargs, out, key=key):
                x, y = _first_tensor(args, kwargs), _main_output(out)
                if x is None or y is None or x.shape != y.shape:
                    return
                dim = 1 if x.dim() == 4 else -1  # (N, C, H, W): channel vectors; (N, L, D) / (N, D): last dim
                cos = F.cosine_similarity(x.float(), y.float(), dim=dim, eps=1e-8)
                m = state.get("mask")
                if m is not None and cos.dim() == 2 and tuple(m.shape) == tuple(cos.shape):
                    cos = cos[m]
                sums[key] += float((1.0 - cos).sum())
                counts[key] += cos.numel()
            hooks.append(self._module(*key).register_forward_hook(hook, with_kwargs=True))
        try:
            with eval_mode(self.model), torch.no_grad(), progress_bar(self.progress, len(batches), 0,
                                                                       "block influence") as advance:
                for b in batches:
                    am = b.get("attention_mask") if isinstance(b, Mapping) else None
                    state["mask"] = am.to(torch.bool) if isinstance(am, torch.Tensor) else None
                    self._call(b)
                    advance("")
        finally:
            for h in hooks:
                h.remove()
        return {self.name(*k): sums[k] / max(1, counts[k]) for k in self.candidates}

    def _perplexity(self, batches: list) -> dict[str, float]:
        def mean_loss() -> float:
            return sum(float(self.loss_fn(self.model, b)) for b in batches) / len(batches)

        out = {}
        with eval_mode(self.model), torch.no_grad(), progress_bar(self.progress, len(self.candidates) + 1, 0,
                                                                   "block perplexity") as advance:
            base = mean_loss()
            advance("base")
            for key in self.candidates:
                def skip(mod, args, kwargs, result):
                    x = _first_tensor(args, kwargs)
                    if isinstance(result, torch.Tensor):
                        return x
                    return (x, *result[1:])
                h = self._module(*key).register_forward_hook(skip, with_kwargs=True)
                try:
                    out[self.name(*key)] = mean_loss() - base
                finally:
                    h.remove()
                advance(self.name(*key))
        return out

    # -------------------------------------------------------------- choice
    def choose(self) -> list[tuple[str, int]]:
        """The blocks :meth:`prune` removes, least important first."""
        scores = self.scores()
        order = sorted(self.candidates, key=lambda k: (scores[self.name(*k)], k))
        per_container = {c: len(self.model.get_submodule(c) if c else self.model) for c, _ in self.candidates}
        chosen: list[tuple[str, int]] = []

        def room(k: tuple[str, int]) -> bool:  # every container keeps at least one block
            return per_container[k[0]] - sum(1 for c, _ in chosen if c == k[0]) > 1

        if self.n_blocks is not None:
            for k in order:
                if len(chosen) == self.n_blocks:
                    break
                if room(k):
                    chosen.append(k)
            return chosen
        total = self._measure()
        budget = self.target.ratio * total
        cost = ({k: _nparams(self._module(*k)) for k in self.candidates} if self.target.kind == "params"
                else self._block_macs())
        now = total
        for k in order:
            if now <= budget:
                break
            if room(k):
                chosen.append(k)
                now -= cost.get(k, 0)
        return chosen

    def _measure(self) -> float:
        if self.target.kind == "params":
            return float(_nparams(self.model))
        from ..cost import count
        return float(count(self.model, self.example_inputs, forward_fn=self.forward_fn).macs)

    def _block_macs(self) -> dict[tuple[str, int], float]:
        from ..cost import count
        stats = count(self.model, self.example_inputs, forward_fn=self.forward_fn)
        out = {}
        for k in self.candidates:
            name = self.name(*k)
            out[k] = float(sum(row.macs for row in stats.per_module
                               if row.module == name or row.module.startswith(name + ".")))
        return out

    # -------------------------------------------------------------- prune
    def prune(self) -> DepthResult:
        """Remove the chosen blocks in place; verified (output shapes, finite), rolled back on failure."""
        chosen = self.choose()
        scores = self.scores()
        params_before = _nparams(self.model)
        n_before = sum({c: len(self.model.get_submodule(c) if c else self.model)
                        for c, _ in self.candidates}.values())
        if not chosen:
            log.info("DepthPruner: nothing to remove (the target is already met)")
            return DepthResult([], scores, params_before, params_before, n_before, n_before)
        with eval_mode(self.model), torch.no_grad():
            ref, _ = flatten_outputs(self._call(self.example_inputs))
        undo = _Undo()
        steps = []
        try:
            by_container: dict[str, list[int]] = {}
            for c, i in chosen:
                by_container.setdefault(c, []).append(i)
            for c, idx in by_container.items():
                steps.append(remove_blocks(self.model, c, idx, undo))
            with eval_mode(self.model), torch.no_grad():
                out, _ = flatten_outputs(self._call(self.example_inputs))
            if len(out) != len(ref) or any(a.shape != b.shape for a, b in zip(ref, out)):
                raise PruningError(f"DepthPruner: after removing {', '.join(self.name(*k) for k in chosen)} the model's "
                                   f"outputs changed shape ({[tuple(a.shape) for a in ref]} -> "
                                   f"{[tuple(b.shape) for b in out]}); the model was restored")
            if not all(torch.isfinite(b).all() for b in out if b.is_floating_point()):
                raise PruningError("DepthPruner: the model gives non-finite outputs after the removal; restored")
        except BaseException:
            undo.rollback()
            raise
        rec = getattr(self.model, RECORD_ATTR, None)
        if rec is None:
            rec = []
            object.__setattr__(self.model, RECORD_ATTR, rec)
        rec.extend(steps)
        self._scores = None
        self.candidates = []
        removed = [self.name(*k) for k in chosen]
        params_after = _nparams(self.model)
        log.info("DepthPruner: removed %s (%s); params %d -> %d", ", ".join(removed), self.criterion,
                 params_before, params_after)
        return DepthResult(removed, scores, params_before, params_after, n_before, n_before - len(chosen),
                           {"criterion": self.criterion, "config": [s["blocks"]["config"] for s in steps]})
