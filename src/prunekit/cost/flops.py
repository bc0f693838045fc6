"""MACs per ATen op, as a function of every dim's (kept) size, and the symbolic sizes they are evaluated on.

The formulas are part of each op's spec in :mod:`prunekit.analysis.ops` (beside its channel rule).

One table serves counting (``pk.count``), FLOPs targets and the differentiable FLOPs loss:
a formula receives a ``size(node_ref, dim)`` callable, which returns either the captured size,
the size after removing units, or a symbolic :class:`Poly` in the kept unit counts of the groups
(compiled once by :meth:`PruneGraph.macs_kept`).  FLOPs = 2 x MACs throughout.

Convention: the one of ``torch.utils.flop_counter.FlopCounterMode`` -- only convolutions, matrix
products and attention are counted (bias adds, norms, activations, pooling, elementwise ops are
not), a multiply-accumulate is one MAC, and attention costs ``q @ k^T`` plus ``attn @ v``
(causal masks and dropout are ignored).  Known differences from ``FlopCounterMode`` (torch 2.15):

* ``mv``, ``addmv``, ``dot`` (e.g. ``matrix @ vector``), ``addbmm`` and
  ``_addmm_activation`` (a fused Linear+GELU on CUDA) are matrix products and are counted here;
  ``FlopCounterMode`` counts none of them.
* Packed variable-length attention (``_flash_attention_forward`` with ``cum_seq_q``,
  ``_efficient_attention_forward`` with ``cu_seqlens_q``) is counted as one sequence of the
  packed length, an upper bound: the real offsets are tensor values that a meta capture does not
  have.  ``FlopCounterMode`` sums per sequence.
* ``nn.MultiheadAttention``'s fused eval fast path (``_native_multi_head_attention``) is not
  counted by ``FlopCounterMode``; the capture disables that fast path, so prunekit counts the
  projections and the attention it computes.
* ``flex_attention`` (a higher-order op, not an ATen op) and RNN kernels are not counted; neither
  are RNNs by ``FlopCounterMode``.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from ..analysis.ops.registry import _SPECS, FieldView, lookup
from ..capture import OpRecord, TRef

SizeFn = Callable[[TRef, int], int]

# the formulas live beside the channel rules, one spec per op (prunekit.analysis.ops); ``MACS`` is a
# deprecated view of them keyed by ``OpRecord.packet`` (assigning to it replaces an op's formula)
MACS = FieldView("macs")


def op_macs(op: OpRecord, size: SizeFn, shape) -> int:
    """MACs of one recorded call (0 for an op without a formula), looked up by the op's qualified name."""
    spec = _SPECS.get(op.qualname) if op.qualname else lookup(op)
    fn = spec.macs if spec is not None else None
    return int(fn(op, size, shape)) if fn is not None else 0


# ---------------------------------------------------------------- symbolic sizes
class Poly:
    """A polynomial with integer coefficients, ``{monomial: coefficient}``.

    A monomial is a sorted tuple of variable ids (a repeated id is a power).  The formulas of
    :data:`MACS` only add and multiply sizes, so running them with a ``size`` callable that returns
    polynomials in the kept unit counts gives MACs as an exact polynomial, compiled once and then
    evaluated many times (:class:`CompiledPoly`).
    """

    __slots__ = ("terms",)

    def __init__(self, terms: dict[tuple, int] | None = None):
        self.terms = {m: c for m, c in (terms or {}).items() if c}

    @staticmethod
    def var(v: int) -> "Poly":
        return Poly({(v,): 1})

    @staticmethod
    def lift(x) -> "Poly":
        if isinstance(x, Poly):
            return x
        if isinstance(x, int):
            return Poly({(): x})
        return NotImplemented

    def __add__(self, other):
        o = Poly.lift(other)
        if o is NotImplemented:
            return o
        res = dict(self.terms)
        for m, c in o.terms.items():
            res[m] = res.get(m, 0) + c
        return Poly(res)

    __radd__ = __add__

    def __mul__(self, other):
        o = Poly.lift(other)
        if o is NotImplemented:
            return o
        res: dict[tuple, int] = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in o.terms.items():
                m = tuple(sorted(m1 + m2))
                res[m] = res.get(m, 0) + c1 * c2
        return Poly(res)

    __rmul__ = __mul__

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return " + ".join(f"{c}*{'*'.join(f'x{v}' for v in m) or '1'}" for m, c in self.terms.items()) or "0"


class CompiledPoly:
    """A :class:`Poly` prepared for fast repeated evaluation.

    ``defaults[v]`` is the value of variable ``v`` when the caller does not give one.  Python
    numbers are evaluated exactly in Python (integers stay integers); as soon as one value is a
    ``torch.Tensor`` the polynomial is evaluated with a few vectorised tensor ops in float64, so
    autograd flows back to every tensor value.
    """

    def __init__(self, poly: "Poly | int", defaults: Mapping[int, int]):
        poly = Poly.lift(poly)
        used = sorted({v for m in poly.terms for v in m})
        self.pos = {v: i for i, v in enumerate(used)}
        self.defaults = [defaults[v] for v in used]
        self.monomials = [(c, tuple(self.pos[v] for v in m)) for m, c in poly.terms.items()]
        self._tensors: dict = {}  # device -> (index, coef)

    def __call__(self, values: Mapping[int, object]):
        vals = list(self.defaults)
        tensors = []
        ref = None  # the first tensor value: the result is a tensor of its device (and float dtype)
        for v, x in values.items():
            is_t = isinstance(x, torch.Tensor)
            if is_t and ref is None:
                ref = x
            p = self.pos.get(v)
            if p is None:
                continue
            if is_t:
                tensors.append((p, x))
            else:
                vals[p] = x
        if ref is None:
            prod, get = math.prod, vals.__getitem__
            return sum(c * prod(map(get, m)) for c, m in self.monomials)
        return self._eval_tensor(vals, tensors, ref)

    def _eval_tensor(self, vals: Sequence, tensors: list, ref: torch.Tensor):
        dev = ref.device
        if dev not in self._tensors:
            deg = max((len(m) for _, m in self.monomials), default=0)
            one = len(self.defaults)
            idx = [list(m) + [one] * (deg - len(m)) for _, m in self.monomials]
            self._tensors[dev] = (torch.tensor(idx, dtype=torch.long, device=dev).reshape(len(idx), deg),
                                  torch.tensor([float(c) for c, _ in self.monomials], dtype=torch.float64,
                                               device=dev))
        idx, coef = self._tensors[dev]
        base = torch.tensor([float(v) for v in vals] + [1.0], dtype=torch.float64, device=dev)
        ext = base
        if tensors:
            pos = torch.tensor([p for p, _ in tensors], dtype=torch.long, device=dev)
            ts = [t for _, t in tensors]
            if all(t.dim() == 0 and t.dtype == ref.dtype and t.device == dev for t in ts):
                tv = torch.stack(ts).to(torch.float64)  # one conversion instead of one per value
            else:
                tv = torch.stack([t.reshape(()).to(device=dev, dtype=torch.float64) for t in ts])
            ext = base.index_put((pos,), tv)
        res = (coef * ext[idx].prod(dim=1)).sum()
        return res.to(ref.dtype) if ref.is_floating_point() else res
