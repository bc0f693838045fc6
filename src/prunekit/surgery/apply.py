"""Apply a plan: the one slicing routine, physical removal, masking, verification, rollback."""
from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..analysis import spaces as C
from ..analysis.analyzer import unit_indices
from ..verify.check import PruningError, VerificationError, check_finite, compare_outputs, run_outputs
from ..analysis.modules import after_surgery, module_attr  # module_attr: re-exported (prunekit.surgery.module_attr)
from ..analysis.analyzer import module_label
from .blocks import renumber_state_keys, replay_blocks_step

log = logging.getLogger("prunekit.surgery")

Plan = Mapping[int, Iterable[int]]


def normalize_plan(graph, plan: Plan) -> dict[int, torch.Tensor]:
    """Check a plan and return {group id: sorted unit tensor}; raise with a clear message."""
    if not isinstance(plan, Mapping):
        raise TypeError("plan must be a dict {group_id: units_to_drop}")
    res = {}
    for gid, units in plan.items():
        g = graph.group(gid)
        u = torch.as_tensor(sorted(unit_indices(gid, units)), dtype=torch.long)  # ints, each once (or ValueError)
        if u.numel() == 0:
            continue
        if not g.prunable:
            raise PruningError(f"group {gid} ({', '.join(map(module_label, g.modules[:3]))}) is not prunable: {g.reason}")
        if u.min() < 0 or u.max() >= g.size:
            raise PruningError(f"group {gid}: unit indices must be in [0, {g.size}), got {u.tolist()[:8]}")
        if u.numel() >= g.size:
            raise PruningError(f"group {gid}: the plan removes all {g.size} units; keep at least one "
                               "(zero-width layers are not allowed)")
        if g.size - u.numel() < g.min_keep:
            raise PruningError(f"group {gid} ({g.unit}s of {', '.join(map(module_label, g.modules[:2]))}): keep at "
                               f"least {g.min_keep} of {g.size} (each token is routed to {g.min_keep} experts); "
                               f"the plan keeps {g.size - u.numel()}")
        if (g.size - u.numel()) % g.multiple_of:
            raise PruningError(f"group {gid}: the kept units ({g.size - u.numel()}) must be a multiple of "
                               f"{g.multiple_of} ({g.multiple_why}); drop a multiple of {g.multiple_of}")
        res[gid] = u
    return res


def param_drops(graph, plan: dict[int, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """{param fqn: {dim: indices to remove}} in the original model's coordinates."""
    acc: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for gid, u in plan.items():
        for fqn, dim, idx in graph.group(gid).slices(u):
            acc[fqn][dim].append(idx)
    return {f: {d: v[0] if len(v) == 1 else torch.unique(torch.cat(v)) for d, v in dims.items()}
            for f, dims in acc.items()}


def slice_tensor(t: torch.Tensor, dims: Mapping[int, torch.Tensor], mode: str = "remove") -> torch.Tensor:
    """The one slicing routine: remove (``mode="remove"``) or zero (``"mask"``) indices along dims."""
    if mode == "remove" and t.is_meta:  # no data: only the shape changes (the dry run slices meta views)
        shape = list(t.shape)
        for d, idx in dims.items():
            shape[d] -= len(set(idx.tolist()))
        return torch.empty(shape, dtype=t.dtype, device="meta")
    out = t.detach()
    if mode == "mask":
        out = out.clone()
    for d, idx in dims.items():
        idx = idx.cpu()
        if mode == "remove":
            keep = torch.ones(out.shape[d], dtype=torch.bool)
            keep[idx] = False
            out = out.index_select(d, keep.nonzero().flatten().to(t.device))
        else:
            out.index_fill_(d, idx.to(t.device), 0)
    return out


def _aliases(graph) -> dict[str, list[str]]:
    return graph.tape.param_aliases


def _masked_state(model: nn.Module, graph, drops) -> dict[str, torch.Tensor]:
    state = {}
    for fqn, dims in drops.items():
        mod, attr = module_attr(model, fqn)
        t = getattr(mod, attr)
        m = slice_tensor(t, dims, "mask")
        state[fqn] = m
        for a in _aliases(graph).get(fqn, []):
            state[a] = m
    return state


def _sync_rnn_flat_weights(mod: nn.Module, attr: str, t: torch.Tensor) -> None:
    """nn.RNN/LSTM/GRU run on ``_flat_weights``, a list of their parameters kept by ``__setattr__``; a
    parameter replaced in ``_parameters`` must be replaced there too."""
    names = getattr(mod, "_flat_weights_names", None)
    if names and attr in names:
        mod._flat_weights[names.index(attr)] = t


class _Undo:
    def __init__(self):
        self.items: list[tuple] = []

    def set_tensor(self, mod: nn.Module, attr: str, new: torch.Tensor) -> None:
        if attr in mod._parameters:
            old = mod._parameters[attr]
            self.items.append(("p", mod, attr, old))
            mod._parameters[attr] = new
            _sync_rnn_flat_weights(mod, attr, new)
        else:
            old = mod._buffers[attr]
            self.items.append(("b", mod, attr, old))
            mod._buffers[attr] = new

    def set_attr(self, mod: nn.Module, attr: str, value: Any) -> None:
        self.items.append(("a", mod, attr, getattr(mod, attr)))
        setattr(mod, attr, value)

    def rollback(self) -> None:
        for kind, mod, attr, old in reversed(self.items):
            if kind == "p":
                mod._parameters[attr] = old
                _sync_rnn_flat_weights(mod, attr, old)
            elif kind == "b":
                mod._buffers[attr] = old
            elif kind == "m":  # a container's children (depth surgery, surgery/blocks.py)
                mod._modules = old
            else:
                setattr(mod, attr, old)
        self.items.clear()


def _binding_value(b, drops_leaf: dict[int, int], current: Any):
    if b.layouts is None:
        return b.default
    if isinstance(b.layouts, list):
        return type(current)(C.kept_size(l, drops_leaf) for l in b.layouts) if isinstance(current, (tuple, list)) \
            else tuple(C.kept_size(l, drops_leaf) for l in b.layouts)
    return C.kept_size(b.layouts, drops_leaf)


def _replace_sliced(mod: nn.Module, attr: str, old: torch.Tensor, dims, replaced: dict, undo: _Undo) -> None:
    """Put the sliced ``old`` into ``mod.attr`` (one new tensor per old tensor, so tied weights stay tied)."""
    if id(old) not in replaced:
        new = slice_tensor(old, dims, "remove")
        if isinstance(old, nn.Parameter):
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        replaced[id(old)] = new
    undo.set_tensor(mod, attr, replaced[id(old)])


def remove(model: nn.Module, graph, plan: dict[int, torch.Tensor], undo: _Undo) -> None:
    """Physically remove the plan's units from ``model`` (in place), recording undo steps."""
    drops = param_drops(graph, plan)
    replaced: dict[int, torch.Tensor] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for fqn, dims in drops.items():
        for name in [fqn] + _aliases(graph).get(fqn, []):
            mod, attr = module_attr(model, name, modules)
            old = getattr(mod, attr)
            _replace_sliced(mod, attr, old, dims, replaced, undo)
    drops_leaf = graph.drops_by_leaf({g: u.tolist() for g, u in plan.items()})
    for b in graph.bindings:
        mod = modules.get(b.module)
        if mod is None:
            continue
        if not hasattr(mod, b.attr):
            continue
        cur = getattr(mod, b.attr)
        if isinstance(cur, bool) or not isinstance(cur, (int, tuple, list)):
            continue
        val = _binding_value(b, drops_leaf, cur)
        if val is not None and val != cur:
            undo.set_attr(mod, b.attr, val)
            log.debug("%s.%s: %s -> %s", b.module, b.attr, cur, val)
    # derived attributes that are not a plain size (ModuleSpec.after_surgery: MultiheadAttention.head_dim, PReLU)
    sliced: dict[str, set[str]] = defaultdict(set)
    for fqn in drops:
        for name in [fqn] + _aliases(graph).get(fqn, []):
            owner, _, attr = name.rpartition(".")
            sliced[owner].add(attr)
    for name, mod in modules.items():
        for attr, val in after_surgery(mod, frozenset(sliced.get(name, ()))).items():
            if getattr(mod, attr, None) != val:
                undo.set_attr(mod, attr, val)


@contextlib.contextmanager
def trial(model: nn.Module, graph, plan: dict[int, torch.Tensor]):
    """Remove ``plan``'s units from ``model`` (usually a meta or private-copy view of it), and roll every
    tensor and attribute change back on exit: the dry run's and the scale probe's step."""
    undo = _Undo()
    try:
        remove(model, graph, plan, undo)
        yield model
    finally:
        undo.rollback()


def check_graph(model: nn.Module, graph) -> None:
    """Refuse a graph that does not describe ``model`` as it is now (pruned since, or another object)."""
    if graph.stale:
        raise PruningError("this graph was already used to prune the model; call pk.analyze() again on the "
                           "pruned model before pruning further")
    if graph.model_ref is not model:
        raise PruningError("the graph was built from a different model object; analyze this model first")


def _add_biases(model: nn.Module, biases: Mapping[str, torch.Tensor], config: Mapping[str, Any], undo: _Undo
                ) -> dict[str, Any]:
    """Add ``biases[name]`` to module ``name``'s bias (creating the parameter where it is None) and set the
    config values ``{"<i>.<attr>": value}`` (i indexes model.config / its text config); returns the record entry."""
    from .blocks import _configs
    sizes = {}
    for name, delta in biases.items():
        mod = model.get_submodule(name)
        w = getattr(mod, "weight", None)
        if "bias" not in mod._parameters or not isinstance(w, torch.Tensor):
            raise PruningError(f"{name} ({type(mod).__name__}) has no bias slot to compensate into")
        old = mod._parameters["bias"]
        n = old.shape[0] if old is not None else w.shape[0]
        if delta.shape != (n,):
            raise PruningError(f"{name}: bias compensation of shape {tuple(delta.shape)} for {n} output channels")
        base = old.detach() if old is not None else torch.zeros(n, dtype=w.dtype, device=w.device)
        new = nn.Parameter(base + delta.to(dtype=base.dtype, device=base.device), requires_grad=w.requires_grad)
        undo.set_tensor(mod, "bias", new)
        sizes[name] = int(n)
    cfgs = _configs(model)
    for key, val in config.items():
        i, _, attr = key.partition(".")
        if int(i) < len(cfgs):
            undo.set_attr(cfgs[int(i)], attr, val)
    return {"modules": sizes, "config": dict(config)}


def _replay_biases(model: nn.Module, entry: Mapping[str, Any], undo: _Undo, k: int) -> None:
    """A record's ``biases`` entry on a freshly built model: zero biases where the pruned model gained one
    (their values come with the state dict) and the config values set with them."""
    zeros = {}
    for name, n in entry.get("modules", {}).items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise PruningError(f"pruning record step {k}: the model has no module {name!r}") from None
        if mod._parameters.get("bias") is None:
            zeros[name] = torch.zeros(int(n), dtype=mod.weight.dtype, device=mod.weight.device)
    _add_biases(model, zeros, entry.get("config", {}), undo)


def prune(model: nn.Module, graph, plan: Plan, *, verify: bool = True, rtol: float = 1e-3,
          atol: float = 1e-4, biases: Mapping[str, torch.Tensor] | None = None,
          config: Mapping[str, Any] | None = None) -> nn.Module:
    """Remove ``plan``'s units from ``model`` in place and return it.

    With ``verify=True`` the example input is run again: the output shapes must be unchanged, and
    for exact groups the pruned output must match the original with those units zeroed.  On any
    failure the model is restored and :class:`VerificationError` explains why.

    ``biases`` (``{module name: vector}``, in the pruned model's output coordinates) are added to those
    modules' biases after the removal -- a bias parameter is created where the module has none -- and
    ``config`` values (``{"0.attention_bias": True}``: index into model.config / its text config) are set
    with them: bias compensation (``pk.Pruner(bias_compensation=True)``).  Verification compares the removed
    model with the masked original *before* the biases are added (the removal itself is exact), then checks
    shapes and finiteness with them; the record remembers the new biases so ``pk.load`` rebuilds them.
    """
    check_graph(model, graph)
    norm = normalize_plan(graph, plan)
    if not norm:
        return model
    exact = {g: u for g, u in norm.items() if graph.group(g).exact}
    inexact = {g: u for g, u in norm.items() if not graph.group(g).exact}
    undo = _Undo()
    try:
        if verify:
            if exact:
                ref = run_outputs(model, graph, _masked_state(model, graph, param_drops(graph, exact)))
            else:
                ref = run_outputs(model, graph)
        # stage 1: exact groups (compared with the masked original); stage 2: the rest (shape checks)
        remove(model, graph, norm, undo)
        if verify:
            if inexact and exact:
                # verify exact groups alone on a second pass: undo the inexact part by re-running stage-wise
                undo.rollback()
                remove(model, graph, exact, undo)
                out = run_outputs(model, graph)
                msg = compare_outputs(ref, out, rtol, atol, graph.prune_outputs)
                if msg:
                    raise VerificationError(f"pruned model does not match the masked original: {msg}")
                undo.rollback()
                remove(model, graph, norm, undo)
                out = run_outputs(model, graph)
                msg = compare_outputs(ref, out, float("inf"), float("inf"), graph.prune_outputs)
            else:
                out = run_outputs(model, graph)
                msg = compare_outputs(ref, out, rtol, atol, graph.prune_outputs) if exact else \
                    compare_outputs(ref, out, float("inf"), float("inf"), graph.prune_outputs)
            if msg:
                raise VerificationError(f"pruned model failed verification: {msg}")
            check_finite(ref, out)
        extra = {"biases": _add_biases(model, biases or {}, config or {}, undo)} if biases or config else None
        if verify and extra:
            out = run_outputs(model, graph)
            msg = compare_outputs(ref, out, float("inf"), float("inf"), graph.prune_outputs)
            if msg:
                raise VerificationError(f"bias-compensated model failed verification: {msg}")
            check_finite(ref, out)
    except VerificationError as e:
        undo.rollback()
        groups = ", ".join(str(g) for g in list(norm)[:10])
        raise VerificationError(f"{e}. Groups in the plan: {groups}. The model was restored unchanged. "
                                "This usually means the model's forward hard-codes a size; exclude those "
                                "groups or report the model.") from None
    except Exception as e:
        undo.rollback()
        raise PruningError(f"pruning failed and the model was restored: {type(e).__name__}: {e}") from e
    _append_record(model, graph, norm, undo, extra)
    graph.stale = True
    run_post_prune_hooks(model)
    return model


def pruned_copy(model: nn.Module, graph, plan: Plan, *, verify: bool = True) -> nn.Module:
    """A pruned deep copy of ``model`` (which ``graph`` was built from); ``model`` and ``graph`` stay usable.

    The copy has the same structure, so the analysis is reused instead of re-capturing the model: the way
    candidates are built for latency targets and adaptive search.
    """
    import copy
    check_graph(model, graph)
    trial = copy.deepcopy(model)
    ref, stale = graph.model_ref, graph.stale
    try:
        graph.model_ref = trial
        graph.stale = False
        prune(trial, graph, plan, verify=verify)
    finally:
        graph.model_ref, graph.stale = ref, stale
    return trial


# ---------------------------------------------------------------- post-prune hooks
_POST_PRUNE_HOOKS: list = []


def register_post_prune_hook(fn) -> Any:
    """Call ``fn(model)`` after every successful :func:`prune` and :func:`replay_record` (once per function).

    For bookkeeping that follows the modules, kept outside the core: e.g. ``prunekit.hf`` updates a
    transformers model's ``config`` so it says what the modules became.  A hook that raises is logged as a
    warning: the pruned model is already verified and stays pruned."""
    if fn not in _POST_PRUNE_HOOKS:
        _POST_PRUNE_HOOKS.append(fn)
    return fn


def unregister_post_prune_hook(fn) -> None:
    if fn in _POST_PRUNE_HOOKS:
        _POST_PRUNE_HOOKS.remove(fn)


def run_post_prune_hooks(model: nn.Module) -> None:
    for fn in list(_POST_PRUNE_HOOKS):
        try:
            fn(model)
        except Exception as e:  # the prune itself succeeded and was verified
            log.warning("post-prune hook %s failed on %s: %s: %s", getattr(fn, "__qualname__", fn),
                        type(model).__name__, type(e).__name__, e)


# ---------------------------------------------------------------- pruning record
RECORD_ATTR = "_prunekit_record"


def _append_record(model: nn.Module, graph, plan: dict[int, torch.Tensor], undo: _Undo,
                   extra: Mapping[str, Any] | None = None) -> None:
    """Remember what :func:`prune` removed, so the pruned architecture can be rebuilt from the original code.

    One step per ``pk.prune`` call: removed indices per parameter/buffer (with its shape before) in that
    step's coordinates, and the new values of every module attribute that changed.
    """
    drops = param_drops(graph, plan)
    shapes = {nd.name: list(nd.shape) for nd in graph.tape.nodes if nd.kind in ("param", "buffer")}
    params = {}
    for fqn, dims in drops.items():
        for name in [fqn] + _aliases(graph).get(fqn, []):
            params[name] = {"shape": shapes.get(fqn), "remove": {int(d): idx.tolist() for d, idx in dims.items()}}
    attrs = {}
    names = {id(m): n for n, m in model.named_modules()}
    for kind, mod, attr, _old in undo.items:
        if kind == "a" and id(mod) in names:
            val = getattr(mod, attr)
            attrs[f"{names[id(mod)]}.{attr}" if names[id(mod)] else attr] = list(val) if isinstance(val, tuple) else val
    step = {"groups": {int(g): u.tolist() for g, u in plan.items()}, "params": params, "attrs": attrs}
    if extra:
        step.update(extra)
    rec = getattr(model, RECORD_ATTR, None)
    if rec is None:
        rec = []
        object.__setattr__(model, RECORD_ATTR, rec)
    rec.append(step)


# ---------------------------------------------------------------- soft pruning
MASKS_ATTR = "_prunekit_masks"  # where pk.mask keeps its masks on the model (io and training read it)
_MASKS = MASKS_ATTR


def _like(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The full (global-shape) mask ``m`` laid out like ``t``: sliced to ``t``'s placements when ``t`` is a DTensor
    (FSDP2-sharded parameter; each rank slices its own part, no communication)."""
    if hasattr(t, "device_mesh") and hasattr(t, "placements"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(m.to(t.to_local().device), t.device_mesh, t.placements, src_data_rank=None)
    return m


def mask(model: nn.Module, graph, plan: Plan) -> nn.Module:
    """Soft pruning: zero the plan's units in place and remember them (see :func:`apply_masks`).

    Masks are kept as full tensors of the parameters' global shape; on FSDP2-sharded parameters (DTensors) each
    rank applies its slice."""
    check_graph(model, graph)
    norm = normalize_plan(graph, plan)
    drops = param_drops(graph, norm)
    store = getattr(model, _MASKS, None)
    if store is None:
        store = {}
        object.__setattr__(model, _MASKS, store)
    with torch.no_grad():
        for fqn, dims in drops.items():
            mod, attr = module_attr(model, fqn)
            t = getattr(mod, attr)
            dev = t.to_local().device if hasattr(t, "to_local") else t.device
            m = torch.ones(t.shape, dtype=torch.bool, device=dev)
            for d, idx in dims.items():
                m.index_fill_(d, idx.to(dev), False)
            if fqn in store:  # remember the values of newly masked entries as they are now
                newly = store[fqn]["mask"] & ~m
                store[fqn]["orig"] = torch.where(_like(newly, t), t.detach(), store[fqn]["orig"])
                store[fqn]["mask"] &= m
            else:
                store[fqn] = {"mask": m, "orig": t.detach().clone()}
            t.mul_(_like(store[fqn]["mask"], t))
    return model


def apply_masks(model: nn.Module) -> nn.Module:
    """Re-zero masked units (call after ``optimizer.step()``)."""
    store = getattr(model, _MASKS, {})
    with torch.no_grad():
        for fqn, s in store.items():
            mod, attr = module_attr(model, fqn)
            t = getattr(mod, attr)
            t.mul_(_like(s["mask"], t))
    return model


def unmask(model: nn.Module) -> nn.Module:
    """Remove masks and restore the masked entries' original values."""
    store = getattr(model, _MASKS, {})
    with torch.no_grad():
        for fqn, s in store.items():
            mod, attr = module_attr(model, fqn)
            t = getattr(mod, attr)
            t.copy_(torch.where(_like(s["mask"], t), t, s["orig"]))
    if hasattr(model, _MASKS):
        object.__delattr__(model, _MASKS)
    return model


def _step_tensors(step: Mapping) -> dict[str, dict[int, torch.Tensor]]:
    return {fqn: {int(d): torch.as_tensor(idx, dtype=torch.long) for d, idx in info["remove"].items()}
            for fqn, info in step["params"].items()}


def replay_record(model: nn.Module, record: list[Mapping]) -> nn.Module:
    """Apply a pruning record (``model._prunekit_record``, or the one saved by ``pk.save``) to a freshly
    built original model: slice every recorded parameter/buffer and set every recorded attribute.

    The model is checked against each step's recorded shapes first; on any mismatch nothing is changed and
    :class:`PruningError` names the tensor (usually: the record belongs to another model or config).
    """
    undo = _Undo()
    try:
        for k, step in enumerate(record):
            if "blocks" in step:  # whole blocks removed (surgery/blocks.py)
                replay_blocks_step(model, step, undo, k)
                continue
            replaced: dict[int, torch.Tensor] = {}
            for fqn, dims in _step_tensors(step).items():
                try:
                    mod, attr = module_attr(model, fqn)
                    old = getattr(mod, attr)
                except AttributeError:
                    raise PruningError(f"pruning record step {k}: the model has no parameter/buffer {fqn!r}; "
                                       "the record was made for a different model") from None
                want = step["params"][fqn].get("shape")
                if id(old) not in replaced and want is not None and list(old.shape) != list(want):
                    raise PruningError(f"pruning record step {k}: {fqn} has shape {tuple(old.shape)} but the record "
                                       f"expects {tuple(want)}; the record was made for a different model or config")
                _replace_sliced(mod, attr, old, dims, replaced, undo)
            for key, val in step.get("attrs", {}).items():
                mod_name = key.rpartition(".")[0]
                try:
                    mod, attr = module_attr(model, key)
                except AttributeError:
                    raise PruningError(f"pruning record step {k}: the model has no module {mod_name!r}; "
                                       "the record was made for a different model") from None
                cur = getattr(mod, attr, None)
                undo.set_attr(mod, attr, tuple(val) if isinstance(cur, tuple) and isinstance(val, list) else val)
            if "biases" in step:  # bias compensation (prune(..., biases=...))
                _replay_biases(model, step["biases"], undo, k)
    except BaseException:
        undo.rollback()
        raise
    rec = getattr(model, RECORD_ATTR, None)
    if rec is None:
        rec = []
        object.__setattr__(model, RECORD_ATTR, rec)
    rec.extend(record)
    run_post_prune_hooks(model)
    return model


def slice_state_dict(state: Mapping[str, torch.Tensor], record: list[Mapping]) -> dict[str, torch.Tensor]:
    """Slice a state dict of the original model (e.g. initial weights for lottery-ticket rewinding) the way
    ``record`` pruned the model; keys the record does not mention are returned unchanged."""
    out = dict(state)
    for step in record:
        if "blocks" in step:
            out = renumber_state_keys(out, step)
            continue
        for fqn, dims in _step_tensors(step).items():
            if fqn in out:
                out[fqn] = slice_tensor(out[fqn], dims, "remove")
    return out
