"""Reductions (sum, mean, norms, cumulative ops) and softmax: reduced channels are *mixed* (removing them is
not equal to zeroing them) unless their values are zero when masked.  No MACs by convention."""
from __future__ import annotations

from .. import spaces as C
from ._common import arg, norm_dim, norm_dims, rule


# ---------------------------------------------------------------- reductions
SUM_LIKE = {"sum", "nansum", "linalg_vector_norm", "norm", "count_nonzero", "any", "all"}
MEAN_LIKE = {"mean", "nanmean", "amax", "amin", "var", "std", "var_mean", "std_mean", "logsumexp", "prod", "argmax",
             "argmin", "max", "min", "median", "nanmedian", "mode", "aminmax", "cumsum", "cumprod", "logcumsumexp",
             "cummax", "cummin"}
CUMULATIVE = frozenset({"cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"})


@rule(*sorted(SUM_LIKE | MEAN_LIKE), cost_free=True)
def reduction(A, op):
    """Reduced dims are mixed (unless a sum over channels that are zero when masked); kept dims pass through.
    Arguments are read by position: ``max``/``min`` have overloads (``max.other``, ``max.dim``) whose second
    argument is not ``dim``, and a read by name would silently treat ``max(a, b)`` as a full reduction
    (positionally it fails and the op is pinned)."""
    x = op.args[0]
    outs = op.outs()
    ish = A.shape(x)
    n = len(ish)
    if op.packet in ("linalg_vector_norm",):
        dims = arg(op, 2, "dim")
        keep = arg(op, 3, "keepdim", False)
    elif op.packet == "norm":
        dims = arg(op, 2, "dim")
        keep = arg(op, 3, "keepdim", False)
    elif op.packet in CUMULATIVE:
        d = norm_dim(arg(op, 1, "dim"), n)
        for out in outs:
            for k in range(n):
                A.copy_dim(x, k, out, k)
                A.set_zero(out, k, False)
        if ish[d] > 1:
            C.mix(A.lay(x, d), f"{A.where(op)}: cumulative over channels")
        return
    else:
        dims = arg(op, 1, "dim")
        keep = arg(op, 2, "keepdim", False)
        if op.packet in ("var", "std", "var_mean", "std_mean"):
            keep = op.kwargs.get("keepdim", keep if isinstance(keep, bool) else False)
    if isinstance(dims, bool):
        dims = None
    rdims = norm_dims(dims, n) if n else []
    if not outs:
        return
    for d in rdims:
        if ish[d] > 1:
            if op.packet in SUM_LIKE and A.zero(x, d):
                continue
            C.mix(A.lay(x, d), f"{A.where(op)}: reduces over these channels")
    for out in outs:
        osh = A.shape(out)
        if len(osh) == n:
            for d in range(n):
                if d in rdims:
                    A.set(out, d, C.fresh(1))
                else:
                    A.copy_dim(x, d, out, d)
        else:
            kept = [d for d in range(n) if d not in rdims]
            if len(kept) != len(osh):
                continue
            for j, d in enumerate(kept):
                A.copy_dim(x, d, out, j)


@rule("_softmax", "softmax", "_safe_softmax", "_log_softmax", "log_softmax", "special_softmax", cost_free=True)
def _softmax(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dim = norm_dim(op.arg("dim"), n)
    if A.shape(x)[dim] > 1:
        C.mix(A.lay(x, dim), f"{A.where(op)}: softmax over these channels")
    for d in range(n):
        A.copy_dim(x, d, out, d)
        A.set_zero(out, d, False)

