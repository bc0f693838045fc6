"""Matrix products (mm, bmm, addmm, matmul, ...): the contraction ties the inner dims; nn.Linear sizes follow."""
from __future__ import annotations

import math

from ...capture import TRef
from .. import spaces as C
from ._common import rule
from .registry import pinning_rule, register_many

# ops whose first argument is an added input (``self``/bias): the product is of arguments 1 and 2
_WITH_INPUT = frozenset({"addmm", "baddbmm", "_addmm_activation", "addbmm", "addmv"})


def matmul_macs(op, size, shape) -> int:
    """``numel(out) * K`` (K the contracted size); ``addbmm`` sums its batch away, so times the batch."""
    a = op.args[1] if op.packet in _WITH_INPUT else op.args[0]
    out = op.outs()[0]
    macs = math.prod(size(out, d) for d in range(len(shape(out)))) * size(a, len(shape(a)) - 1)
    if op.packet == "addbmm":  # the batch is summed away: out has no batch dim
        macs = macs * size(a, 0)
    return macs


@rule("addmm", "mm", "bmm", "baddbmm", "addbmm", "matmul", "_addmm_activation", macs=matmul_macs)
def matmul(A, op):
    """``a @ b`` (+ bias): batch dims broadcast and tie, the contraction ties ``a``'s last dim to ``b``'s
    second-last (mixed unless one side is zero on masked channels), the output takes ``a``'s rows and ``b``'s
    columns.  A product of two activations is attention-like (heads / head_dim tags)."""
    if op.packet in _WITH_INPUT:
        bias, a, b = op.args[0], op.args[1], op.args[2]
    else:
        bias, a, b = None, op.args[0], op.args[1]
    out = op.outs()[0]
    sa, sb, so = A.shape(a), A.shape(b), A.shape(out)
    where = A.where(op)
    if len(sa) < 2 or len(sb) < 2:
        A.pin_node(a, f"{where}: vector matmul")
        A.pin_node(b, f"{where}: vector matmul")
        return
    na, nb, no = len(sa), len(sb), len(so)
    # batch dims (broadcast from the right)
    for d in range(no - 2):
        ka, kb = d - (no - na), d - (no - nb)
        lay = A.tie([(t, k) for t, k, s in ((a, ka, sa), (b, kb, sb)) if k >= 0 and s[k] == so[d]], where)
        A.set(out, d, lay if lay is not None else C.fresh(so[d], f"{where}: batch dim"))
        A.set_zero(out, d, False)
    if not (A.is_param(a) or A.is_param(b)):  # activation x activation: attention-style product
        for d in range(no - 2):
            C.tag(A.lay(out, d), "head")
        C.tag(A.lay(a, na - 1), "head_dim")
        C.tag(A.lay(b, nb - 1), "head_dim")
    # contraction
    C.tie(A.lay(a, na - 1), A.lay(b, nb - 2), where)
    if sa[-1] > 1 and not (A.zero(a, na - 1) or A.zero(b, nb - 2)):
        C.mix(A.lay(a, na - 1), f"{where}: contraction over channels whose values are not zero when masked")
    A.copy_dim(a, na - 2, out, no - 2)
    A.copy_dim(b, nb - 1, out, no - 1)
    A.set_zero(out, no - 2, A.zero(a, na - 2))
    A.set_zero(out, no - 1, A.zero(b, nb - 1))
    if isinstance(bias, TRef):
        bs = A.shape(bias)
        for k in range(len(bs)):
            d = k + (no - len(bs))
            if bs[k] == so[d] and so[d] > 1:
                C.tie(A.lay(bias, k), A.lay(out, d), where)
                A.set_zero(out, d, A.zero(out, d) and A.zero(bias, k))
            elif so[d] > 1:
                A.set_zero(out, d, False)
    mod = A.module_of(op, ("Linear", "LazyLinear", "NonDynamicallyQuantizableLinear"))
    if mod is not None and op.packet in ("addmm", "mm", "matmul", "_addmm_activation"):
        A.bind(mod, "in_features", A.lay(a, na - 1))
        A.bind(mod, "out_features", A.lay(out, no - 1))



# products with a vector operand (``matrix @ vector``, ``dot``) and the fp8 ``_scaled_mm`` (per-row/column
# scales): counted, but their channels are deliberately not followed
register_many(("mv", "addmv", "dot"), pinning_rule("product with a vector operand (channels not followed)"),
              matmul_macs)
register_many(("_scaled_mm",), pinning_rule("scaled (fp8) matrix product (channels not followed)"), matmul_macs)
