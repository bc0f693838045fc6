"""The recorder: a dispatch mode that writes every ATen call to the tape, the SDPA/MHA markers, capture()."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .inputs import _model_device, call_model, eval_mode, flatten_outputs
from .kernels import _OPINFO, _meta_call, _op_info
from .records import CaptureError, OpRecord, Tape, TNode, TRef, log
from .views import (
    _fc,
    _meta_attr,
    _meta_inputs,
    _no_mha_fastpath,
    _real_attr,
    _swapped_state,
    preserved_modules,
)


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


@contextlib.contextmanager
def module_stack_hooks(names: dict[int, str], stack: list[str]):
    """Keep ``stack`` = fqns of the executing modules of one model (``names``: id(module) -> fqn).

    Two global module hooks instead of two hooks per module: registering and removing ~2 hooks per
    module on every capture cost more than the forward itself on meta."""
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

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
