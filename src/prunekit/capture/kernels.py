"""The meta-kernel cache: ATen ops replayed on meta tensors, memoised by a signature of their arguments."""
from __future__ import annotations

from typing import Any

import torch

# ops that only read metadata / produce no tensor: skipped entirely
_SKIP = {"sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_local_scalar_dense", "is_same_size",
         "_has_compatible_shallow_copy_type", "set_", "record_stream", "_assert_async", "_assert_tensor_metadata",
         "_functional_assert_async", "resize_", "equal", "is_nonzero"}


# ---- meta fast path: many meta kernels (batch/layer norm, addmm, gelu, softmax) are Python decompositions that
# cost ~1 ms per call.  Output metadata of a functional op depends only on its inputs' metadata, so it is computed
# once per signature and replayed with empty meta tensors afterwards.
_META_CACHE: dict = {}
_META_CACHE_MAX = 20000
_LEAF_OK = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class _OpInfo:
    """Per-ATen-overload facts computed once: names, skip flag, mutated first argument, cacheability."""

    __slots__ = ("name", "packet", "qualname", "argpos", "skip", "inplace0", "cacheable", "returns_self")

    def __init__(self, func):
        sch = func._schema
        self.name = str(func)
        ns, _, bare = sch.name.partition("::")
        self.qualname = sch.name  # "aten::add": the op registry's key (the namespace is part of the identity)
        self.packet = bare if ns == "aten" else f"{ns}.{bare}"  # "add"; "quantized.conv2d" outside aten
        self.argpos = {a.name: i for i, a in enumerate(sch.arguments)}  # shared by every record of the overload
        self.skip = ns == "aten" and bare in _SKIP
        mutated = [i for i, a in enumerate(sch.arguments) if a.alias_info is not None and a.alias_info.is_write]
        self.inplace0 = bool(mutated) and mutated[0] == 0
        # an in-place op that returns its mutated first argument (relu_, hardswish_, add_, mul_): on meta its
        # only effect is the shape check, so a signature that passed once passes again
        rets = sch.returns
        self.returns_self = (self.inplace0 and len(rets) == 1 and rets[0].alias_info is not None
                             and rets[0].alias_info.is_write and not sch.arguments[0].kwarg_only
                             and str(sch.arguments[0].type) == "Tensor"
                             and rets[0].alias_info.before_set == sch.arguments[0].alias_info.before_set
                             and sum(a.alias_info is not None and a.alias_info.is_write for a in sch.arguments) == 1)
        self.cacheable = (not any(a.alias_info is not None for a in sch.arguments)
                          and all(r.alias_info is None and str(r.type) == "Tensor" for r in sch.returns)
                          and len(sch.returns) > 0 and not sch.is_mutable
                          and self.packet not in ("nonzero", "unique", "masked_select", "item"))


_OPINFO: dict = {}


def _op_info(func) -> _OpInfo:
    info = _OPINFO.get(func)
    if info is None:
        info = _OPINFO[func] = _OpInfo(func)
    return info


class _NoKey(Exception):
    pass


def _sig(a: Any, n_tensors: list) -> Any:
    """Hashable metadata signature of one ATen argument (nesting kept: ``[1], [2, 3]`` != ``[1, 2], [3]``)."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "meta":
            raise _NoKey
        n_tensors[0] += 1
        return (a.shape, a.stride(), a.dtype)
    if isinstance(a, (list, tuple)):
        return (len(a), *[_sig(x, n_tensors) for x in a])
    if isinstance(a, _LEAF_OK):
        return (type(a), a)
    raise _NoKey


def _meta_call(func, args, kwargs, info: _OpInfo | None = None):
    """``func(*args, **kwargs)``, replaying cached output metadata when every tensor input is on meta."""
    if info is None:
        info = _op_info(func)
    if not (info.cacheable or info.returns_self):
        return func(*args, **kwargs)
    n_tensors = [0]
    try:
        key = (func, *[_sig(x, n_tensors) for x in args], *[(k, _sig(v, n_tensors)) for k, v in kwargs.items()])
    except _NoKey:
        return func(*args, **kwargs)
    if n_tensors[0] == 0:  # a factory op (arange, zeros, ...): its device is not implied by any input
        return func(*args, **kwargs)
    if info.returns_self:
        if key in _META_CACHE:
            return args[0]
        out = func(*args, **kwargs)
        if out is args[0] and len(_META_CACHE) < _META_CACHE_MAX:
            _META_CACHE[key] = True
        return out
    hit = _META_CACHE.get(key)
    if hit is not None:
        metas, is_tuple = hit
        outs = [torch.empty_strided(sh, st, dtype=dt, device="meta") for sh, st, dt in metas]
        return tuple(outs) if is_tuple else outs[0]
    out = func(*args, **kwargs)
    is_tuple = isinstance(out, tuple)
    oflat = list(out) if is_tuple else [out]
    if all(isinstance(o, torch.Tensor) for o in oflat) and len(_META_CACHE) < _META_CACHE_MAX:
        _META_CACHE[key] = ([(tuple(o.shape), o.stride(), o.dtype) for o in oflat], is_tuple)
    return out
