"""Attention: the SDPA family and kernel-level attention, and the capture's markers for the SDPA scale and
nn.MultiheadAttention."""
from __future__ import annotations

import math
from numbers import Number

from ...capture import TRef
from .. import spaces as C
from ._common import rule
from .registry import pinning_rule, register_many


def sdpa_macs(op, size, shape) -> int:
    """``q @ k^T`` plus ``attn @ v`` on (..., L, E) / (..., S, E) / (..., S, Ev) inputs: ``lead * L * S * (E + Ev)``."""
    q, k, v = op.args[0], op.args[1], op.args[2]
    n = len(shape(q))
    lead = math.prod(size(q, d) for d in range(n - 2))
    return lead * size(q, n - 2) * size(k, n - 2) * (size(q, n - 1) + size(v, n - 1))


def attention_bshd_macs(op, size, shape) -> int:
    """Kernel-level attention with (batch, seq, heads, dim) inputs, or packed (tokens, heads, dim)."""
    q, k, v = op.args[0], op.args[1], op.args[2]
    if len(shape(q)) == 3:
        lead, L, S = size(q, 1), size(q, 0), size(k, 0)
    else:
        lead, L, S = size(q, 0) * size(q, 2), size(q, 1), size(k, 1)
    e = len(shape(q)) - 1
    return lead * L * S * (size(q, e) + size(v, e))



# ---------------------------------------------------------------- attention
def sdpa(A, op):
    """q, k, v of (batch..., L|S, E|Ev): batch and head dims tie (grouped-query heads pin), q and k tie over E
    (mixed), k and v over S; the output takes q's L and v's Ev."""
    q, k, v = op.args[0], op.args[1], op.args[2]
    outs = op.outs()
    out = outs[0]
    where = A.where(op)
    nq = len(A.shape(q))
    qs = A.shape(q)
    rep = None  # the query-head slot within a kv group (shared by k and v: they have the same heads)
    for d in range(nq - 2):  # batch / heads
        lay = A.lay(q, d)
        for t in (k, v):
            ts = A.shape(t)
            if ts[d] == qs[d]:
                C.tie(lay, A.lay(t, d), where)
            elif d == nq - 3 and ts[d] > 0 and qs[d] % ts[d] == 0:
                # grouped-query attention (enable_gqa, or a kernel given fewer kv heads): query head h reads kv
                # head h // n_rep (k.repeat_interleave(n_rep, dim=-3)), so q's heads are the row-major product
                # kv heads x slot.  n_rep = Hq / Hkv is implicit in the shapes, so both factors may shrink
                if rep is None:
                    rep = C.fresh(qs[d] // ts[d])
                    C.tag(rep, "head")
                C.tie(lay, C.merge([A.lay(t, d), rep]), f"{where}: grouped-query heads")
            else:
                C.pin(lay, f"{where}: grouped-query heads ({qs[d]} query vs {ts[d]} key/value heads)")
                C.pin(A.lay(t, d), f"{where}: grouped-query heads ({qs[d]} query vs {ts[d]} key/value heads)")
        A.set(out, d, lay)
        C.tag(lay, "head")
    C.tag(A.lay(q, nq - 1), "head_dim")
    C.tag(A.lay(v, nq - 1), "head_dim")
    C.tie(A.lay(q, nq - 1), A.lay(k, nq - 1), where)  # E
    if not (A.zero(q, nq - 1) or A.zero(k, nq - 1)):
        C.mix(A.lay(q, nq - 1), f"{where}: q.k contraction over non-zero channels")
    C.tie(A.lay(k, nq - 2), A.lay(v, nq - 2), where)  # S
    A.copy_dim(q, nq - 2, out, nq - 2)
    A.copy_dim(v, nq - 1, out, nq - 1)
    A.set_zero(out, nq - 1, A.zero(v, nq - 1))
    for o in outs[1:]:
        os_ = A.shape(o)
        for d in range(min(len(os_), nq - 2)):
            if os_[d] == A.shape(q)[d]:
                A.copy_dim(q, d, o, d)
    mask = op.arg("attn_mask", op.arg("attn_bias"))  # flash-for-CPU takes attn_mask too (keyword)
    if isinstance(mask, TRef):
        ms = A.shape(mask)
        for k in range(len(ms) - 2):  # a per-head additive mask (T5's position bias): its heads are q's heads
            d = k + (nq - len(ms))
            if d >= 0 and ms[k] == A.shape(q)[d] and ms[k] > 1:
                C.tie(A.lay(mask, k), A.lay(q, d), where)
        C.pin(A.lay(mask, len(ms) - 1), f"{where}: attention mask")


register_many(("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
               "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
               "_scaled_dot_product_fused_attention_overrideable"), sdpa, sdpa_macs)
# kernel-level attention (batch, seq, heads, dim; CUDA kernels under the SDPA ops): counted, channels pinned
register_many(("_flash_attention_forward", "_efficient_attention_forward"),
              pinning_rule("kernel-level attention (channels not followed)"), attention_bshd_macs)


@rule("prunekit::sdpa_scale", structural=True)
def _sdpa_scale(A, op):
    q, scale = op.args[0], op.args[1]
    if isinstance(scale, Number) and not isinstance(scale, bool):
        A.note_scale(op, scale)  # scale=self.head_dim ** -0.5 computed in forward changes when head_dim does
    if scale is None:
        n = len(A.shape(q))
        C.mix(A.lay(q, n - 1), f"scaled_dot_product_attention in {A.module_name(op)}: default scale 1/sqrt(head_dim) "
                               "changes when head_dim is pruned")


@rule("prunekit::mha_constraint", structural=True)
def _mha(A, op):
    """nn.MultiheadAttention computes head_dim and its final view from the query width: tie them."""
    q, w, packed = op.args
    E = A.shape(q)[-1]
    where = f"MultiheadAttention {A.module_name(op)}"
    lq = A.lay(q, len(A.shape(q)) - 1)
    if packed:
        try:
            _three, inner = C.split_sizes(A.lay(w, 0), [3, E])
            C.tie(inner, lq, where)
        except C.TieError as e:
            C.pin(lq, f"{where}: {e}")
    else:
        C.tie(A.lay(w, 0), lq, where)
    A.bind(op.module, "embed_dim", lq)
    m = A.modules.get(op.module)
    if m is not None and packed:
        A.bind(op.module, "kdim", lq)
        A.bind(op.module, "vdim", lq)

