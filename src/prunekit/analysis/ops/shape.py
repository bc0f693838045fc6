"""Shape ops: views, reshapes, permutes, slices, splits, concatenation, repeat, roll/flip, padding, pixel and
channel shuffles, as_strided.  They move values without arithmetic (structural: no MACs)."""
from __future__ import annotations

import math

from ...capture import TRef
from .. import spaces as C
from ..experts import EXPERT_MIX, routed
from ._common import norm_dim, norm_dims, rule
from .reductions import CUMULATIVE, MEAN_LIKE, SUM_LIKE

# ---------------------------------------------------------------- views
@rule("view", "_unsafe_view", "reshape", "view_copy", "_reshape_alias", "unflatten", "flatten", "_reshape_copy", structural=True)
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


# module attributes that hold the number of query heads per kv head of grouped-query attention: transformers'
# ``num_key_value_groups`` (repeat_kv), Meta Llama's ``n_rep``, vLLM's ``num_queries_per_kv``
REP_ATTRS = ("num_key_value_groups", "num_kv_groups", "n_rep", "num_queries_per_kv", "n_kv_groups")


def _rep_attr(A, op, n: int) -> str | None:
    """The executing module's query-heads-per-kv-head attribute (see :data:`REP_ATTRS`) when it equals ``n``,
    the size an ``expand`` broadcasts to: the expand is then ``repeat_kv`` and its size follows that attribute."""
    m = A.modules.get(op.module)
    if m is None:
        return None
    hits = [a for a in REP_ATTRS if type(getattr(m, a, None)) is int and getattr(m, a) == n]
    return hits[0] if len(hits) == 1 else None


@rule("expand", "expand_copy", structural=True)
def _expand(A, op):
    x, out = op.args[0], op.outs()[0]
    ish, osh = A.shape(x), A.shape(out)
    off = len(osh) - len(ish)
    for d in range(len(osh)):
        k = d - off
        if k >= 0 and ish[k] == osh[d]:
            A.set(out, d, A.lay(x, k))
            A.set_zero(out, d, A.zero(x, k))
            continue
        attr = _rep_attr(A, op, osh[d]) if osh[d] > 1 else None
        if attr is None:
            A.set(out, d, C.fresh(osh[d], f"broadcast dim of {A.where(op)}"))
            continue
        # repeat_kv (``x[:, :, None].expand(b, kv, n_rep, s, d)``): the copies are the query-head slots of each
        # kv group; n_rep is read from the module attribute, which follows the slots kept.  The values are the
        # same in every slot, so the dim holds channels only through what it is tied to (the query heads)
        lay = C.fresh(osh[d])
        C.tag(lay, "head")
        A.set(out, d, lay)
        A.bind(op.module, attr, lay)


@rule("permute", "permute_copy", structural=True)
def _permute(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    perm = [norm_dim(p, n) for p in op.arg("dims")]
    for d, p in enumerate(perm):
        A.copy_dim(x, p, out, d)


@rule("transpose", "transpose_", "transpose_copy", "swapaxes", "swapdims", structural=True)
def _transpose(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    a = norm_dim(op.arg("dim0", op.arg("axis0")), n)  # swapaxes names them axis0/axis1
    b = norm_dim(op.arg("dim1", op.arg("axis1")), n)
    for d in range(n):
        A.copy_dim(x, b if d == a else a if d == b else d, out, d)


@rule("t", "t_", "numpy_T", structural=True)
def _t(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    for d in range(n):
        A.copy_dim(x, n - 1 - d, out, d)


@rule("unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "unsqueeze_copy", "squeeze_copy", structural=True)
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


@rule("select", "select_copy", structural=True)
def _select(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dim = norm_dim(op.arg("dim"), n)
    if routed(A, x, dim):  # one expert's weights or mask (transformers' eager expert loop): index follows routing
        C.mix(A.lay(x, dim), f"{A.where(op)}: {EXPERT_MIX}")
    else:
        C.pin(A.lay(x, dim), f"{A.where(op)}: selects one index of this dim")
    for d in range(n - 1):
        A.copy_dim(x, d if d < dim else d + 1, out, d)


@rule("unbind", "unbind_copy", structural=True)
def _unbind(A, op):
    x = op.args[0]
    n = len(A.shape(x))
    dim = norm_dim(op.arg("dim", 0), n)
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


@rule("slice", "slice_copy", "narrow", structural=True)
def _slice(A, op):
    x, out = op.args[0], op.outs()[0]
    ish = A.shape(x)
    n = len(ish)
    dim = norm_dim(op.arg("dim", 0), n)
    if op.packet == "narrow":
        first = op.arg("start")
        start, end = _norm_slice(first, first + op.arg("length"), ish[dim])
        step = 1
    else:
        start, end = _norm_slice(op.arg("start"), op.arg("end"), ish[dim])
        step = op.arg("step", 1) or 1
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


@rule("split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes", "split_copy", "split_with_sizes_copy", structural=True)
def _split(A, op):
    x = op.args[0]
    ish = A.shape(x)
    n = len(ish)
    dim = norm_dim(op.arg("dim", 0), n)
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


@rule("cat", "concat", "concatenate", structural=True)
def _cat(A, op):
    tens = [t for t in op.args[0] if isinstance(t, TRef)]
    out = op.outs()[0]
    osh = A.shape(out)
    n = len(osh)
    tens = [t for t in tens if len(A.shape(t)) == n]  # legacy: 1-D empty tensors are skipped by cat
    dim = norm_dim(op.arg("dim", 0), n)
    for d in range(n):
        if d == dim:
            A.set(out, d, C.concat([A.lay(t, d) for t in tens]))
            A.set_zero(out, d, all(A.zero(t, d) for t in tens))
        else:
            A.set(out, d, A.tie([(t, d) for t in tens]))
            A.set_zero(out, d, all(A.zero(t, d) for t in tens))


@rule("stack", structural=True)
def _stack(A, op):
    tens = [t for t in op.args[0] if isinstance(t, TRef)]
    out = op.outs()[0]
    n = len(A.shape(out))
    dim = norm_dim(op.arg("dim", 0), n)
    for d in range(n):
        if d == dim:
            A.set(out, d, C.fresh(A.shape(out)[d], f"stack dim of {A.where(op)}"))
            continue
        k = d if d < dim else d - 1
        A.set(out, d, A.tie([(t, k) for t in tens]))
        A.set_zero(out, d, all(A.zero(t, k) for t in tens))


@rule("repeat", structural=True)
def _repeat(A, op):
    x, out = op.args[0], op.outs()[0]
    reps = list(op.arg("repeats"))
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


@rule("roll", "flip", structural=True)
def _roll(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    dims = op.arg("dims", [])
    dims = norm_dims(dims, n) if dims else list(range(n))
    for d in range(n):
        if d in dims:
            C.pin(A.lay(x, d), f"{A.where(op)}: rolls/flips this dim")
        A.copy_dim(x, d, out, d)


@rule("constant_pad_nd", "pad", structural=True)
def _pad(A, op):
    x, out = op.args[0], op.outs()[0]
    pad = list(op.arg("pad"))
    n = len(A.shape(x))
    value = op.arg("value", 0) or 0
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


@rule("pixel_shuffle", "pixel_unshuffle", structural=True)
def _pixel_shuffle(A, op):
    x, out = op.args[0], op.outs()[0]
    r = int(op.arg("upscale_factor") if op.packet == "pixel_shuffle" else op.arg("downscale_factor"))
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


@rule("channel_shuffle", "native_channel_shuffle", structural=True)
def _channel_shuffle(A, op):
    x, out = op.args[0], op.outs()[0]
    g = int(op.arg("groups"))
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


def _producer(A, ref, before: int):
    """The op (index < ``before``) whose output is tape node ``ref``, or None (inputs, parameters)."""
    nid = A._nid(ref)
    for i in range(min(before, len(A.tape.ops)) - 1, -1, -1):
        if any(r.id == nid for r in A.tape.ops[i].outs()):
            return A.tape.ops[i]
    return None


@rule("as_strided", "as_strided_", "as_strided_copy", structural=True)
def _as_strided(A, op):
    """``as_strided`` reinterprets storage, so in general it rearranges values (pinned).  The one case that
    is an identity on values: the same sizes, no storage offset, and on every dim of size > 1 the stride the
    input already has.  Strides are not on the tape, so the input's are known only for a reduction's output
    (a freshly allocated, contiguous tensor): ``adaptive_avg_pool2d(x, 1)`` of a channels-last ``x`` is
    ``mean(keepdim=True)`` followed by ``as_strided_(out, (N, C, 1, 1), (C, 1, C, C))`` (timm
    ``SelectAdaptivePool2d`` in ConvNeXt's head).  The ATen kernel computes those sizes from its input, so
    they follow pruning."""
    x, out = op.args[0], op.outs()[0]
    size, stride = list(op.arg("size")), list(op.arg("stride"))
    offset = op.arg("storage_offset")
    ish = list(A.shape(x))
    prod = _producer(A, x, op.index)
    identity = (size == ish and offset in (None, 0) and len(stride) == len(size) and prod is not None
                and prod.packet in SUM_LIKE | MEAN_LIKE and len(prod.outs()) == 1
                and prod.packet not in CUMULATIVE)
    if identity:
        contig = [math.prod(ish[k + 1:]) for k in range(len(ish))]
        identity = all(stride[k] == contig[k] for k in range(len(ish)) if ish[k] > 1)
    if not identity:
        A.pin_op(op, f"{A.where(op)}: restrides storage (values rearranged; channels pinned)")
        return
    for d in range(len(ish)):
        A.copy_dim(x, d, out, d)

