"""Group-level importance criteria: the :class:`Criterion` base class and the helpers every criterion shares.

A criterion scores the *units* of a group (channels, blocks of channels, attention heads).  A group
owns slices of several parameters; each slice is a :class:`~prunekit.spaces.graph.Member`.  Every
criterion turns each member into one value per unit with :func:`unit_view` (the only place that
maps a member onto a tensor), combines the members with ``reduction`` and finally normalises the
group's vector with ``normalize``.

Data-driven criteria (``needs_data = True``) run the user's batches through the model inside
:func:`grad_sandbox`, which leaves the model exactly as it was found: parameter values, buffers
(BatchNorm running statistics), ``requires_grad`` flags, ``.grad`` tensors, training flags and the
global RNG state.
"""
from __future__ import annotations

import logging
import math
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...analysis.analyzer import Group, Member
from ...analysis.modules import is_norm, module_attr, source_dim  # noqa: F401  (is_norm: re-exported here)
from ...analysis.analyzer import module_label

log = logging.getLogger("prunekit.importance")

REDUCTIONS = ("mean", "sum", "max")
NORMALIZATIONS = (None, "mean", "max", "sum", "standard")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


# ---------------------------------------------------------------------------- the one member helper
def unit_view(member: Member, tensor: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The entries of ``tensor`` that each unit of ``member``'s group owns, as a ``[n_units, rest]`` matrix.

    Along ``dim`` (default ``member.dim``) the range ``[offset, offset + prod(sizes))`` is a row-major
    product of the leaf factors ``member.sizes``; the group's unit runs along factor ``member.pos``.
    The dim is moved to the front, the range taken, split into its factors, the unit factor moved to
    the front and everything else flattened, so row ``u`` holds exactly the entries that
    ``group.slices([u])`` names for this member (e.g. for a head group: all head_dim rows of head ``u``
    and the whole input dim).  Works for any tensor laid out like the parameter: weights, gradients,
    ``weight * grad``, or a 1-D per-output-channel vector with ``dim=0``.
    """
    d = member.dim if dim is None else dim
    n = math.prod(member.sizes)
    t = tensor.movedim(d, 0)
    if member.offset + n > t.shape[0]:
        raise ValueError(f"{member.fqn}: dim {d} has {t.shape[0]} entries but the group expects "
                         f"[{member.offset}, {member.offset + n}); was the model pruned after pk.analyze? "
                         "Re-run pk.analyze(model, x) on the current model.")
    t = t[member.offset:member.offset + n]
    t = t.reshape(*member.sizes, *t.shape[1:]).movedim(member.pos, 0)
    return t.reshape(member.sizes[member.pos], -1)


def module_and_attr(model: nn.Module, fqn: str) -> tuple[nn.Module | None, str]:
    """Like :func:`prunekit.analysis.modules.module_attr`, with ``None`` for a module the model does not have."""
    try:
        return module_attr(model, fqn)
    except AttributeError:
        return None, fqn.rpartition(".")[2]


output_dim = source_dim  # weight dim that holds a module's output channels (subclasses included), else None


def member_role(model: nn.Module, member: Member) -> str:
    """``"bias"``, ``"norm"`` (a norm layer's scale), ``"source"`` (a layer's output channels),
    ``"consumer"`` (a layer's input channels) or ``"other"`` (free parameters such as ``cls_token``)."""
    mod, attr = module_and_attr(model, member.fqn)
    if attr == "bias" or attr.endswith("_bias"):
        return "bias"
    if attr == "weight" and is_norm(mod):
        return "norm"
    od = output_dim(mod) if attr == "weight" else None
    if od is not None:
        return "source" if member.dim == od else "consumer"
    return "other"


def get_param(model: nn.Module, fqn: str) -> torch.Tensor | None:
    """The parameter ``fqn`` names, or None for buffers, missing names and non-float tensors."""
    try:
        p = model.get_parameter(fqn)
    except AttributeError:
        return None
    if not p.is_floating_point():
        return None
    if p.is_meta:
        raise ValueError(f"parameter {fqn} is on the meta device: importance criteria need real weights "
                         "(load or initialise the model before scoring)")
    return p


def resolve_groups(graph, groups: Iterable[Group | int] | None) -> list[Group]:
    if getattr(graph, "stale", False):
        raise ValueError("the PruneGraph is stale (the model was pruned after analysis); "
                         "re-run pk.analyze(model, x) before scoring")
    if groups is None:
        return list(graph.prunable_groups)
    return [graph.group(g) if isinstance(g, int) else g for g in groups]


def reduce_members(vectors: Sequence[torch.Tensor], how: str) -> torch.Tensor:
    stacked = torch.stack(list(vectors))
    if how == "mean":
        return stacked.mean(0)
    if how == "sum":
        return stacked.sum(0)
    return stacked.max(0).values


def normalize_scores(s: torch.Tensor, how: str | None) -> torch.Tensor:
    """Per-group normalisation; a zero denominator leaves the vector as it is (all-zero scores stay zero)."""
    if how is None or s.numel() == 0:
        return s
    if how == "standard":  # z-score within the group
        std = s.std(unbiased=False)
        return (s - s.mean()) / std if std > 0 else torch.zeros_like(s)
    denom = {"mean": s.mean, "max": s.max, "sum": s.sum}[how]()
    return s / denom if denom != 0 else s


# ---------------------------------------------------------------------------- data handling
def lm_loss(model: nn.Module, batch: Any, forward_fn: Callable | None = None) -> torch.Tensor:
    """Causal-LM loss of a token batch: a dict (``input_ids``, ``attention_mask``, ...) or an integer tensor of
    token ids.  Without ``labels`` in the batch, ``labels = input_ids`` with padding (``attention_mask == 0``) set
    to -100, so the model's own shifted loss (``output.loss`` of a transformers causal LM) leaves padding out."""
    kw = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
    if "labels" not in kw and isinstance(kw.get("input_ids"), torch.Tensor):
        labels = kw["input_ids"].clone()
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
            labels = labels.masked_fill(mask == 0, -100)
        kw["labels"] = labels
    out = forward_fn(model, kw) if forward_fn is not None else model(**kw)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"the default loss for token batches uses the model output's .loss (a causal LM called with "
                         f"labels=input_ids), but {type(model).__name__} returned {type(out).__name__} without one; "
                         "pass loss_fn=lambda model, batch: ...")
    return loss


def _is_token_batch(batch: Any) -> bool:
    if isinstance(batch, Mapping):
        return "input_ids" in batch
    return isinstance(batch, torch.Tensor) and not batch.is_floating_point() and not batch.is_complex()


def default_loss(forward_fn: Callable | None = None) -> LossFn:
    """``batch = (x, y)`` -> ``F.cross_entropy(out, y)`` with ``out = forward_fn(model, x)`` or ``model(x)``;
    token batches (a dict with ``input_ids``, or an integer tensor) -> :func:`lm_loss`."""
    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        if _is_token_batch(batch):
            return lm_loss(model, batch, forward_fn)
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("the default loss_fn expects batches (x, y) and uses F.cross_entropy(model(x), y); "
                             "pass loss_fn=lambda model, batch: ... for other batch layouts or losses")
        x, y = batch
        out = forward_fn(model, x) if forward_fn is not None else model(x)
        return F.cross_entropy(out, y)
    return loss


def iter_batches(data: Any, max_batches: int | None) -> Iterator[Any]:
    """Batches from ``data``: an iterable of batches, a zero-arg callable returning one, or one tensor."""
    if callable(data) and not isinstance(data, (torch.Tensor, nn.Module)):
        data = data()
    if isinstance(data, torch.Tensor):
        data = [data]
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            return
        yield batch


@contextmanager
def grad_sandbox(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Let criteria run forward/backward without leaving a trace on ``model``.

    Inside: every float parameter requires grad and has ``.grad = None``; grad mode is on.  On exit
    the ``requires_grad`` flags, the ``.grad`` tensors (the same objects), buffers (restored in place,
    so BatchNorm running statistics are unchanged even in training mode), every module's ``training``
    flag and the CPU/CUDA RNG states are put back as found.  Yields the parameters.
    """
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    cuda = sorted({p.device.index or 0 for p in params if p.is_cuda})
    try:
        with ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=cuda))
            stack.enter_context(torch.enable_grad())
            for p in params:
                p.grad = None
                if p.is_floating_point():
                    p.requires_grad_(True)
            yield params
    finally:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        for p, rg, g in saved:
            p.requires_grad_(rg)
            p.grad = g
        for m, t in modes:
            m.training = t


# ---------------------------------------------------------------------------- base class
class Criterion:
    """Scores the units of pruning groups; higher = more important.

    Options (all keyword):

    * ``reduction`` -- ``"mean"`` | ``"sum"`` | ``"max"``: how the per-member vectors of one group are
      combined (each member is one parameter slice: producer rows, consumer columns, norm scale, ...).
    * ``normalize`` -- ``None`` | ``"mean"`` | ``"max"`` | ``"sum"`` | ``"standard"`` (z-score): applied
      per group, so scores of different groups are comparable for global ranking.
    * ``include_consumers`` -- count input-channel slices of the layers that read the group (default
      True, as Torch-Pruning's group importance does).
    * ``include_bias`` -- count bias slices (default False, as Torch-Pruning: biases are offsets, not
      evidence of a channel's use).
    * ``skip_frozen`` -- ignore parameters with ``requires_grad=False`` (default False).

    Buffers (running_mean, ...) and integer tensors are never scored.  A group with no scorable
    member gets all-zero scores (logged).  Scores are returned as float32 CPU tensors.
    """

    name = "base"
    needs_data = False
    fallback_name = ""  # criterion used for groups this one cannot score (logged)

    def __init__(self, *, reduction: str = "mean", normalize: str | None = None, include_consumers: bool = True,
                 include_bias: bool = False, skip_frozen: bool = False):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.reduction = reduction
        self.normalize = normalize
        self.include_consumers = include_consumers
        self.include_bias = include_bias
        self.skip_frozen = skip_frozen

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, reduction={self.reduction!r}, normalize={self.normalize!r})"

    # -- public
    def scores(self, model: nn.Module, graph, groups: Iterable[Group | int] | None = None, *, data: Any = None,
               loss_fn: LossFn | None = None, forward_fn: Callable | None = None) -> dict[int, torch.Tensor]:
        """{group id: float tensor [group.size]} for ``groups`` (default: ``graph.prunable_groups``).

        ``data``/``loss_fn``/``forward_fn`` are used by data-driven criteria only (see
        :class:`DataCriterion`); weight criteria ignore them.
        """
        gs = resolve_groups(graph, groups)
        ctx = self._prepare(model, gs, data, loss_fn, forward_fn)
        out: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for g in gs:
                s = self._group_score(model, g, ctx).detach().float().cpu()
                out[g.id] = normalize_scores(s, self.normalize)
        self._report(ctx)
        return out

    __call__ = scores

    # -- hooks for subclasses
    def _prepare(self, model, groups, data, loss_fn, forward_fn) -> Any:
        return None

    def _report(self, ctx: Any) -> None:
        """Log what a scoring call had to do differently (fallbacks); called once per :meth:`scores`."""
        fallback = ctx.get("fallback_ids") if isinstance(ctx, dict) else None
        if fallback:
            log.info("%s: %d group(s) use %s instead: %s", self.name, len(fallback), self.fallback_name,
                     fallback[:20])

    def _member_score(self, model: nn.Module, group: Group, member: Member, w: torch.Tensor, ctx: Any
                      ) -> torch.Tensor | None:
        """Per-unit values ``[group.size]`` for one member (None = this member does not take part)."""
        raise NotImplementedError

    def eligible(self, model: nn.Module, group: Group) -> list[tuple[Member, torch.Tensor, str]]:
        """(member, parameter, role) for every member this criterion's options let count."""
        res = []
        for m in group.members:
            p = get_param(model, m.fqn)
            if p is None or (self.skip_frozen and not p.requires_grad):
                continue
            role = member_role(model, m)
            if (role == "consumer" and not self.include_consumers) or (role == "bias" and not self.include_bias):
                continue
            res.append((m, p, role))
        return res

    def _group_score(self, model: nn.Module, group: Group, ctx: Any) -> torch.Tensor:
        vecs = []
        for m, p, _role in self.eligible(model, group):
            v = self._member_score(model, group, m, p.detach().float(), ctx)
            if v is not None:
                vecs.append(v.to(torch.float32).cpu())
        if not vecs:
            log.info("%s: group %d (%s) has no scorable parameter slice; scores are zero",
                     self.name, group.id, ", ".join(map(module_label, group.modules[:3])))
            return torch.zeros(group.size)
        return reduce_members(vecs, self.reduction)


class DataCriterion(Criterion):
    """A criterion that needs forward/backward passes over the user's batches.

    ``data``: an iterable of batches (a DataLoader, a list), a zero-arg callable returning one, or a
    single tensor (one batch).  ``loss_fn(model, batch) -> scalar``; by default a batch is ``(x, y)``
    and the loss is ``F.cross_entropy(model(x), y)``, where ``forward_fn(model, x)`` replaces
    ``model(x)`` if given.  ``max_batches`` caps how many batches are used.  The model keeps its
    current training mode during the passes (use ``model.eval()`` / ``.train()`` before scoring to
    choose); nothing about it changes (see :func:`grad_sandbox`), and the user's training loop needs
    no change.

    Data-parallel scoring: when ``torch.distributed`` is initialised each rank passes its own batches and the
    accumulated statistics are summed across ranks before scoring (:meth:`_reduce`), so every rank gets the
    scores of one process that saw all ranks' batches.  ``distributed=False`` opts out; a process group
    object restricts the sum to that group (see :func:`prunekit.runs.distributed.active`).
    """

    needs_data = True

    def __init__(self, *, max_batches: int | None = None, distributed: Any = None, **kw):
        super().__init__(**kw)
        self.max_batches = max_batches
        self.distributed = distributed

    def _prepare(self, model, groups, data, loss_fn, forward_fn):
        if data is None:
            raise ValueError(f"criterion {self.name!r} needs data=... batches and a loss_fn "
                             "(loss_fn(model, batch) -> scalar loss; by default batches are (x, y) and the loss "
                             "is cross-entropy); weight-only criteria such as 'l1' need no data")
        return self._run(model, groups, data, loss_fn or default_loss(forward_fn))

    def _run(self, model: nn.Module, groups: list[Group], data: Any, loss_fn: LossFn) -> Any:
        state = self._start(model, groups)
        n = 0
        with grad_sandbox(model) as params:
            with self._hooks(model, groups, state):
                for batch in iter_batches(data, self.max_batches):
                    loss = loss_fn(model, batch)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                        raise ValueError(f"criterion {self.name!r}: loss_fn must return a scalar tensor that "
                                         "depends on the model's parameters")
                    loss.reshape(()).backward()
                    self._after_backward(model, groups, state)
                    for p in params:
                        p.grad = None
                    n += 1
        if n == 0:
            raise ValueError(f"criterion {self.name!r}: data yielded no batches")
        from ...runs.distributed import active
        use, pg = active(self.distributed)
        if use:
            self._reduce(model, groups, state, pg)
        return state

    # -- hooks for subclasses
    def _start(self, model, groups) -> Any:
        return {}

    @contextmanager
    def _hooks(self, model, groups, state):
        yield

    def _after_backward(self, model, groups, state) -> None:
        pass

    def _reduce(self, model, groups, state, group) -> None:
        """Sum ``state``'s accumulated statistics over the ranks of ``group`` (data-parallel scoring)."""
        raise NotImplementedError(f"criterion {self.name!r} cannot merge its statistics across ranks; pass "
                                  "distributed=False to score each rank's data on its own")
