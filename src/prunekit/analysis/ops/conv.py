"""Convolutions: the weight ties input channels (per group) and produces the output channels."""
from __future__ import annotations

import math

from ...capture import TRef
from .. import spaces as C
from ._common import rule

_GENERIC = frozenset({"convolution", "_convolution", "convolution_overrideable"})  # with a ``transposed`` flag


def _transposed(op) -> bool:
    if op.packet in _GENERIC:
        return bool(op.arg("transposed", False))
    return op.packet.startswith("conv_transpose")


def conv_macs(op, size, shape) -> int:
    """Every output element (input element, when transposed) costs one MAC per weight element of one output
    channel: ``numel(out) * C_in/groups * prod(kernel)``."""
    x, w = op.args[0], op.args[1]
    out = op.outs()[0]
    per_output = math.prod(size(w, d) for d in range(1, len(shape(w))))
    if _transposed(op):
        return math.prod(size(x, d) for d in range(len(shape(x)))) * per_output
    return math.prod(size(out, d) for d in range(len(shape(out)))) * per_output


def _group_split(lx, groups: int, per: int):
    """(groups, channels per group) layouts of a grouped conv's input channels ``lx``.  A concatenation whose
    pieces are whole blocks of groups (``cat([a, b])`` into ``groups=2``) splits too: each piece is (its groups x
    the channels per group), the channels per group one space shared by all pieces, the groups a concatenation."""
    try:
        return C.split_sizes(lx, [groups, per])
    except C.TieError:
        terms = C.expand(lx)
        if len(terms) < 2 or per < 1 or any(C.term_size(t) % per for t in terms):
            raise
    lcin = C.fresh(per)
    gparts = []
    for t in terms:
        gp = C.fresh(C.term_size(t) // per)
        if not C.tie(((t),), C.merge([gp, lcin]) if gp else lcin, "grouped convolution"):
            raise C.TieError("reshape splits a concatenation of channel spaces")
        gparts.append(gp)
    return C.concat(gparts), lcin


@rule("convolution", "_convolution", "conv2d", "conv1d", "conv3d", "cudnn_convolution", "mkldnn_convolution",
      "convolution_overrideable", "_slow_conv2d_forward", "thnn_conv2d", "conv_transpose2d", "conv_transpose1d",
      "conv_transpose3d", macs=conv_macs)
def convolution(A, op):
    """The weight's input dim ties the input channels (per group: groups x channels-per-group), its output
    dim is the output channels, and the kernel dims are pinned; the output is zero on pruned channels."""
    x, w = op.args[0], op.args[1]
    b = op.arg("bias")
    transposed = _transposed(op)
    groups = int(op.arg("groups", 1))
    out = op.outs()[0]
    xs, ws, osh = A.shape(x), A.shape(w), A.shape(out)
    where = A.where(op)
    mod = A.module_of(op, ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                           "LazyConv2d"), param=w)
    unbatched = len(xs) == len(ws) - 1
    cdim = 0 if unbatched else 1
    if not unbatched:
        A.copy_dim(x, 0, out, 0)
    for k in range(2, len(ws)):
        C.pin(A.lay(w, k), f"{where}: kernel dim")
        C.tag(A.lay(w, k), "nonchannel")
    for k in range(cdim + 1, len(osh)):
        A.set(out, k, C.fresh_nonchannel(osh[k], f"{where}: spatial dim"))
    lx = A.lay(x, cdim)
    w_in, w_out = (0, 1) if transposed else (1, 0)
    try:
        if groups == 1:
            C.tie(lx, A.lay(w, w_in), where)
            lout = A.lay(w, w_out)
            lg = None
        else:
            if transposed:
                lg, lcin = _group_split(lx, groups, xs[cdim] // groups)
                lg2, lcin_w = C.split_sizes(A.lay(w, 0), [groups, ws[0] // groups])
                C.tie(lcin, lcin_w, where)
                C.tie(lg, lg2, where)
                lout = C.merge([lg, A.lay(w, 1)])
            else:
                lg, lcin = _group_split(lx, groups, xs[cdim] // groups)
                C.tie(lcin, A.lay(w, 1), where)
                lg2, lcout = C.split_sizes(A.lay(w, 0), [groups, ws[0] // groups])
                C.tie(lg, lg2, where)
                lout = A.lay(w, 0)
            C.tag(lg, "group")
    except C.TieError as e:
        msg = f"{where}: grouped channels cannot be aligned ({e})"
        A.pin_node(x, msg)
        A.pin_node(w, msg)
        lout, lg = C.fresh(osh[cdim], msg), None
    A.set(out, cdim, lout)
    A.set_zero(out, cdim, True)
    if isinstance(b, TRef):
        C.tie(A.lay(b, 0), lout, where)
    if mod is not None:
        A.bind(mod, "in_channels", lx)
        A.bind(mod, "out_channels", lout)
        if lg is not None:  # a grouped conv whose channels could not be aligned keeps its groups (and is pinned)
            A.bind(mod, "groups", lg)

