"""Mixture-of-experts routing: grouped matrix products, scatter-adds of expert outputs, and the ops that turn
router scores into expert choices.

The experts of a registered MoE block share one *expert space* (see :mod:`prunekit.analysis.experts`).  The
ops here carry it through where they consume routing -- ``topk`` over router scores, ``nonzero`` / ``select``
over per-expert masks and weights (transformers' eager expert loop), ``one_hot`` / ``histc`` sized by the
block's expert count, the groups of ``_grouped_mm`` -- and mark it mixed (removing an expert changes the
routing).  On any other dim they pin what they touched before: indices and data-dependent sizes keep their
size.
"""
from __future__ import annotations

import math

from ...capture import TRef
from .. import spaces as C
from ..experts import EXPERT_MIX, expert_layout, routed
from ._common import norm_dim, rule
from .registry import register


def _pin_all(A, op, what: str = "op rearranges or indexes values (channels pinned)") -> None:
    A.pin_op(op, f"{A.where(op)}: {what}")


# ---------------------------------------------------------------- grouped matrix products
def grouped_mm_macs(op, size, shape) -> int:
    """``_grouped_mm(a, b, offs)``: every row of ``a`` meets one group's matrix, so ``numel(out) * K`` for a
    3-D ``b`` (``(S, K) x (E, K, N)``, the MoE case) or 3-D ``a``; two 2-D operands split ``K`` among the groups
    (out ``(G, M, N)``): ``M * N * K``."""
    a, out = op.args[0], op.outs()[0]
    b = op.args[1]
    k = size(a, len(shape(a)) - 1)
    if len(shape(a)) == 2 and len(shape(b)) == 2:
        return size(out, 1) * size(out, 2) * k
    return math.prod(size(out, d) for d in range(len(shape(out)))) * k


def _grouped_mm(A, op, a, b, offs, bias=None, aligned: bool = False) -> None:
    """``(S, K) x (E, K, N) -> (S, N)`` with ``offs`` the end row of each of the E groups (experts): ``K`` is
    contracted (mixed unless one side is zero on masked channels), the output takes ``a``'s rows and ``b``'s
    columns; ``b``'s group dim is the block's expert space when it is one (tied to ``offs``), else pinned.
    Other layouts (2-D x 2-D, 3-D x 3-D, a bias) are pinned.  ``aligned``: the kernel needs 16-byte strides
    (torch's ``_grouped_mm`` on CPU and CUDA), so the kept ``K`` and ``N`` stay multiples of ``16 / itemsize``."""
    out = op.outs()[0]
    where = A.where(op)
    if bias is not None or not isinstance(offs, TRef) or len(A.shape(a)) != 2 or len(A.shape(b)) != 3:
        _pin_all(A, op, "grouped matrix product layout not followed (only (S, K) x (E, K, N) with offs)")
        return
    C.tie(A.lay(a, 1), A.lay(b, 1), where)
    if A.shape(a)[1] > 1 and not (A.zero(a, 1) or A.zero(b, 1)):
        C.mix(A.lay(a, 1), f"{where}: contraction over channels whose values are not zero when masked")
    A.copy_dim(a, 0, out, 0)
    A.copy_dim(b, 2, out, 1)
    A.set_zero(out, 0, A.zero(a, 0))
    A.set_zero(out, 1, A.zero(b, 2))
    dtype = A.tape.nodes[a.id].dtype
    if aligned and dtype is not None and 16 % dtype.itemsize == 0:
        # the kernel needs 16-byte strides: K for ``a`` and a transposed weight, N for a row-major weight (the
        # capture keeps no strides, so both; in transformers' experts both are widths aligned anyway)
        why = f"{where}: the kernel needs widths in multiples of 16 bytes"
        A.require_multiple(A.lay(a, 1), 16 // dtype.itemsize, why)
        A.require_multiple(A.lay(b, 2), 16 // dtype.itemsize, why)
    if routed(A, b, 0):
        A.tie([(b, 0), (offs, 0)], where)
    else:
        C.pin(A.lay(b, 0), f"{where}: groups of the weight, indexed by offs")
        A.pin_node(offs, f"{where}: group offsets")


@rule("_grouped_mm", macs=grouped_mm_macs)
def _aten_grouped_mm(A, op):
    _grouped_mm(A, op, op.arg("self"), op.arg("mat2"), op.arg("offs"), op.arg("bias"), aligned=True)


def _fallback_grouped_mm(A, op):
    """transformers' ``grouped_mm_fallback(input, weight, offs)`` custom op (the loop it runs instead of
    ``_grouped_mm`` under torch.compile or on old torch): the same product."""
    _grouped_mm(A, op, op.arg("input"), op.arg("weight"), op.arg("offs"))


register("transformers::grouped_mm_fallback", _fallback_grouped_mm, grouped_mm_macs)


# ---------------------------------------------------------------- scatter-add of expert outputs
@rule("index_add", "index_add_", structural=True)
def _index_add(A, op):
    """``out = x.index_add(dim, index, source)``: rows of ``source`` are added into rows ``index`` of ``x``
    along ``dim`` (pinned: positions); every other dim of ``x`` and ``source`` is the same channels, zero on
    masked channels where both are."""
    x, src, idx, out = op.arg("self"), op.arg("source"), op.arg("index"), op.outs()[0]
    n = len(A.shape(x))
    dim = norm_dim(op.arg("dim"), n)
    where = A.where(op)
    if len(A.shape(src)) != n:
        _pin_all(A, op)
        return
    A.pin_node(idx, f"{where}: index tensor")
    msg = f"{where}: rows added by index along this dim"
    C.pin(A.lay(x, dim), msg)
    C.pin(A.lay(src, dim), msg)
    for d in range(n):
        if d == dim:
            A.set(out, d, A.lay(x, d))
            A.set_zero(out, d, False)
            continue
        A.tie([(x, d), (src, d)], where)
        A.copy_dim(x, d, out, d)
        A.set_zero(out, d, A.zero(x, d) and A.zero(src, d))


# ---------------------------------------------------------------- routing decisions
@rule("topk", structural=True)
def _topk(A, op):
    """``topk`` over router scores (an expert dim): the expert space is carried through (mixed: fewer
    experts change which k are chosen) and the k chosen are a fresh pinned dim; any other topk pins."""
    x = op.arg("self")
    n = len(A.shape(x))
    d = op.arg("dim")
    dim = norm_dim(-1 if d is None else d, n) if n else 0
    if not n or not routed(A, x, dim):
        _pin_all(A, op)
        return
    C.mix(A.lay(x, dim), f"{A.where(op)}: {EXPERT_MIX}")
    for out in op.outs():
        for d in range(n):
            if d == dim:
                A.set(out, d, C.fresh(A.shape(out)[d], f"{A.where(op)}: the k experts chosen per token"))
                A.set_zero(out, d, False)
            else:
                A.copy_dim(x, d, out, d)
                A.set_zero(out, d, False)


@rule("nonzero", structural=True)
def _nonzero(A, op):
    """Positions of non-zero entries (data-dependent size): an expert dim of the input is carried away as
    values (mixed), every other dim is pinned; the output is pinned."""
    x = op.arg("self")
    where = A.where(op)
    for d in range(len(A.shape(x))):
        if routed(A, x, d):
            C.mix(A.lay(x, d), f"{where}: {EXPERT_MIX}")
        else:
            C.pin(A.lay(x, d), f"{where}: op rearranges or indexes values (channels pinned)")
    for out in op.outs():
        A.pin_node(out, f"{where}: positions of non-zero values (data-dependent size)")


def _count_layout(A, op, n: int):
    """The layout of a dim of size ``n`` sized by the executing MoE block's expert count ``E``: the expert
    space (``n == E``), or it followed by one sentinel slot (``n == E + 1``, transformers' eager loop); else
    None."""
    lay = expert_layout(A, op)
    if lay is None:
        return None
    e = C.layout_size(lay)
    if n == e:
        return lay
    if n == e + 1:
        return C.concat([lay, C.fresh(1)])
    return None


@rule("one_hot", structural=True)
def _one_hot(A, op):
    """``one_hot(index, num_classes)``: inside a MoE block with ``num_classes`` = its expert count (+ 1), the
    class dim is the expert space (+ a sentinel); otherwise pinned."""
    x, out = op.arg("self"), op.outs()[0]
    nc = op.arg("num_classes")
    lay = _count_layout(A, op, nc) if type(nc) is int and nc > 0 else None
    if lay is None:
        _pin_all(A, op)
        return
    A.pin_node(x, f"{A.where(op)}: index tensor")
    n = len(A.shape(x))
    for d in range(n):
        A.copy_dim(x, d, out, d)
    A.set(out, n, lay)
    A.set_zero(out, n, False)


@rule("histc", structural=True)
def _histc(A, op):
    """``histc(ids, bins)``: inside a MoE block with ``bins`` = its expert count (tokens per expert, the
    offsets of ``_grouped_mm``), the bins are the expert space; otherwise pinned."""
    x, out = op.arg("self"), op.outs()[0]
    bins = op.arg("bins")
    lay = _count_layout(A, op, bins) if type(bins) is int else None
    if lay is None or C.layout_size(lay) != bins:
        _pin_all(A, op)
        return
    A.pin_node(x, f"{A.where(op)}: values counted into bins")
    A.set(out, 0, lay)
    A.set_zero(out, 0, False)
