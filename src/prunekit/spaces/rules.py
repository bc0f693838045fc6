"""The op-rule table: how each ATen op ties, splits, merges or pins channel spaces.

Each rule receives the analyzer ``A`` and the op record.  It assigns output layouts, ties
input layouts, records which spaces are *mixed* (an op whose result depends on how many
channels there are, e.g. LayerNorm statistics or softmax: removal is then not exactly equal to
zeroing) and which tensors are *zero-valued* when their groups are masked.  An op without a
rule pins every dim it touches, naming the op and the module.
"""
from __future__ import annotations

import math
from numbers import Number
from typing import Callable

from ..capture.tape import OpRecord, TRef
from . import core as C

RULES: dict[str, Callable] = {}


def rule(*names: str):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def arg(op: OpRecord, i: int, name: str, default=None):
    if len(op.args) > i:
        return op.args[i]
    return op.kwargs.get(name, default)


def _nd(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _dims(dims, n: int) -> list[int]:
    if dims is None:
        return list(range(n))
    if isinstance(dims, int):
        dims = [dims]
    if len(dims) == 0:
        return list(range(n))
    return [_nd(d, n) for d in dims]


# ---------------------------------------------------------------- elementwise
ZP_UNARY = {"relu", "relu_", "gelu", "gelu_", "silu", "silu_", "hardswish", "hardswish_", "hardtanh", "hardtanh_",
            "leaky_relu", "leaky_relu_", "elu", "elu_", "celu", "celu_", "selu", "selu_", "mish", "mish_", "tanh",
            "tanh_", "neg", "neg_", "abs", "abs_", "clone", "contiguous", "_to_copy", "alias", "detach", "detach_",
            "lift_fresh", "lift_fresh_copy", "dropout", "native_dropout", "feature_dropout", "sqrt", "sqrt_", "erf",
            "erf_", "sin", "sign", "round", "floor", "ceil", "trunc", "relu6", "_conj", "positive", "view_as_real",
            "square", "atan", "asin", "sinh", "tan", "softshrink", "hardshrink", "nan_to_num", "type_as",
            "_unsafe_masked_index", "prelu", "_prelu_kernel", "rrelu", "rrelu_with_noise", "zero_", "zeros_like"}
NZ_UNARY = {"sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "exp", "exp_", "log", "log_", "log1p", "expm1",
            "rsqrt", "rsqrt_", "reciprocal", "reciprocal_", "softplus", "cos", "erfc", "logical_not", "bitwise_not",
            "isnan", "isinf", "isfinite", "exp2", "log2", "log10", "cosh", "acos", "logit", "sigmoid_backward",
            "fill_", "fill", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
            "bernoulli", "bernoulli_", "uniform_", "normal_", "signbit", "log_sigmoid_forward", "xlogy", "frac",
            "scalar_tensor", "_softmax_backward_data", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max",
            "clamp_max_", "pow", "pow_"}
ADD = {"add", "add_", "sub", "sub_", "rsub", "maximum", "minimum", "fmax", "fmin", "hypot", "lerp", "lerp_",
       "addcmul", "addcmul_", "addcdiv", "addcdiv_", "copy_", "copy", "eq", "ne", "lt", "gt", "le", "ge",
       "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "atan2", "fmod",
       "remainder", "floor_divide", "_masked_scale", "masked_fill", "masked_fill_", "masked_scatter"}
MUL = {"mul", "mul_"}
DIV = {"div", "div_", "true_divide"}
WHERE = {"where"}


def _ew(A, op: OpRecord, kind: str | None):
    outs = op.outs()
    if not outs:
        return
    out = outs[0]
    oshape = A.shape(out)
    n = len(oshape)
    tens = [a for a in op.args if isinstance(a, TRef)] + [v for v in op.kwargs.values() if isinstance(v, TRef)]
    scal = [a for a in op.args[1:] if isinstance(a, Number) and not isinstance(a, bool)]
    if op.packet in ("pow", "pow_") and len(op.args) > 1 and isinstance(op.args[1], Number) and op.args[1] > 0:
        kind = "zp"
    if op.packet.startswith("clamp"):
        lo, hi = arg(op, 1, "min"), arg(op, 2, "max")
        if op.packet.startswith("clamp_min"):
            lo, hi = arg(op, 1, "min"), None
        elif op.packet.startswith("clamp_max"):
            lo, hi = None, arg(op, 1, "max")
        if (lo is None or (isinstance(lo, Number) and lo <= 0)) and (hi is None or (isinstance(hi, Number) and hi >= 0)) \
                and not any(isinstance(x, TRef) for x in (lo, hi)):
            kind = "zp"
    if op.packet in ("hardtanh", "hardtanh_"):
        lo, hi = arg(op, 1, "min_val", -1.0), arg(op, 2, "max_val", 1.0)
        kind = "zp" if lo <= 0 <= hi else None
    for d in range(n):
        lay = None
        full = []
        for t in tens:
            ts = A.shape(t)
            k = d - (n - len(ts))
            if k < 0 or ts[k] != oshape[d]:
                continue
            full.append((t, k))
        if oshape[d] == 1 and not full:
            A.set(out, d, C.fresh(1))
            A.set_zero(out, d, False)
            continue
        for t, k in full:
            l = A.lay(t, k)
            if lay is None:
                lay = l
            else:
                C.tie(lay, l, A.where(op))
        if lay is None:
            lay = C.fresh(oshape[d], f"broadcast dim of {A.where(op)}")
        A.set(out, d, lay)
        zs = [A.zero(t, k) for t, k in full]
        if kind == "zp":
            z = bool(zs) and all(zs)
        elif kind == "add":
            z = bool(zs) and len(full) == len(tens) and all(zs) and not any(s != 0 for s in scal[:1])
            if op.packet in ("eq", "ne", "lt", "gt", "le", "ge", "masked_fill", "masked_fill_", "lerp", "lerp_"):
                z = False
        elif kind == "mul":
            z = any(zs)
        elif kind == "div":
            z = bool(full) and full[0][0] == tens[0] and zs[0]
        elif kind == "where":
            z = len(tens) == 3 and all(A.zero(t, k) for t, k in full if t != tens[0]) and len(full) >= 2
        else:
            z = False
        A.set_zero(out, d, z)
    # in-place ops: the mutated tensor now carries the result (same layout, tied above)
    if kind in ("mul", "div") and len(tens) == 1 and len(scal) == 1 and op.args and op.args[0] == tens[0]:
        A.note_scale(op, scal[0], tens[0])  # e.g. attention scores / math.sqrt(self.head_dim)


for _n in ZP_UNARY:
    RULES[_n] = lambda A, op: _ew(A, op, "zp")
for _n in NZ_UNARY:
    RULES[_n] = lambda A, op: _ew(A, op, None)
for _n in ADD:
    RULES[_n] = lambda A, op: _ew(A, op, "add")
for _n in MUL:
    RULES[_n] = lambda A, op: _ew(A, op, "mul")
for _n in DIV:
    RULES[_n] = lambda A, op: _ew(A, op, "div")
RULES["where"] = lambda A, op: _ew(A, op, "where")


@rule("glu")
def _glu(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dim = _nd(arg(op, 1, "dim", -1), n)
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


# ---------------------------------------------------------------- views
@rule("view", "_unsafe_view", "reshape", "view_copy", "_reshape_alias", "unflatten", "flatten", "_reshape_copy")
def _reshape(A, op):
    x, out = op.args[0], op.outs()[0]
    ish, osh = A.shape(x), A.shape(out)
    if math.prod(ish) != math.prod(osh):
        A.pin_node(x, f"{A.where(op)}: element count changes")
        return
    i = j = 0
    while i < len(ish) or j < len(osh):
        # collect a minimal chunk of dims with equal element counts
        ci, cj = [], []
        pi = pj = 1
        if i < len(ish):
            ci.append(i); pi *= ish[i]; i += 1
        if j < len(osh):
            cj.append(j); pj *= osh[j]; j += 1
        while pi != pj:
            if pi < pj and i < len(ish):
                ci.append(i); pi *= ish[i]; i += 1
            elif pj < pi and j < len(osh):
                cj.append(j); pj *= osh[j]; j += 1
            else:
                break
        # trailing size-1 dims
        ins = [A.lay(x, k) for k in ci if ish[k] != 1]
        outs_big = [k for k in cj if osh[k] != 1]
        for k in cj:
            if osh[k] == 1:
                A.set(out, k, C.fresh(1))
        zero = all(A.zero(x, k) for k in ci if ish[k] != 1) if ins else False
        if not outs_big:
            continue
        try:
            merged = ins[0] if len(ins) == 1 else C.merge(ins) if ins else C.fresh(1)
            if len(outs_big) == 1:
                A.set(out, outs_big[0], merged)
            else:
                parts = C.split_sizes(merged, [osh[k] for k in outs_big])
                for k, l in zip(outs_big, parts):
                    A.set(out, k, l)
            for k in outs_big:
                A.set_zero(out, k, zero)
            A.bind_reshape(op, [A.lay(out, k) for k in outs_big], [osh[k] for k in outs_big])
        except C.TieError as e:
            msg = f"{A.where(op)}: {e}"
            for l in ins:
                C.pin(l, msg)
            for k in outs_big:
                A.set(out, k, C.fresh(osh[k], msg))


@rule("expand", "expand_copy")
def _expand(A, op):
    x, out = op.args[0], op.outs()[0]
    ish, osh = A.shape(x), A.shape(out)
    off = len(osh) - len(ish)
    for d in range(len(osh)):
        k = d - off
        if k >= 0 and ish[k] == osh[d]:
            A.set(out, d, A.lay(x, k))
            A.set_zero(out, d, A.zero(x, k))
        else:
            A.set(out, d, C.fresh(osh[d], f"broadcast dim of {A.where(op)}"))


@rule("permute", "permute_copy")
def _permute(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    perm = [_nd(p, n) for p in arg(op, 1, "dims")]
    for d, p in enumerate(perm):
        A.copy_dim(x, p, out, d)


@rule("transpose", "transpose_", "transpose_copy", "swapaxes", "swapdims")
def _transpose(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    a, b = _nd(op.args[1], n), _nd(op.args[2], n)
    for d in range(n):
        A.copy_dim(x, b if d == a else a if d == b else d, out, d)


@rule("t", "t_", "numpy_T")
def _t(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    for d in range(n):
        A.copy_dim(x, n - 1 - d, out, d)


@rule("unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "unsqueeze_copy", "squeeze_copy")
def _squeeze(A, op):
    x, out = op.args[0], op.outs()[0]
    ish, osh = A.shape(x), A.shape(out)
    big_in = [k for k in range(len(ish)) if ish[k] != 1]
    big_out = [k for k in range(len(osh)) if osh[k] != 1]
    for k in range(len(osh)):
        if osh[k] == 1:
            A.set(out, k, C.fresh(1))
    for ki, ko in zip(big_in, big_out):
        A.copy_dim(x, ki, out, ko)


@rule("select", "select_copy")
def _select(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dim = _nd(op.args[1], n)
    C.pin(A.lay(x, dim), f"{A.where(op)}: selects one index of this dim")
    for d in range(n - 1):
        A.copy_dim(x, d if d < dim else d + 1, out, d)


@rule("unbind", "unbind_copy")
def _unbind(A, op):
    x = op.args[0]
    n = len(A.shape(x))
    dim = _nd(arg(op, 1, "dim", 0), n)
    C.pin(A.lay(x, dim), f"{A.where(op)}: unbinds this dim")
    for out in op.outs():
        for d in range(n - 1):
            A.copy_dim(x, d if d < dim else d + 1, out, d)


def _norm_slice(start, end, size):
    start = 0 if start is None else start
    end = size if end is None else end
    if start < 0:
        start += size
    if end < 0:
        end += size
    return max(0, min(start, size)), max(0, min(end, size))


@rule("slice", "slice_copy", "narrow")
def _slice(A, op):
    x, out = op.args[0], op.outs()[0]
    ish = A.shape(x)
    n = len(ish)
    dim = _nd(arg(op, 1, "dim", 0), n)
    if op.packet == "narrow":
        s0 = arg(op, 2, "start")
        start, end = _norm_slice(s0, s0 + arg(op, 3, "length"), ish[dim])
        step = 1
    else:
        start, end = _norm_slice(arg(op, 2, "start"), arg(op, 3, "end"), ish[dim])
        step = arg(op, 4, "step", 1) or 1
    for d in range(n):
        if d != dim:
            A.copy_dim(x, d, out, d)
    size = A.shape(out)[dim]
    if start == 0 and end == ish[dim] and step == 1:
        A.copy_dim(x, dim, out, dim)
        return
    if step != 1:
        msg = f"{A.where(op)}: strided slice of this dim"
        C.pin(A.lay(x, dim), msg)
        A.set(out, dim, C.fresh(size, msg))
        return
    try:
        A.set(out, dim, C.slice_layout(A.lay(x, dim), start, end))
        A.set_zero(out, dim, A.zero(x, dim))
        lx = A.lay(x, dim)
        A.splits.append((A.where(op), [C.slice_layout(lx, 0, start), C.slice_layout(lx, start, end),
                                       C.slice_layout(lx, end, ish[dim])]))
    except C.TieError as e:
        msg = f"{A.where(op)}: {e}"
        C.pin(A.lay(x, dim), msg)
        A.set(out, dim, C.fresh(size, msg))


@rule("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "split_copy", "split_with_sizes_copy")
def _split(A, op):
    x = op.args[0]
    ish = A.shape(x)
    n = len(ish)
    dim = _nd(arg(op, 2, "dim", 0), n)
    pos = 0
    outs = op.outs()
    sizes = [A.shape(o)[dim] for o in outs]
    # split.Tensor(split_size) is also what chunk() records: chunk recomputes the size from the (pruned) total,
    # so equal parts must shrink together, and unequal parts (n % chunks != 0) cannot follow pruning at all
    by_size = op.packet in ("split", "unsafe_split", "split_copy") and len(outs) > 1
    if by_size and len(set(sizes)) > 1:
        C.pin(A.lay(x, dim), f"{A.where(op)}: split/chunk into unequal parts {sizes} (sizes cannot follow pruning)")
    first = None
    parts = []
    for out in outs:
        size = A.shape(out)[dim]
        for d in range(n):
            if d != dim:
                A.copy_dim(x, d, out, d)
        try:
            part = C.slice_layout(A.lay(x, dim), pos, pos + size) if size != ish[dim] else A.lay(x, dim)
            A.set(out, dim, part)
            A.set_zero(out, dim, A.zero(x, dim))
            if parts is not None:
                parts.append(part)
            if by_size:
                if first is None:
                    first = part
                else:
                    C.tie(first, part, f"{A.where(op)}: chunk parts shrink together")
        except C.TieError as e:
            msg = f"{A.where(op)}: {e}"
            C.pin(A.lay(x, dim), msg)
            A.set(out, dim, C.fresh(size, msg))
            parts = None
        pos += size
    if parts and len(parts) > 1:
        A.splits.append((A.where(op), parts))


@rule("cat", "concat", "concatenate")
def _cat(A, op):
    tens = [t for t in op.args[0] if isinstance(t, TRef)]
    out = op.outs()[0]
    osh = A.shape(out)
    n = len(osh)
    tens = [t for t in tens if len(A.shape(t)) == n]  # legacy: 1-D empty tensors are skipped by cat
    dim = _nd(arg(op, 1, "dim", 0), n)
    for d in range(n):
        if d == dim:
            A.set(out, d, C.concat([A.lay(t, d) for t in tens]))
            A.set_zero(out, d, all(A.zero(t, d) for t in tens))
        else:
            lay = None
            for t in tens:
                if lay is None:
                    lay = A.lay(t, d)
                else:
                    C.tie(lay, A.lay(t, d), A.where(op))
            A.set(out, d, lay)
            A.set_zero(out, d, all(A.zero(t, d) for t in tens))


@rule("stack")
def _stack(A, op):
    tens = [t for t in op.args[0] if isinstance(t, TRef)]
    out = op.outs()[0]
    n = len(A.shape(out))
    dim = _nd(arg(op, 1, "dim", 0), n)
    for d in range(n):
        if d == dim:
            A.set(out, d, C.fresh(A.shape(out)[d], f"stack dim of {A.where(op)}"))
            continue
        k = d if d < dim else d - 1
        lay = None
        for t in tens:
            if lay is None:
                lay = A.lay(t, k)
            else:
                C.tie(lay, A.lay(t, k), A.where(op))
        A.set(out, d, lay)
        A.set_zero(out, d, all(A.zero(t, k) for t in tens))


@rule("repeat")
def _repeat(A, op):
    x, out = op.args[0], op.outs()[0]
    reps = list(arg(op, 1, "repeats"))
    ish, osh = A.shape(x), A.shape(out)
    off = len(osh) - len(ish)
    for d in range(len(osh)):
        k = d - off
        if k < 0:
            A.set(out, d, C.fresh(osh[d], f"repeat dim of {A.where(op)}"))
        elif reps[d] == 1:
            A.copy_dim(x, k, out, d)
        else:
            A.set(out, d, C.merge([C.fresh(reps[d], f"repeat dim of {A.where(op)}"), A.lay(x, k)]))
            A.set_zero(out, d, A.zero(x, k))


@rule("roll", "flip")
def _roll(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dims = arg(op, 2, "dims", []) if op.packet == "roll" else arg(op, 1, "dims", [])
    dims = _dims(dims, n) if dims else list(range(n))
    for d in range(n):
        if d in dims:
            C.pin(A.lay(x, d), f"{A.where(op)}: rolls/flips this dim")
        A.copy_dim(x, d, out, d)


@rule("constant_pad_nd", "pad")
def _pad(A, op):
    x, out = op.args[0], op.outs()[0]
    pad = list(arg(op, 1, "pad"))
    n = len(A.shape(x))
    value = arg(op, 2, "value", 0) or 0
    padded = set()
    for i in range(0, len(pad), 2):
        d = n - 1 - i // 2
        if pad[i] or pad[i + 1]:
            padded.add(d)
    for d in range(n):
        if d in padded:
            msg = f"{A.where(op)}: pads this dim"
            C.pin(A.lay(x, d), msg)
            A.set(out, d, C.fresh(A.shape(out)[d], msg))
        else:
            A.copy_dim(x, d, out, d)
            A.set_zero(out, d, A.zero(x, d) and value == 0)


# ---------------------------------------------------------------- reductions
SUM_LIKE = {"sum", "nansum", "linalg_vector_norm", "norm", "count_nonzero", "any", "all"}
MEAN_LIKE = {"mean", "nanmean", "amax", "amin", "var", "std", "var_mean", "std_mean", "logsumexp", "prod", "argmax",
             "argmin", "max", "min", "median", "nanmedian", "mode", "aminmax", "cumsum", "cumprod", "logcumsumexp",
             "cummax", "cummin"}


@rule(*(SUM_LIKE | MEAN_LIKE))
def _reduce(A, op):
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
    elif op.packet in ("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"):
        d = _nd(arg(op, 1, "dim"), n)
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
    rdims = _dims(dims, n) if n else []
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


@rule("_softmax", "softmax", "_safe_softmax", "_log_softmax", "log_softmax", "special_softmax")
def _softmax(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dim = _nd(arg(op, 1, "dim"), n)
    if A.shape(x)[dim] > 1:
        C.mix(A.lay(x, dim), f"{A.where(op)}: softmax over these channels")
    for d in range(n):
        A.copy_dim(x, d, out, d)
        A.set_zero(out, d, False)


# ---------------------------------------------------------------- producers
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
      "conv_transpose3d")
def _conv(A, op):
    x, w = op.args[0], op.args[1]
    b = arg(op, 2, "bias")
    if op.packet in ("convolution", "_convolution", "convolution_overrideable"):
        transposed = bool(arg(op, 6, "transposed", False))
        groups = int(arg(op, 8, "groups", 1))
    elif op.packet.startswith("conv_transpose"):
        transposed, groups = True, int(arg(op, 6, "groups", 1))
    else:
        transposed, groups = False, int(arg(op, 6, "groups", 1))
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


@rule("addmm", "mm", "bmm", "baddbmm", "addbmm", "matmul", "_addmm_activation")
def _mm(A, op):
    if op.packet in ("addmm", "baddbmm", "_addmm_activation", "addbmm"):
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
        lay = None
        zs = []
        for t, k, s in ((a, ka, sa), (b, kb, sb)):
            if k >= 0 and s[k] == so[d]:
                l = A.lay(t, k)
                zs.append(A.zero(t, k))
                if lay is None:
                    lay = l
                else:
                    C.tie(lay, l, where)
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


@rule("embedding")
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


# ---------------------------------------------------------------- norms
@rule("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
      "_native_batch_norm_legit_functional", "batch_norm", "cudnn_batch_norm", "miopen_batch_norm",
      "_batch_norm_with_update", "_batch_norm_no_update", "native_batch_norm_legit")
def _batchnorm(A, op):
    x = op.args[0]
    outs = op.outs()
    where = A.where(op)
    n = len(A.shape(x))
    C_ = A.shape(x)[1] if n > 1 else A.shape(x)[0]
    cd = 1 if n > 1 else 0
    lx = A.lay(x, cd)
    w = op.args[1] if len(op.args) > 1 else None
    for t in op.args[1:5]:
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
    if "no_stats" in op.name or ("no_training" not in op.name and bool(arg(op, 5, "training", False))):
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


@rule("native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm")
def _layernorm(A, op):
    x = op.args[0]
    shape = list(arg(op, 1, "normalized_shape"))
    w = arg(op, 2, "weight")
    b = arg(op, 3, "bias") if op.packet in ("native_layer_norm", "layer_norm") else None
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


@rule("native_group_norm", "group_norm")
def _groupnorm(A, op):
    x = op.args[0]
    w, b = arg(op, 1, "weight"), arg(op, 2, "bias")
    G = int(op.args[6]) if op.packet == "native_group_norm" else int(op.args[1])
    if op.packet == "group_norm":
        w, b = arg(op, 2, "weight"), arg(op, 3, "bias")
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


# ---------------------------------------------------------------- spatial ops keeping (N, C)
SPATIAL = {"max_pool2d_with_indices", "max_pool1d_with_indices", "max_pool3d_with_indices", "max_pool2d", "max_pool1d",
           "max_pool3d", "avg_pool2d", "avg_pool1d", "avg_pool3d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
           "adaptive_avg_pool1d", "adaptive_avg_pool3d", "_adaptive_avg_pool3d", "adaptive_max_pool2d",
           "adaptive_max_pool1d", "adaptive_max_pool3d", "upsample_nearest2d", "upsample_nearest1d",
           "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d",
           "upsample_trilinear3d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa", "_upsample_nearest_exact1d",
           "_upsample_nearest_exact3d", "_upsample_bicubic2d_aa", "reflection_pad2d", "reflection_pad1d",
           "replication_pad2d", "replication_pad1d", "reflection_pad3d", "replication_pad3d", "lp_pool2d",
           "fractional_max_pool2d", "grid_sampler_2d", "grid_sampler", "im2col_unused"}


@rule(*SPATIAL)
def _spatial(A, op):
    x = op.args[0]
    xs = A.shape(x)
    for out in op.outs():
        osh = A.shape(out)
        if len(osh) != len(xs):
            continue
        lead = 2 if len(xs) >= 3 else 1
        for d in range(len(osh)):
            if d < lead and osh[d] == xs[d]:
                A.copy_dim(x, d, out, d)
            else:
                A.set(out, d, C.fresh_nonchannel(osh[d], f"{A.where(op)}: spatial dim"))
                # the input's spatial positions are resampled/pooled together: removing one (e.g. a row of a
                # position-embedding table that is interpolated to the image grid) changes every output
                C.pin(A.lay(x, d), f"{A.where(op)}: spatial dim resampled by {op.packet}")
    if op.packet.startswith("grid_sampler"):
        A.pin_node(op.args[1], f"{A.where(op)}: sampling grid")


@rule("pixel_shuffle", "pixel_unshuffle")
def _pixel_shuffle(A, op):
    x, out = op.args[0], op.outs()[0]
    r = int(op.args[1])
    xs, osh = A.shape(x), A.shape(out)
    n = len(xs)
    cd = n - 3
    for d in range(cd):
        A.copy_dim(x, d, out, d)
    where = A.where(op)
    try:
        if op.packet == "pixel_shuffle":
            lc, _r = C.split_sizes(A.lay(x, cd), [osh[cd], r * r])
            C.pin(_r, f"{where}: sub-pixel channels")
            A.set(out, cd, lc)
        else:
            A.set(out, cd, C.merge([A.lay(x, cd), C.fresh(r * r, f"{where}: sub-pixel channels")]))
        A.set_zero(out, cd, A.zero(x, cd))
    except C.TieError as e:
        A.pin_node(x, f"{where}: {e}")
    for d in range(cd + 1, n):
        A.set(out, d, C.fresh_nonchannel(osh[d], f"{where}: spatial dim"))


@rule("channel_shuffle", "native_channel_shuffle")
def _channel_shuffle(A, op):
    x, out = op.args[0], op.outs()[0]
    g = int(op.args[1])
    xs = A.shape(x)
    where = A.where(op)
    for d in range(len(xs)):
        if d != 1:
            A.copy_dim(x, d, out, d)
    try:
        lg, lc = C.split_sizes(A.lay(x, 1), [g, xs[1] // g])
        A.set(out, 1, C.merge([lc, lg]))
        A.set_zero(out, 1, A.zero(x, 1))
        mod = A.module_of(op, ("ChannelShuffle",))
        if mod is not None:
            A.bind(mod, "groups", lg)
        else:  # F.channel_shuffle(x, g): g is a constant of the forward, so the number of groups cannot change
            C.pin(lg, f"{where}: the number of groups is a constant argument")
    except C.TieError as e:
        A.pin_node(x, f"{where}: {e}")


# ---------------------------------------------------------------- attention
def _sdpa(A, op):
    q, k, v = op.args[0], op.args[1], op.args[2]
    outs = op.outs()
    out = outs[0]
    where = A.where(op)
    nq = len(A.shape(q))
    for d in range(nq - 2):  # batch / heads
        lay = A.lay(q, d)
        for t in (k, v):
            ts = A.shape(t)
            if ts[d] == A.shape(q)[d]:
                C.tie(lay, A.lay(t, d), where)
            else:
                C.pin(lay, f"{where}: grouped-query heads")
                C.pin(A.lay(t, d), f"{where}: grouped-query heads")
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
    mask = arg(op, 3, "attn_mask") if "flash" not in op.packet else None
    if isinstance(mask, TRef):
        C.pin(A.lay(mask, len(A.shape(mask)) - 1), f"{where}: attention mask")


for _n in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
           "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
           "_scaled_dot_product_fused_attention_overrideable"):
    RULES[_n] = _sdpa


@rule("prunekit.sdpa_scale")
def _sdpa_scale(A, op):
    q, scale = op.args[0], op.args[1]
    if isinstance(scale, Number) and not isinstance(scale, bool):
        A.note_scale(op, scale)  # scale=self.head_dim ** -0.5 computed in forward changes when head_dim does
    if scale is None:
        n = len(A.shape(q))
        C.mix(A.lay(q, n - 1), f"scaled_dot_product_attention in {A.module_name(op)}: default scale 1/sqrt(head_dim) "
                               "changes when head_dim is pruned")


# ---------------------------------------------------------------- creation / misc
@rule("empty", "zeros", "ones", "full", "arange", "empty_strided", "rand", "randn", "randint", "linspace",
      "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided", "eye", "scalar_tensor", "tensor",
      "_to_dense", "randperm", "tril_indices", "triu_indices", "logspace")
def _create(A, op):
    for out in op.outs():
        for d, s in enumerate(A.shape(out)):
            A.set(out, d, C.fresh(s, f"{A.where(op)}: tensor created with a fixed size"))


@rule("tril", "triu", "tril_", "triu_")
def _tri(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    for d in range(n):
        if d >= n - 2:
            C.pin(A.lay(x, d), f"{A.where(op)}: triangular mask")
        A.copy_dim(x, d, out, d)


@rule("index_select")
def _index_select(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dim = _nd(op.args[1], n)
    A.pin_node(op.args[2], f"{A.where(op)}: index tensor")
    for d in range(n):
        if d == dim:
            msg = f"{A.where(op)}: indexes this dim"
            C.pin(A.lay(x, d), msg)
            A.set(out, d, C.fresh(A.shape(out)[d], msg))
        else:
            A.copy_dim(x, d, out, d)


@rule("index", "_unsafe_index")
def _index(A, op):
    x, out = op.args[0], op.outs()[0]
    idx = list(op.args[1])
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


@rule("masked_select", "nonzero", "gather", "scatter", "scatter_add", "scatter_reduce", "index_put", "index_put_",
      "index_add", "index_copy", "index_fill", "take", "unfold", "im2col", "col2im", "diagonal", "diag", "diag_embed", "sort", "topk", "kthvalue", "unique", "_unique2",
      "searchsorted", "bucketize", "histc", "one_hot", "multinomial", "nonzero_static", "scatter_",
      "masked_scatter_", "take_along_dim", "embedding_bag", "_embedding_bag", "fft_rfft2", "fft_irfft2",
      "_fft_r2c", "_fft_c2r", "_fft_c2c", "view_as_complex")
def _pin_all(A, op):
    A.pin_op(op, f"{A.where(op)}: op rearranges or indexes values (channels pinned)")


def _producer(A, ref, before: int):
    """The op (index < ``before``) whose output is tape node ``ref``, or None (inputs, parameters)."""
    nid = A._nid(ref)
    for i in range(min(before, len(A.tape.ops)) - 1, -1, -1):
        if any(r.id == nid for r in A.tape.ops[i].outs()):
            return A.tape.ops[i]
    return None


@rule("as_strided", "as_strided_", "as_strided_copy")
def _as_strided(A, op):
    """``as_strided`` reinterprets storage, so in general it rearranges values (pinned).  The one case that
    is an identity on values: the same sizes, no storage offset, and on every dim of size > 1 the stride the
    input already has.  Strides are not on the tape, so the input's are known only for a reduction's output
    (a freshly allocated, contiguous tensor): ``adaptive_avg_pool2d(x, 1)`` of a channels-last ``x`` is
    ``mean(keepdim=True)`` followed by ``as_strided_(out, (N, C, 1, 1), (C, 1, C, C))`` (timm
    ``SelectAdaptivePool2d`` in ConvNeXt's head).  The ATen kernel computes those sizes from its input, so
    they follow pruning."""
    x, out = op.args[0], op.outs()[0]
    size, stride = list(arg(op, 1, "size")), list(arg(op, 2, "stride"))
    offset = arg(op, 3, "storage_offset")
    ish = list(A.shape(x))
    prod = _producer(A, x, op.index)
    identity = (size == ish and offset in (None, 0) and len(stride) == len(size) and prod is not None
                and prod.packet in SUM_LIKE | MEAN_LIKE and len(prod.outs()) == 1
                and prod.packet not in ("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"))
    if identity:
        contig = [math.prod(ish[k + 1:]) for k in range(len(ish))]
        identity = all(stride[k] == contig[k] for k in range(len(ish)) if ish[k] > 1)
    if not identity:
        A.pin_op(op, f"{A.where(op)}: restrides storage (values rearranged; channels pinned)")
        return
    for d in range(len(ish)):
        A.copy_dim(x, d, out, d)


@rule("prunekit.mha_constraint")
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
