"""Capture a model into an ATen-level tape.

One forward pass runs under a ``TorchDispatchMode``; every ATen op call is recorded with the
node ids of its tensor inputs and outputs and the module that was executing.  Parameters and
buffers are recognised by identity and mapped to their fully-qualified names.  By default the
pass runs on the ``meta`` device (no weight memory); models whose forward needs real values
fall back to a real-tensor pass with cloned buffers, so the user's model is never changed.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

log = logging.getLogger("prunekit.capture")


@dataclass
class TNode:
    """A tensor value in the tape."""

    id: int
    shape: tuple[int, ...]
    kind: str  # "input" | "param" | "buffer" | "op" | "const"
    name: str | None = None  # fqn for params/buffers, input path for inputs
    dtype: torch.dtype | None = None


@dataclass
class OpRecord:
    """One ATen call: ``func(*args, **kwargs)`` with tensors replaced by node ids."""

    index: int
    name: str  # e.g. "aten.add.Tensor"
    packet: str  # e.g. "add"
    args: tuple
    kwargs: dict
    outputs: list  # output structure with TRef / None
    module: str  # fqn of the innermost executing module ("" = root)
    inplace_of: int | None = None  # node id of the mutated input, if in-place
    _ins: list | None = field(default=None, repr=False, compare=False)
    _outs: list | None = field(default=None, repr=False, compare=False)
    qualname: str = ""  # the op's namespace-qualified name, e.g. "aten::add": its key in the op registry
    argpos: dict | None = field(default=None, repr=False, compare=False)  # schema argument name -> position

    def arg(self, name: str, default: Any = None) -> Any:
        """The argument called ``name`` in the op's schema (``op.arg("groups")``), positional or keyword;
        ``default`` when the call did not pass it (or the overload has no such argument)."""
        pos = self.argpos.get(name) if self.argpos is not None else None
        if pos is not None and pos < len(self.args):
            return self.args[pos]
        return self.kwargs.get(name, default)

    def inputs(self) -> list["TRef"]:
        if self._ins is None:
            self._ins = _collect_refs((self.args, tuple(self.kwargs.values())), [])
        return self._ins

    def outs(self) -> list["TRef"]:
        if self._outs is None:
            self._outs = _collect_refs(self.outputs, [])
        return self._outs


def _collect_refs(x: Any, acc: list) -> list:
    """The TRefs inside a recorded argument/output structure (lists, tuples and dicts), in order."""
    if isinstance(x, TRef):
        acc.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _collect_refs(y, acc)
    elif isinstance(x, dict):
        for y in x.values():
            _collect_refs(y, acc)
    return acc


@dataclass(frozen=True)
class TRef:
    """Reference to a tape tensor node inside recorded args."""

    id: int


@dataclass
class Tape:
    nodes: list[TNode] = field(default_factory=list)
    ops: list[OpRecord] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    output_paths: list[str] = field(default_factory=list)
    param_aliases: dict[str, list[str]] = field(default_factory=dict)  # fqn -> other names (tied)
    device: str = "meta"
    modules: dict[str, str] = field(default_factory=dict)  # fqn -> class name

    def node(self, ref: TRef | int) -> TNode:
        return self.nodes[ref.id if isinstance(ref, TRef) else ref]


class CaptureError(RuntimeError):
    """The model could not be run on the example input."""


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


class _Recorder(TorchDispatchMode):
    def __init__(self, tape: Tape, stack: list[str], keep: list):
        super().__init__()
        self.tape = tape
        self.ids: dict[int, int] = {}  # id(tensor) -> node id; ``keep`` holds the tensors, so ids are not reused
        self.stack = stack
        self.keep = keep

    def node_of(self, t: Any) -> int | None:
        return self.ids.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _new(self, t: torch.Tensor, kind: str, name: str | None = None) -> int:
        nodes = self.tape.nodes
        nid = len(nodes)
        nodes.append(TNode(nid, tuple(t.shape), kind, name, t.dtype))
        self.ids[id(t)] = nid
        self.keep.append(t)
        return nid

    def _ref(self, x: Any, ins: list) -> Any:
        if isinstance(x, torch.Tensor):
            nid = self.ids.get(id(x))
            if nid is None:
                nid = self._new(x, "const", None)
            r = TRef(nid)
            ins.append(r)
            return r
        if isinstance(x, (list, tuple)):
            return (list if isinstance(x, list) else tuple)(self._ref(y, ins) for y in x)
        return x

    def _out(self, o: Any, outs: list) -> Any:
        if isinstance(o, torch.Tensor):
            r = TRef(self._new(o, "op"))
            outs.append(r)
            return r
        if isinstance(o, (list, tuple)):
            return (list if isinstance(o, list) else tuple)(self._out(y, outs) for y in o)
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        info = _OPINFO.get(func) or _op_info(func)
        out = _meta_call(func, args, kwargs, info)
        if info.skip:
            return out
        ins: list = []
        rargs = tuple([self._ref(a, ins) for a in args])
        rkwargs = {k: self._ref(v, ins) for k, v in kwargs.items()} if kwargs else {}
        inplace_of = rargs[0].id if info.inplace0 and rargs and isinstance(rargs[0], TRef) else None
        outs: list = []
        routs = self._out(out, outs)
        if routs is None:
            routs = []
        tape = self.tape
        tape.ops.append(OpRecord(len(tape.ops), info.name, info.packet, rargs, rkwargs, routs,
                                 self.stack[-1] if self.stack else "", inplace_of, ins, outs, info.qualname,
                                 info.argpos))
        return out


# the capture's markers (ops of the ``prunekit`` namespace) and their argument names
_SDPA_SCALE_ARGS = {"query": 0, "scale": 1}
_MHA_ARGS = {"query": 0, "in_proj_weight": 1, "packed": 2}


class _SDPAMarker(torch.overrides.TorchFunctionMode):
    """Marks calls of F.scaled_dot_product_attention so the default 1/sqrt(E) scale is known."""

    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            q = args[0] if args else kwargs.get("query")
            scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
            nid = self.rec.node_of(q)
            if nid is not None:
                tape = self.rec.tape
                tape.ops.append(OpRecord(len(tape.ops), "prunekit.sdpa_scale", "prunekit.sdpa_scale",
                                         (TRef(nid), scale), {}, [],
                                         self.rec.stack[-1] if self.rec.stack else "",
                                         qualname="prunekit::sdpa_scale", argpos=_SDPA_SCALE_ARGS))
        return func(*args, **kwargs)


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        raise ValueError("example_inputs is required: pass a tensor, a tuple of inputs, or a dict of keyword "
                         "inputs that the model's forward accepts (e.g. torch.randn(1, 3, 224, 224))")
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def call_model(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None):
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    args, kwargs = normalize_inputs(example_inputs)
    return model(*args, **kwargs)


# fields a transformers ``ModelOutput`` returns without being asked for, beside the main output: the encoder's last
# hidden state of an encoder-decoder model (the logits depend on it) and the KV cache.  They are not model outputs for
# prunekit (not pinned, not compared by verification).  Fields a user asks for (``output_hidden_states=True``,
# ``output_attentions=True``) and the main outputs (logits, last_hidden_state, pooler_output, loss) stay outputs; a
# forward_fn returning a field makes it an output again.
HF_AUXILIARY_OUTPUTS = frozenset({"encoder_last_hidden_state", "past_key_values"})


def _is_hf_model_output(x: Any) -> bool:
    return any(c.__name__ == "ModelOutput" and c.__module__.startswith("transformers.") for c in type(x).__mro__)


def flatten_outputs(out: Any) -> tuple[list[torch.Tensor], list[str]]:
    """Flatten a model output (tensor, tuple, dict, dataclass-like) into tensors with paths.  Of a transformers
    ``ModelOutput``, the auxiliary fields in :data:`HF_AUXILIARY_OUTPUTS` are left out."""
    res: list[torch.Tensor] = []
    paths: list[str] = []

    def rec(x, path):
        if isinstance(x, torch.Tensor):
            res.append(x)
            paths.append(path or "output")
        elif isinstance(x, dict):
            skip = HF_AUXILIARY_OUTPUTS if _is_hf_model_output(x) else ()
            for k, v in x.items():
                if k not in skip:
                    rec(v, f"{path}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                rec(v, f"{path}[{i}]")
        elif hasattr(x, "to_tuple"):
            rec(x.to_tuple(), path)
    rec(out, "")
    return res, paths


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Temporarily put every submodule in eval mode, restoring each flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, f in flags:
            m.training = f


@contextlib.contextmanager
def module_stack_hooks(names: dict[int, str], stack: list[str]):
    """Keep ``stack`` = fqns of the executing modules of one model (``names``: id(module) -> fqn).

    Two global module hooks instead of two hooks per module: registering and removing ~2 hooks per
    module on every capture cost more than the forward itself on meta."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    def pre(m, a):
        n = names.get(id(m))
        if n is not None:
            stack.append(n)

    def post(m, a, o):
        n = names.get(id(m))
        if n is not None and stack and stack[-1] == n:
            stack.pop()
    handles = [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def capture(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None,
            device: str = "auto") -> Tape:
    """Record one forward pass of ``model`` as an ATen tape.

    ``device``: "meta" (no weight memory), "real" (use the model's own tensors) or "auto" (meta
    first, real if the forward needs real values).  The model is never modified.
    """
    if device not in ("auto", "meta", "real"):
        raise ValueError(f"capture device must be 'auto', 'meta' or 'real', got {device!r}")
    on_meta = _model_device(model).type == "meta"
    attempts = ["meta"] if (device == "meta" or on_meta) else (["real"] if device == "real" else ["meta", "real"])
    last_err: Exception | None = None
    for mode in attempts:
        try:
            return _capture_once(model, example_inputs, forward_fn, mode)
        except CaptureError:
            raise
        except Exception as e:  # noqa: BLE001 - fall back to the next mode, re-raised below
            last_err = e
            log.debug("capture on %s failed: %s", mode, e)
    raise CaptureError(f"running the model on the example input failed: {type(last_err).__name__}: {last_err}. "
                       "Check that example_inputs has the shape/dtype the model's forward expects "
                       "(or pass forward_fn=lambda model, inputs: ... for custom calling).") from last_err


def _capture_once(model: nn.Module, example_inputs: Any, forward_fn: Callable | None, mode: str) -> Tape:
    tape = Tape(device=mode)
    stack: list[str] = []
    keep: list = []
    rec = _Recorder(tape, stack, keep)
    named = list(model.named_modules())
    tape.modules = {n: type(m).__name__ for n, m in named}
    names = {id(m): n for n, m in named}
    by_name = dict(model.named_modules(remove_duplicate=False))

    # state tensors by identity (tied weights appear once, aliases remembered)
    def swap(kind, t):
        if mode == "meta":
            return t if t.is_meta else torch.empty_like(t, device="meta")
        return t.clone() if kind == "buffer" else t.detach()
    memo: dict[int, torch.Tensor] = {}
    state, aliases, call_state = _swapped_state(model, swap, by_name, memo)
    tape.param_aliases = aliases
    for (kind, name), t in state.items():
        rec._new(t, kind, name)

    inputs = _meta_inputs(example_inputs) if mode == "meta" else example_inputs
    in_flat, _ = tree_flatten(inputs)
    for i, t in enumerate(x for x in in_flat if isinstance(x, torch.Tensor)):
        tape.inputs.append(rec._new(t, "input", f"input[{i}]"))

    def run(m):
        return call_model(m, inputs, forward_fn)

    mha_handles = []
    for mname, mod in named:
        if isinstance(mod, nn.MultiheadAttention):
            def mha_hook(m, args, kwargs, output, _n=mname):
                q = args[0] if args else kwargs.get("query")
                w = m.in_proj_weight if m._qkv_same_embed_dim else m.q_proj_weight  # the swapped-in tensor
                qn, wn = rec.node_of(q), rec.node_of(w)
                if qn is not None and wn is not None:
                    tape.ops.append(OpRecord(len(tape.ops), "prunekit.mha_constraint", "prunekit.mha_constraint",
                                             (TRef(qn), TRef(wn), m._qkv_same_embed_dim), {}, [], _n,
                                             qualname="prunekit::mha_constraint", argpos=_MHA_ARGS))
            mha_handles.append(mod.register_forward_hook(mha_hook, with_kwargs=True))
    # plain tensor attributes are swapped like buffers, and whatever the forward caches on the modules is undone
    guard = preserved_modules(model, _meta_attr if mode == "meta" else _real_attr, memo)
    with guard, eval_mode(model), torch.no_grad(), module_stack_hooks(names, stack), _no_mha_fastpath():
        try:
            with _SDPAMarker(rec), rec:
                out = _fc(model, call_state, run)
        finally:
            for h in mha_handles:
                h.remove()
    outs, paths = flatten_outputs(out)
    for t, p in zip(outs, paths):
        nid = rec.node_of(t)
        if nid is not None:
            tape.outputs.append(nid)
            tape.output_paths.append(p)
    if not tape.outputs:
        raise CaptureError("the model returned no tensor output on the example input")
    return tape


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


def _out_shapes(o: Any, acc: list) -> list:
    if isinstance(o, torch.Tensor):
        acc.append(tuple(o.shape))
    elif isinstance(o, (list, tuple)):
        for y in o:
            _out_shapes(y, acc)
    return acc


class _ShapeTrace(TorchDispatchMode):
    """Records only (op name, output shapes) of each ATen call: the dry run's cheap re-capture; with
    ``scalars=True`` (op name, the Python numbers among its arguments) instead: the scale probe."""

    def __init__(self, scalars: bool = False):
        super().__init__()
        self.scalars = scalars
        self.ops: list[tuple[str, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        info = _OPINFO.get(func) or _op_info(func)
        out = _meta_call(func, args, kwargs, info)
        if not info.skip:
            if self.scalars:
                flat, _ = tree_flatten((args, kwargs))
                self.ops.append((info.name, [float(a) for a in flat
                                             if isinstance(a, (int, float)) and not isinstance(a, bool)]))
            else:
                self.ops.append((info.name, _out_shapes(out, [])))
        return out


class _SDPAScales(torch.overrides.TorchFunctionMode):
    """Records the ``scale`` argument of each ``F.scaled_dot_product_attention`` call (None: the default)."""

    def __init__(self):
        super().__init__()
        self.scales: list[list] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            sc = kwargs.get("scale", args[6] if len(args) > 6 else None)
            self.scales.append([float(sc) if isinstance(sc, (int, float)) else None])
        return func(*args, **kwargs)


def trace_scalars(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None):
    """One forward (on meta inputs) of a model whose tensors live on meta: ``(ops, sdpa_scales)`` with
    ``ops`` = ``[(ATen op name, Python numbers among its arguments), ...]`` (the ops :func:`trace_shapes`
    lists) and the ``scale`` of each ``F.scaled_dot_product_attention`` call, as one-element lists."""
    tr, sdpa = _ShapeTrace(scalars=True), _SDPAScales()
    inputs = _meta_inputs(example_inputs)  # outside the trace: making them is not an op of the model
    with preserved_modules(model), eval_mode(model), torch.no_grad(), _no_mha_fastpath(), sdpa, tr:
        call_model(model, inputs, forward_fn)
    return tr.ops, sdpa.scales


def trace_shapes(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None, meta: bool = True):
    """ATen op names and output shapes of one forward of a model whose tensors live on meta
    (``meta=False``: of a model with real tensors, run on the real example inputs).

    Returns ``(ops, output_shapes)`` with ``ops`` = ``[(name, [shape, ...]), ...]`` in call order (the
    same ATen ops :func:`capture` records, without its ``prunekit.*`` markers).  If the forward raises,
    the exception carries ``prunekit_ops_recorded`` = the number of ops traced before the failing one.
    Whatever the forward caches on the modules is undone afterwards (:func:`preserved_modules`).
    """
    tr = _ShapeTrace()
    inputs = _meta_inputs(example_inputs) if meta else example_inputs
    with preserved_modules(model), eval_mode(model), torch.no_grad(), _no_mha_fastpath(), tr:
        try:
            out = call_model(model, inputs, forward_fn)
        except Exception as e:
            e.prunekit_ops_recorded = len(tr.ops)  # the failing op is the next one (dry-run localisation)
            raise
    return tr.ops, [tuple(t.shape) for t in flatten_outputs(out)[0]]


def _fc(model: nn.Module, state: dict, run: Callable):
    """Run ``run(model)`` with module tensors temporarily swapped for ``state`` (like functional_call)."""
    from torch.nn.utils.stateless import _reparametrize_module
    with _reparametrize_module(model, state, tie_weights=False, strict=False):
        return run(model)
