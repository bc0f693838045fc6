"""Indexing and gathering: index tensors are pinned, indexed dims are pinned; embedding lookups; ops that
rearrange values in ways channels cannot follow pin everything they touch."""
from __future__ import annotations

from ...capture import TRef
from .. import spaces as C
from ._common import norm_dim, rule


@rule("index_select", structural=True)
def _index_select(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dim = norm_dim(op.arg("dim"), n)
    A.pin_node(op.arg("index"), f"{A.where(op)}: index tensor")
    for d in range(n):
        if d == dim:
            msg = f"{A.where(op)}: indexes this dim"
            C.pin(A.lay(x, d), msg)
            A.set(out, d, C.fresh(A.shape(out)[d], msg))
        else:
            A.copy_dim(x, d, out, d)


@rule("index", "_unsafe_index", structural=True)
def _index(A, op):
    x, out = op.args[0], op.outs()[0]
    idx = list(op.arg("indices"))
    xs, osh = A.shape(x), A.shape(out)
    where = A.where(op)
    pos = [i for i, t in enumerate(idx) if t is not None]
    for t in idx:
        if isinstance(t, TRef):
            A.pin_node(t, f"{where}: index tensor")
    if len(pos) == 1 and isinstance(idx[pos[0]], TRef):
        p = pos[0]
        ish = A.shape(idx[pos[0]])
        C.pin(A.lay(x, p), f"{where}: indexes this dim")
        if len(osh) == len(xs) - 1 + len(ish):
            for d in range(p):
                A.copy_dim(x, d, out, d)
            for j in range(len(ish)):
                A.set(out, p + j, C.fresh(osh[p + j], f"{where}: indexed dim"))
            for d in range(p + 1, len(xs)):
                A.copy_dim(x, d, out, d - 1 + len(ish))
            return
    A.pin_node(x, f"{where}: advanced indexing")


@rule("index_put", "index_put_", structural=True)
def _index_put(A, op):
    # ``x[idx] = v`` with one index tensor on dim p (torchvision's MultiScaleRoIAlign writes each FPN level's
    # pooled boxes into its result this way): the other dims of ``v`` are those of ``x``, channel for channel
    x, v, out = op.args[0], op.arg("values"), op.outs()[0]
    idx = list(op.arg("indices"))
    xs, where = A.shape(x), A.where(op)
    pos = [i for i, t in enumerate(idx) if t is not None]
    for t in idx:
        if isinstance(t, TRef):
            A.pin_node(t, f"{where}: index tensor")
    if len(pos) == 1 and isinstance(idx[pos[0]], TRef) and isinstance(v, TRef):
        p, ish, vs = pos[0], A.shape(idx[pos[0]]), A.shape(v)
        if len(ish) == 1 and tuple(vs) == tuple(xs[:p]) + tuple(ish) + tuple(xs[p + 1:]):
            for d in range(len(xs)):
                if d == p:
                    msg = f"{where}: indexes this dim"
                    C.pin(A.lay(x, d), msg)
                    C.pin(A.lay(v, d), msg)
                    A.set(out, d, A.lay(x, d))
                    continue
                A.tie([(x, d), (v, d)], where)
                A.copy_dim(x, d, out, d)
                A.set_zero(out, d, A.zero(x, d) and A.zero(v, d))
            return
    rearranging(A, op)


# (nonzero, topk, histc, one_hot and index_add have rules of their own in ops/routing.py: they carry experts)
@rule("masked_select", "gather", "scatter", "scatter_add", "scatter_reduce",
      "index_copy", "index_fill", "take", "unfold", "im2col", "col2im", "diagonal", "diag", "diag_embed", "sort",
      "kthvalue", "_unique2", "searchsorted", "bucketize", "multinomial", "nonzero_static", "scatter_",
      "masked_scatter_", "take_along_dim", "embedding_bag", "_embedding_bag", "fft_rfft2", "fft_irfft2",
      "_fft_r2c", "_fft_c2r", "_fft_c2c", "view_as_complex", structural=True)
def rearranging(A, op):
    A.pin_op(op, f"{A.where(op)}: op rearranges or indexes values (channels pinned)")


@rule("embedding", structural=True)
def _embedding(A, op):
    w, idx = op.args[0], op.args[1]
    out = op.outs()[0]
    where = A.where(op)
    C.pin(A.lay(w, 0), f"{where}: embedding rows are indexed by token ids")
    ni = len(A.shape(idx))
    for d in range(ni):
        A.copy_dim(idx, d, out, d)
    A.copy_dim(w, 1, out, ni)
    A.set_zero(out, ni, True)
    mod = A.module_of(op, ("Embedding",), param=w)
    if mod is not None:
        A.bind(mod, "embedding_dim", A.lay(w, 1))

