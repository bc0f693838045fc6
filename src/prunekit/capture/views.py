"""Views of a model with swapped tensors (meta / real) that restore the user's model exactly afterwards."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_map


def _meta_inputs(example_inputs: Any) -> Any:
    """``example_inputs`` (a tensor or any nesting of them) with every tensor replaced by an empty meta one."""
    return tree_map(lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t,
                    example_inputs)


def _swapped_state(model: nn.Module, make: Callable[[str, torch.Tensor], torch.Tensor],
                   by_name: dict[str, nn.Module] | None = None, memo: dict[int, torch.Tensor] | None = None):
    """Replacement tensors for every parameter and buffer of ``model``, made by ``make(kind, tensor)``.

    Returns ``(state, aliases, call_state)``: ``state`` maps ``(kind, fqn)`` of each distinct tensor to
    its replacement, ``aliases`` maps an fqn to the other names of the same tensor (tied weights), and
    ``call_state`` binds every name to the shared replacement for ``_reparametrize_module`` -- each
    (module, attribute) slot only once: a module registered under two names would otherwise be restored
    with the swapped-in tensor.  ``memo`` (if given) receives ``id(original) -> replacement``.
    """
    if by_name is None:
        by_name = dict(model.named_modules(remove_duplicate=False))
    state: dict[tuple[str, str], torch.Tensor] = {}
    aliases: dict[str, list[str]] = {}
    seen: dict[int, str] = {}
    for kind, items in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            if id(t) in seen:
                aliases.setdefault(seen[id(t)], []).append(name)
                continue
            seen[id(t)] = name
            state[(kind, name)] = make(kind, t)
            if memo is not None:
                memo[id(t)] = state[(kind, name)]
    call_state = {}
    slots: set[tuple[int, str]] = set()
    for (_, src), t in state.items():
        for n in [src] + aliases.get(src, []):
            mod_name, _, attr = n.rpartition(".")
            mod = by_name.get(mod_name)
            key = (id(mod if mod is not None else model.get_submodule(mod_name)), attr)
            if key not in slots:
                slots.add(key)
                call_state[n] = t
    return state, aliases, call_state


@contextlib.contextmanager
def meta_view(model: nn.Module):
    """Temporarily swap every parameter and buffer of ``model`` for an empty meta tensor of the same
    shape (tied weights stay tied), and every tensor a module keeps as a plain attribute for a meta one
    too.  Structural work (a dry-run removal, a shape-only capture) can then change the model without a
    deep copy; on exit every module attribute is as it was (see :func:`preserved_modules`)."""
    with tensor_view(model, "meta"):
        yield model


@contextlib.contextmanager
def tensor_view(model: nn.Module, device: str = "meta"):
    """Like :func:`meta_view`; ``device="real"`` swaps in private tensors with the same values instead
    (parameters detached, buffers and plain tensor attributes cloned), for a dry run whose forward needs
    real values.  Removal in the view replaces the swapped-in tensors, never the user's; on exit the
    model holds exactly the objects it held before."""
    from torch.nn.utils.stateless import _reparametrize_module
    if device == "meta":
        make, attr = (lambda kind, t: torch.empty_like(t, device="meta")), _meta_attr
    elif device == "real":
        make, attr = (lambda kind, t: t.detach().clone() if kind == "buffer" else t.detach()), _real_attr
    else:
        raise ValueError(f"tensor_view device must be 'meta' or 'real', got {device!r}")
    memo: dict[int, torch.Tensor] = {}
    _, _, call_state = _swapped_state(model, make, memo=memo)
    with preserved_modules(model, attr, memo), \
            _reparametrize_module(model, call_state, tie_weights=False, strict=False):
        yield model


# keys every nn.Module has in its __dict__ (hooks, the parameter/buffer/module dicts, ``training``): handled apart
_MODULE_KEYS = frozenset(vars(nn.Module()))
_SNAP_DEPTH = 4  # how deep lists/dicts/tuples held by module attributes are followed
_ATOMS = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size})  # hold no tensor


def _meta_attr(t: torch.Tensor) -> torch.Tensor:
    """Meta stand-in for a tensor a module keeps as a plain attribute (anchors, strides, masks, caches).

    A 0-dim tensor is cloned instead: CPU scalars mix with any device, and a forward may read its value."""
    if t.is_meta:
        return t
    return t.detach().clone() if t.dim() == 0 else torch.empty_like(t, device="meta")


def _real_attr(t: torch.Tensor) -> torch.Tensor:
    """Private copy of a plain tensor attribute for a real-tensor capture (in-place updates stay off the model)."""
    return t.detach().clone()


@contextlib.contextmanager
def preserved_modules(model: nn.Module, swap: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      memo: dict[int, torch.Tensor] | None = None):
    """Give every module of ``model`` back exactly as it was on exit, whatever the body ran.

    A forward may cache tensors as plain attributes (ultralytics ``Detect.anchors``, torchvision
    ``AnchorGenerator.cell_anchors``, a list of tensors), create attributes (``self.shape = x.shape``),
    register buffers or submodules, or mutate lists and dicts it holds.  Run on meta or on copies, such
    changes would leave the model broken for its next real forward.  On exit (success or error) each
    module's ``__dict__``, its parameter/buffer/submodule dicts and every list/dict reachable from its
    attributes (``_SNAP_DEPTH`` levels) hold the same objects as before; attributes the body created are
    removed.

    ``swap(t)``: while the body runs, every tensor held by a plain attribute (directly or inside lists,
    tuples and dicts) is replaced by ``swap(t)`` -- e.g. a meta tensor for a meta capture, a clone for a
    real one, so in-place updates never reach the user's tensors.  ``memo`` maps ``id(tensor)`` to an
    existing replacement (the swapped parameters and buffers, so an attribute aliasing a parameter, such
    as ``nn.LSTM._flat_weights``, gets the same replacement); it is filled with new ones."""
    mods = list({id(m): m for m in model.modules()}.values())
    containers: dict[int, tuple[Any, Any]] = {}  # id -> (list/dict/set, shallow copy of its contents)

    def record(v: Any, depth: int) -> None:
        if depth > _SNAP_DEPTH or isinstance(v, (torch.Tensor, nn.Module, str, bytes)):
            return
        if isinstance(v, (list, dict, set)):
            if id(v) in containers:
                return
            containers[id(v)] = (v, type(v)(v) if not isinstance(v, dict) else dict(v))
            for y in (v.values() if isinstance(v, dict) else v):
                if type(y) not in _ATOMS:
                    record(y, depth + 1)
        elif isinstance(v, tuple):
            for y in v:
                if type(y) not in _ATOMS:
                    record(y, depth + 1)

    snaps = []
    for m in mods:
        d = m.__dict__
        attrs = {k: v for k, v in d.items() if k not in _MODULE_KEYS}
        for v in attrs.values():
            if type(v) not in _ATOMS:
                record(v, 0)
        snaps.append((m, attrs, dict(m._parameters), dict(m._buffers), dict(m._modules),
                      set(m._non_persistent_buffers_set)))
    try:
        if swap is not None:
            memo = {} if memo is None else memo
            keep: list = []  # originals stay alive while the body runs, so their ids are not reused
            seen: set[int] = set()

            def sub(v: Any, depth: int) -> Any:
                if type(v) in _ATOMS:
                    return v
                if isinstance(v, torch.Tensor):
                    r = memo.get(id(v))
                    if r is None:
                        r = memo[id(v)] = swap(v)
                        keep.append(v)
                    return r
                if depth > _SNAP_DEPTH or isinstance(v, (nn.Module, str, bytes)):
                    return v
                if isinstance(v, (list, dict)):
                    if id(v) in seen:
                        return v
                    seen.add(id(v))
                    items = v.items() if isinstance(v, dict) else enumerate(v)
                    for k, y in list(items):
                        ny = sub(y, depth + 1)
                        if ny is not y:
                            v[k] = ny  # in place (the snapshot above restores it); keeps shared lists shared
                    return v
                if isinstance(v, tuple) and not isinstance(v, torch.Size):
                    items = [sub(y, depth + 1) for y in v]
                    if all(a is b for a, b in zip(items, v)):
                        return v
                    return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
                return v
            for m, attrs, *_ in snaps:
                for k, v in attrs.items():
                    nv = sub(v, 0)
                    if nv is not v:
                        m.__dict__[k] = nv
        yield model
    finally:
        for obj, items in containers.values():
            if isinstance(obj, list):
                if len(obj) != len(items) or any(a is not b for a, b in zip(obj, items)):
                    obj[:] = items
            elif isinstance(obj, dict):
                if obj.keys() != items.keys() or any(obj[k] is not v for k, v in items.items()):
                    obj.clear()
                    obj.update(items)
            elif obj != items:
                obj.clear()
                obj.update(items)
        for m, attrs, params, bufs, subs, nonpers in snaps:
            d = m.__dict__
            for k in [k for k in d if k not in _MODULE_KEYS and k not in attrs]:
                del d[k]  # created by the body
            for k, v in attrs.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v
            for cur, old in ((m._parameters, params), (m._buffers, bufs), (m._modules, subs)):
                if cur.keys() != old.keys() or any(cur[k] is not v for k, v in old.items()):
                    cur.clear()
                    cur.update(old)
            if m._non_persistent_buffers_set != nonpers:
                m._non_persistent_buffers_set.clear()
                m._non_persistent_buffers_set.update(nonpers)


_MISSING = object()


@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention's fused inference path hides its ops; the slow path is recorded op by op."""
    fast = torch.backends.mha.get_fastpath_enabled() if hasattr(torch.backends, "mha") else None
    if fast is not None:
        torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        if fast is not None:
            torch.backends.mha.set_fastpath_enabled(fast)


def _fc(model: nn.Module, state: dict, run: Callable):
    """Run ``run(model)`` with module tensors temporarily swapped for ``state`` (like functional_call)."""
    from torch.nn.utils.stateless import _reparametrize_module
    with _reparametrize_module(model, state, tie_weights=False, strict=False):
        return run(model)
