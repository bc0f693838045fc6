"""The FLOPs table: MACs per ATen op, as a function of every dim's (kept) size.

One table serves counting (``pk.count``), FLOPs targets and the differentiable FLOPs loss:
a formula receives a ``size(node_ref, dim)`` callable, which returns either the captured size
or the size after removing units.  Convention (same as ``torch.utils.flop_counter``): only
convolutions, matrix products and attention are counted; FLOPs = 2 x MACs.
"""
from __future__ import annotations

import math
from typing import Callable

from ..capture.tape import OpRecord, TRef

SizeFn = Callable[[TRef, int], int]


def _numel(size: SizeFn, ref: TRef, ndim: int) -> int:
    return math.prod(size(ref, d) for d in range(ndim))


def _conv(op: OpRecord, size: SizeFn, shape) -> int:
    x, w = op.args[0], op.args[1]
    out = op.outs()[0]
    if op.packet in ("convolution", "_convolution", "convolution_overrideable"):
        transposed = bool(op.args[6]) if len(op.args) > 6 else False
    else:
        transposed = op.packet.startswith("conv_transpose")
    wdims = len(shape(w))
    per = math.prod(size(w, d) for d in range(1, wdims))
    if transposed:
        return _numel(size, x, len(shape(x))) * per
    return _numel(size, out, len(shape(out))) * per


def _mm(op: OpRecord, size: SizeFn, shape) -> int:
    if op.packet in ("addmm", "baddbmm", "_addmm_activation", "addbmm"):
        a = op.args[1]
    else:
        a = op.args[0]
    out = op.outs()[0]
    na = len(shape(a))
    return _numel(size, out, len(shape(out))) * size(a, na - 1)


def _sdpa(op: OpRecord, size: SizeFn, shape) -> int:
    q, k, v = op.args[0], op.args[1], op.args[2]
    n = len(shape(q))
    lead = math.prod(size(q, d) for d in range(n - 2))
    L, S = size(q, n - 2), size(k, n - 2)
    return lead * L * S * (size(q, n - 1) + size(v, n - 1))


MACS: dict[str, Callable] = {}
for _n in ("convolution", "_convolution", "convolution_overrideable", "conv2d", "conv1d", "conv3d",
           "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "cudnn_convolution", "mkldnn_convolution"):
    MACS[_n] = _conv
for _n in ("addmm", "mm", "bmm", "baddbmm", "_addmm_activation", "matmul", "addbmm"):
    MACS[_n] = _mm
for _n in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"):
    MACS[_n] = _sdpa


def op_macs(op: OpRecord, size: SizeFn, shape) -> int:
    fn = MACS.get(op.packet)
    return int(fn(op, size, shape)) if fn is not None else 0
