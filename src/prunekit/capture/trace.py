"""Shape and scalar traces: the per-op output shapes and SDPA scales a forward produces, used by the dry run."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .inputs import call_model, eval_mode, flatten_outputs
from .kernels import _OPINFO, _meta_call, _op_info
from .views import _meta_inputs, _no_mha_fastpath, preserved_modules


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
