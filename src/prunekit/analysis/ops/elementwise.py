"""Elementwise ops (activations, arithmetic, comparisons): every input dim aligned with an output dim is
tied to it (broadcasting from the right); how the output behaves under zeroing is the op's :class:`Zero` kind.
No MACs (the counting convention counts only convolutions, matrix products and attention)."""
from __future__ import annotations

from numbers import Number

from ...capture import TRef
from .. import spaces as C
from ._common import norm_dim, rule
from .registry import Zero, register_many


# ---------------------------------------------------------------- elementwise
ZERO_PRESERVING = {  # f(0) = 0
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "hardtanh", "hardtanh_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "celu_", "selu", "selu_", "mish", "mish_", "tanh",
    "tanh_", "neg", "neg_", "abs", "abs_", "clone", "contiguous", "_to_copy", "alias", "detach", "detach_",
    "lift_fresh", "lift_fresh_copy", "dropout", "native_dropout", "feature_dropout", "sqrt", "sqrt_", "erf",
    "erf_", "sin", "sign", "round", "floor", "ceil", "trunc", "relu6", "_conj", "positive", "view_as_real",
    "square", "atan", "asin", "sinh", "tan", "softshrink", "hardshrink", "nan_to_num", "type_as",
    "_unsafe_masked_index", "prelu", "_prelu_kernel", "rrelu", "rrelu_with_noise", "zero_", "zeros_like"}
NONZERO = {  # f(0) != 0 in general
    "sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "exp_", "log", "log_", "log1p", "expm1",
    "rsqrt", "rsqrt_", "reciprocal", "reciprocal_", "softplus", "cos", "erfc", "logical_not", "bitwise_not",
    "isnan", "isinf", "isfinite", "exp2", "log2", "log10", "cosh", "acos", "logit", "sigmoid_backward",
    "fill_", "fill", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "bernoulli", "bernoulli_", "uniform_", "normal_", "signbit", "log_sigmoid_forward", "xlogy", "frac",
    "_softmax_backward_data", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max",
    "clamp_max_", "pow", "pow_"}
ADD = {"add", "add_", "sub", "sub_", "rsub", "maximum", "minimum", "fmax", "fmin", "hypot", "lerp", "lerp_",
       "addcmul", "addcmul_", "addcdiv", "addcdiv_", "copy_", "copy", "eq", "ne", "lt", "gt", "le", "ge",
       "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "atan2", "fmod",
       "remainder", "floor_divide", "_masked_scale", "masked_fill", "masked_fill_", "masked_scatter"}
MUL = {"mul", "mul_"}
DIV = {"div", "div_", "true_divide"}
WHERE = {"where"}


def elementwise(A, op, zero: Zero) -> None:
    """The rule of every elementwise op: each output dim is tied to the input dims aligned with it
    (broadcasting from the right); the output is zero on masked channels as the ``zero`` kind says."""
    outs = op.outs()
    if not outs:
        return
    out = outs[0]
    out_shape = A.shape(out)
    ndim = len(out_shape)
    tensors = [a for a in op.args if isinstance(a, TRef)] + [v for v in op.kwargs.values() if isinstance(v, TRef)]
    scalars = [a for a in op.args[1:] if isinstance(a, Number) and not isinstance(a, bool)]
    zero = _call_zero(op, zero)
    for d in range(ndim):
        aligned = []  # (tensor, its dim) of every input whose dim lines up with output dim d at full size
        for t in tensors:
            t_shape = A.shape(t)
            k = d - (ndim - len(t_shape))
            if k < 0 or t_shape[k] != out_shape[d]:
                continue
            aligned.append((t, k))
        if out_shape[d] == 1 and not aligned:
            A.set(out, d, C.fresh(1))
            A.set_zero(out, d, False)
            continue
        layout = A.tie(aligned)
        if layout is None:
            layout = C.fresh(out_shape[d], f"broadcast dim of {A.where(op)}")
        A.set(out, d, layout)
        A.set_zero(out, d, _is_zero(A, op, zero, d, aligned, tensors, scalars))
    # a tensor scaled by a Python number: the number may be computed from a size that pruning changes
    if zero in (Zero.MUL, Zero.DIV) and len(tensors) == 1 and len(scalars) == 1 and op.args and op.args[0] == tensors[0]:
        A.note_scale(op, scalars[0], tensors[0])  # e.g. attention scores / math.sqrt(self.head_dim)


def _call_zero(op, zero: Zero) -> Zero:
    """The zero kind of this call: a positive power, a clamp whose range holds 0 and a hardtanh whose range
    holds 0 keep zeros at zero; a hardtanh whose range excludes 0 does not."""
    packet = op.packet
    if packet in ("pow", "pow_"):
        exponent = op.arg("exponent")
        if isinstance(exponent, Number) and exponent > 0:
            return Zero.PRESERVING
    elif packet.startswith("clamp"):
        low, high = op.arg("min"), op.arg("max")
        if (low is None or (isinstance(low, Number) and low <= 0)) \
                and (high is None or (isinstance(high, Number) and high >= 0)) \
                and not any(isinstance(x, TRef) for x in (low, high)):
            return Zero.PRESERVING
    elif packet in ("hardtanh", "hardtanh_"):
        low, high = op.arg("min_val", -1.0), op.arg("max_val", 1.0)
        return Zero.PRESERVING if low <= 0 <= high else Zero.NONE
    return zero


_NEVER_ZERO_ADD = frozenset({"eq", "ne", "lt", "gt", "le", "ge", "masked_fill", "masked_fill_", "lerp", "lerp_"})


def _is_zero(A, op, zero: Zero, d: int, aligned: list, tensors: list, scalars: list) -> bool:
    """Is output dim ``d`` zero on masked channels, given the aligned inputs' zero flags?"""
    flags = [A.zero(t, k) for t, k in aligned]
    if zero is Zero.PRESERVING:
        return bool(flags) and all(flags)
    if zero is Zero.ADD:
        if op.packet in _NEVER_ZERO_ADD:
            return False
        return bool(flags) and len(aligned) == len(tensors) and all(flags) and not any(s != 0 for s in scalars[:1])
    if zero is Zero.MUL:
        return any(flags)
    if zero is Zero.DIV:
        return bool(aligned) and aligned[0][0] == tensors[0] and flags[0]
    if zero is Zero.WHERE:
        return len(tensors) == 3 and all(A.zero(t, k) for t, k in aligned if t != tensors[0]) and len(aligned) >= 2
    return False


def _rule_for(zero: Zero):
    def rule_fn(A, op):
        elementwise(A, op, zero)
    rule_fn.__name__ = rule_fn.__qualname__ = f"elementwise_{zero.name.lower()}"
    return rule_fn


for _names, _zero in ((ZERO_PRESERVING, Zero.PRESERVING), (NONZERO, Zero.NONE), (ADD, Zero.ADD), (MUL, Zero.MUL),
                      (DIV, Zero.DIV), (WHERE, Zero.WHERE)):
    register_many(sorted(_names), _rule_for(_zero), zero=_zero, cost_free=True)


@rule("glu", cost_free=True)
def _glu(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dim = norm_dim(op.arg("dim", -1), n)
    for d in range(n):
        if d == dim:
            try:
                h = A.shape(x)[d] // 2
                a = C.slice_layout(A.lay(x, d), 0, h)
                b = C.slice_layout(A.lay(x, d), h, 2 * h)
                C.tie(a, b, A.where(op))
                A.set(out, d, a)
            except C.TieError as e:
                A.pin_node(x, f"{A.where(op)}: {e}")
        else:
            A.set(out, d, A.lay(x, d))
            A.set_zero(out, d, False)

