"""Normalisations (batch, layer/RMS, group norm): parameters tie to the normalised channels; statistics over
channels mix them.  No MACs by convention."""
from __future__ import annotations

from ...capture import TRef
from .. import spaces as C
from ._common import rule


# ---------------------------------------------------------------- norms
@rule("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
      "_native_batch_norm_legit_functional", "batch_norm", "cudnn_batch_norm", "miopen_batch_norm",
      "_batch_norm_with_update", "_batch_norm_no_update", cost_free=True)
def batch_norm(A, op):
    """Weight, bias and running statistics tie to the channel dim; batch statistics (training) mix every
    other dim."""
    x = op.args[0]
    outs = op.outs()
    where = A.where(op)
    n = len(A.shape(x))
    C_ = A.shape(x)[1] if n > 1 else A.shape(x)[0]
    cd = 1 if n > 1 else 0
    lx = A.lay(x, cd)
    w = op.arg("weight")
    for t in (w, op.arg("bias"), op.arg("running_mean"), op.arg("running_var")):
        if isinstance(t, TRef) and A.shape(t) == (C_,):
            C.tie(A.lay(t, 0), lx, where)
    out = outs[0]
    for d in range(n):
        A.copy_dim(x, d, out, d)
        A.set_zero(out, d, False)
    A.set_zero(out, cd, isinstance(w, TRef))
    # batch statistics (training=True, or no running stats) reduce over every other dim: removing channels
    # there changes the statistics -- weight standardisation (timm ScaledStdConv2d) normalises each output
    # channel over in_channels x kernel, so pruning the conv's inputs is valid but not exact
    if _batch_statistics(op):
        for d in range(n):
            if d != cd:
                C.mix(A.lay(x, d), f"{where}: batch statistics over dim {d} change when its channels are removed")
    for o in outs[1:]:
        if A.shape(o) == (C_,):
            A.set(o, 0, lx)
    mod = A.module_of(op, ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d",
                           "InstanceNorm2d", "InstanceNorm3d", "LazyBatchNorm2d"))
    if mod is not None and "Instance" not in type(A.modules[mod]).__name__:
        A.bind(mod, "num_features", lx)
    elif mod is not None:
        # instance norm runs batch_norm on (1, B*C, ...) with repeated weight/stats: num_features follows the
        # module's own per-channel parameter (or the channel factor of B*C when it has none)
        pid = next((A.param_nid[f"{mod}.{a}"] for a in ("weight", "running_mean") if f"{mod}.{a}" in A.param_nid),
                   None)
        if pid is not None:
            A.bind(mod, "num_features", A.lay(pid, 0))
        else:
            terms = C.expand(lx)
            if len(terms) == 1 and len(terms[0]) == 2:
                A.bind(mod, "num_features", ((terms[0][1],),))


def _batch_statistics(op) -> bool:
    """Does this batch-norm call normalise with batch statistics (training mode, or no running stats)?"""
    if "no_stats" in op.name or op.packet == "_batch_norm_with_update":
        return True
    if "no_training" in op.name or op.packet == "_batch_norm_no_update":
        return False
    return bool(op.arg("training", False))


@rule("native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm", cost_free=True)
def layer_norm(A, op):
    """Weight and bias tie to the normalised (trailing) dims, whose statistics mix them."""
    x = op.args[0]
    shape = list(op.arg("normalized_shape"))
    w = op.arg("weight")
    b = op.arg("bias")  # rms_norm has none
    outs = op.outs()
    where = A.where(op)
    n = len(A.shape(x))
    k = len(shape)
    ndims = list(range(n - k, n))
    for t in (w, b):
        if isinstance(t, TRef):
            for j, d in enumerate(ndims):
                C.tie(A.lay(t, j), A.lay(x, d), where)
    for d in ndims:
        if A.shape(x)[d] > 1:
            C.mix(A.lay(x, d), f"{where}: normalization statistics over these channels")
    out = outs[0]
    for d in range(n):
        A.copy_dim(x, d, out, d)
        A.set_zero(out, d, isinstance(w, TRef) and d in ndims)
    for o in outs[1:]:
        os_ = A.shape(o)
        for d in range(min(len(os_), n - k)):
            A.copy_dim(x, d, o, d)
    mod = A.module_of(op, ("LayerNorm", "RMSNorm", "LayerNorm2d", "LayerNormGeneral"))
    if mod is not None and hasattr(A.modules[mod], "normalized_shape"):
        A.bind(mod, "normalized_shape", [A.lay(x, d) for d in ndims])
    elif ndims:
        # functional ``F.layer_norm(x, (self.dim,), ...)`` / ``F.rms_norm``: a size attribute of the executing
        # module equal to the normalized size follows those channels, as for a reshape by ``self.num_heads``
        A.bind_reshape(op, [A.lay(x, d) for d in ndims], [A.shape(x)[d] for d in ndims])


@rule("native_group_norm", "group_norm", cost_free=True)
def group_norm(A, op):
    """The channel dim splits into groups x channels-per-group; statistics mix the channels of a group."""
    x = op.args[0]
    w, b = op.arg("weight"), op.arg("bias")
    G = int(op.arg("group") if op.packet == "native_group_norm" else op.arg("num_groups"))
    outs = op.outs()
    where = A.where(op)
    n = len(A.shape(x))
    Cn = A.shape(x)[1]
    lx = A.lay(x, 1)
    for t in (w, b):
        if isinstance(t, TRef):
            C.tie(A.lay(t, 0), lx, where)
    lg = None
    try:
        lg, lc = C.split_sizes(lx, [G, Cn // G])
        if Cn // G > 1:
            C.mix(lc, f"{where}: GroupNorm statistics over channels of a group")
        C.tag(lg, "group")
    except C.TieError as e:
        C.pin(lx, f"{where}: {e}")
    out = outs[0]
    for d in range(n):
        A.copy_dim(x, d, out, d)
        A.set_zero(out, d, d == 1 and isinstance(w, TRef))
    for o in outs[1:]:
        if len(A.shape(o)) >= 1:
            A.copy_dim(x, 0, o, 0)
            if len(A.shape(o)) == 2 and lg is not None:
                A.set(o, 1, lg)
    mod = A.module_of(op, ("GroupNorm", "GroupNorm1"))
    if mod is not None:
        A.bind(mod, "num_channels", lx)
        A.bind(mod, "num_groups", lg, default=G)

