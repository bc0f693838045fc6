"""Run the op-rule table over a tape and build pruning groups."""
from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..capture import OpRecord, Tape, TRef
from . import experts as E
from . import modules as M
from . import spaces as C
from .ops.registry import _SPECS, lookup as _lookup
from .ops.shape import REP_ATTRS

log = logging.getLogger("prunekit.spaces")

# layers whose size attributes are all known (``ModuleSpec.infer_attrs=False`` in analysis/modules.py) are never
# bound by the reshape heuristic; these names never are, on any module
_ATTR_DENY = {"training", "in_channels", "out_channels", "in_features", "out_features", "num_classes", "img_size",
              "patch_size", "num_features",
              # transformers attention: a layer's index and its attention window are not widths
              "layer_idx", "sliding_window"}


_VIEWLIKE = {"t", "transpose", "permute", "view", "_unsafe_view", "reshape", "expand", "_to_copy", "clone",
             "contiguous", "alias", "detach", "unsqueeze", "squeeze", "slice", "select", "lift_fresh"}


def module_label(name: str) -> str:
    """A module name for display: the root module (name "") shows as ``<root>``."""
    return name or "<root>"


@dataclass
class Member:
    """One parameter/buffer dim that a group owns part of."""

    fqn: str
    dim: int
    offset: int  # start of the term inside the dim
    sizes: tuple[int, ...]  # sizes of the term's leaf factors (row-major)
    pos: int  # which factor is the group's leaf

    def indices(self, units: torch.Tensor) -> torch.Tensor:
        """Sorted indices along ``dim`` owned by ``units`` (sorted, unique) of the leaf."""
        if len(self.sizes) == 1:  # the common case: the leaf is the whole term
            return units + self.offset
        strides = [math.prod(self.sizes[k + 1:]) for k in range(len(self.sizes))]
        idx = torch.zeros((), dtype=torch.long)
        for k, (n, st) in enumerate(zip(self.sizes, strides)):
            r = units if k == self.pos else torch.arange(n)
            shape = [1] * len(self.sizes)
            shape[k] = -1
            idx = idx + (r * st).reshape(shape)
        return (idx.reshape(-1) + self.offset).sort().values


@dataclass
class Binding:
    module: str
    attr: str
    layouts: Any  # Layout or list[Layout]
    default: Any = None


@dataclass
class Group:
    """A set of channel units that must be removed together."""

    id: int
    size: int
    unit: str
    prunable: bool
    reason: str
    exact: bool
    inexact_reasons: list[str]
    modules: list[str]
    members: list[Member]
    source: list[str] = field(default_factory=list)
    leaf_id: int = -1
    min_keep: int = 1  # units a plan must keep (an expert group: the router's top-k)
    multiple_of: int = 1  # the kept units must be a multiple of this (a kernel's alignment, e.g. _grouped_mm)
    multiple_why: str = ""

    def slices(self, units: Iterable[int]) -> list[tuple[str, int, torch.Tensor]]:
        """Every (param_fqn, dim, indices) owned by ``units`` of this group."""
        u = _units_tensor(units, self.size, self.id)
        return [(m.fqn, m.dim, m.indices(u)) for m in self.members]

    @property
    def dependents(self) -> list[str]:
        return [m for m in self.modules if m not in self.source]

    def describe(self) -> str:
        src = ", ".join(map(module_label, self.source)) or "(none)"
        dep = ", ".join(map(module_label, self.dependents)) or "(none)"
        return f"group {self.id}: source {src}; dependents {dep}"

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"pinned ({self.reason})"
        return f"Group(id={self.id}, unit={self.unit!r}, size={self.size}, exact={self.exact}, {state})"


def unit_indices(gid: int, units: Iterable[int]) -> list[int]:
    """The unit indices of one plan entry as a list of ints, checked: every index an integer (an int, a numpy
    or 0-d tensor integer, or an integer tensor; not a float, bool or float tensor) and listed once.  The one
    check for plans (``pk.prune``, ``pk.mask``, ``group.slices``): a ValueError names the group and the fix."""
    if isinstance(units, torch.Tensor):
        if units.dtype == torch.bool or units.dtype.is_floating_point or units.dtype.is_complex:
            raise ValueError(f"group {gid}: unit indices must be integers, got a {units.dtype} tensor; pass the "
                             "indices of the units to drop (e.g. mask.nonzero().flatten(), or .long() after "
                             "rounding explicitly)")
        vals = [int(v) for v in units.reshape(-1).tolist()]
    else:
        if isinstance(units, (str, bytes)) or not isinstance(units, Iterable):
            raise TypeError(f"group {gid}: units must be an iterable of ints (the indices of the units to drop), "
                            f"got {type(units).__name__}")
        vals = []
        for x in units:
            bad = isinstance(x, bool) or type(x).__name__ in ("bool_", "bool") or (
                isinstance(x, torch.Tensor) and (x.dtype == torch.bool or x.numel() != 1))
            try:
                v = operator.index(x) if not bad else None
            except TypeError:
                v = None
            if v is None:
                raise ValueError(f"group {gid}: unit indices must be integers, got {x!r} "
                                 f"({type(x).__name__}); pass whole unit numbers such as [0, 3] (round floats "
                                 "yourself if that is what you mean)")
            vals.append(v)
    if len(set(vals)) != len(vals):
        seen: set[int] = set()
        dups = sorted({v for v in vals if v in seen or seen.add(v)})
        raise ValueError(f"group {gid}: unit {', '.join(map(str, dups[:8]))} listed more than once; list each unit "
                         "to drop once (e.g. sorted(set(units)))")
    return vals


def _units_tensor(units: Iterable[int], size: int, gid: int) -> torch.Tensor:
    if isinstance(units, torch.Tensor) and units.dtype == torch.long and units.dim() == 1:
        u = torch.unique(units)  # sorted; a plan's units usually arrive as a tensor (no per-element Python)
        if u.numel() != units.numel():
            unit_indices(gid, units)  # raises: a unit listed twice
    else:
        u = torch.as_tensor(sorted(unit_indices(gid, units)), dtype=torch.long)
    if u.numel() and (u.min() < 0 or u.max() >= size):
        raise ValueError(f"group {gid}: unit indices must be in [0, {size}), got {u.tolist()[:8]}")
    return u


class Analyzer:
    """State of one analysis: layouts and zero flags per tape node, bindings.

    An op rule (see :func:`prunekit.register_op`) receives the analyzer and one
    :class:`~prunekit.capture.OpRecord` and describes the op through these methods: :meth:`shape`,
    :meth:`lay` and :meth:`zero` read an input dim's size, channel layout and zero flag; :meth:`set`,
    :meth:`set_zero` and :meth:`copy_dim` state an output dim's; :meth:`tie` says dims are the same channels;
    :meth:`pin_node` / :meth:`pin_op` keep dims at their size (with a reason); :meth:`where` names the call
    for those reasons; :meth:`module_of` and :meth:`bind` make a module's size attribute follow a layout.
    The layout algebra itself (fresh spaces, split/merge/slice/concat, mix, pin) is in
    :mod:`prunekit.analysis.spaces`.
    """

    def __init__(self, tape: Tape, model: nn.Module):
        self.tape = tape
        self.modules = dict(model.named_modules())
        n = len(tape.nodes)
        self.layouts: list[list | None] = [None] * n
        self.zeros: list[list | None] = [None] * n
        self.bindings: dict[tuple[str, str], Binding] = {}
        self.unsupported: dict[str, set[str]] = {}
        self.reshape_cands: dict[tuple[str, str], list] = {}
        self.scale_cands: list[tuple[OpRecord, float, Any]] = []  # (op, scalar, scaled tensor) of mul/div/SDPA
        self.scale_suspects: list[tuple[OpRecord, float, str, Binding]] = []  # see _find_scale_suspects
        # (where, part layouts) of every split/narrow/slice of a channel dim: the dry run also tries plans that
        # shrink the parts unevenly (split sizes computed from the input's width follow the total, not the parts)
        self.splits: list[tuple[str, list]] = []
        self.pderived: set[int] = {nd.id for nd in tape.nodes if nd.kind in ("param", "buffer")}
        self.param_nid: dict[str, int] = {nd.name: nd.id for nd in tape.nodes if nd.kind in ("param", "buffer")}
        self.op: OpRecord | None = None
        for nd in tape.nodes:
            if nd.kind in ("param", "buffer"):
                if nd.dtype is not None and not (nd.dtype.is_floating_point or nd.dtype.is_complex):
                    self._init(nd.id, f"integer/bool buffer {nd.name} (indices or masks keep their size)", False)
                else:
                    self._init(nd.id, None, True)
            elif nd.kind == "input":
                self._init(nd.id, "model input", False)
            elif nd.kind == "const":
                self._init(nd.id, "constant tensor created outside parameters (fixed size)", False)
        # mixture-of-experts blocks: the router rows and stacked expert weights share one expert space
        self.min_keep_spaces: list[tuple[C.Space, int]] = []  # (expert space, units to keep)
        self.multiples: list[tuple[Any, int, str]] = []  # (layout, n, why): see require_multiple
        self.expert_dims = E.prepare(self)

    # -- node state
    def _init(self, nid: int, pin: str | None, zero: bool) -> None:
        shape = self.tape.nodes[nid].shape
        self.layouts[nid] = [C.fresh(s, pin if s > 1 else None) for s in shape]
        self.zeros[nid] = [zero] * len(shape)

    def _nid(self, ref) -> int:
        return ref.id if isinstance(ref, TRef) else int(ref)

    def shape(self, ref) -> tuple[int, ...]:
        """The captured shape of tape tensor ``ref`` (a TRef or a node id)."""
        return self.tape.nodes[self._nid(ref)].shape

    def lay(self, ref, d: int):
        """The channel layout of dim ``d`` of tensor ``ref`` (a fresh space, pinned as "produced by" the
        current op, if nothing set it)."""
        nid = self._nid(ref)
        if self.layouts[nid] is None:
            self._init(nid, f"produced by {self.where(self.op)}", False)
        l = self.layouts[nid][d]
        if l is None:
            s = self.shape(nid)[d]
            l = self.layouts[nid][d] = C.fresh(s, f"dim {d} produced by {self.where(self.op)}" if s > 1 else None)
        return l

    def zero(self, ref, d: int) -> bool:
        """Is tensor ``ref`` exactly zero on the masked channels of dim ``d`` (e.g. a conv output, a ReLU of
        one)?  Removing such channels equals zeroing them for a sum or contraction over the dim."""
        nid = self._nid(ref)
        z = self.zeros[nid]
        return bool(z[d]) if z is not None and z[d] is not None else False

    def set(self, ref, d: int, layout) -> None:
        """Dim ``d`` of output ``ref`` has channel layout ``layout``; a dim that already has one is tied to it."""
        nid = self._nid(ref)
        if self.layouts[nid] is None:
            n = len(self.shape(nid))
            self.layouts[nid] = [None] * n
            self.zeros[nid] = [None] * n
        cur = self.layouts[nid][d]
        if cur is not None and cur is not layout:
            C.tie(cur, layout, self.where(self.op))
        else:
            self.layouts[nid][d] = layout

    def set_zero(self, ref, d: int, z: bool) -> None:
        """Record whether output ``ref`` is zero on the masked channels of dim ``d`` (see :meth:`zero`)."""
        nid = self._nid(ref)
        if self.zeros[nid] is None:
            self.zeros[nid] = [None] * len(self.shape(nid))
        self.zeros[nid][d] = bool(z)

    def copy_dim(self, src, ds: int, dst, dd: int) -> None:
        """Dim ``dd`` of ``dst`` is dim ``ds`` of ``src``: same layout, same zero flag (a view, a passthrough)."""
        self.set(dst, dd, self.lay(src, ds))
        self.set_zero(dst, dd, self.zero(src, ds))

    def tie(self, dims, why: str | None = None):
        """The dims ``[(tensor, dim), ...]`` hold the same channels (an elementwise op's aligned inputs, the
        tensors of a cat): their layouts are tied, and the first one is returned (None for no dims).  ``why``
        (default: :meth:`where` of the current op) names the op when the layouts cannot be tied."""
        layout = None
        for ref, d in dims:
            other = self.lay(ref, d)
            if layout is None:
                layout = other
            else:
                C.tie(layout, other, why if why is not None else self.where(self.op))
        return layout

    def is_param(self, ref) -> bool:
        """True for parameters/buffers and views of them (e.g. ``aten.t(weight)`` inside nn.Linear)."""
        return self._nid(ref) in self.pderived

    # -- context
    def module_name(self, op: OpRecord | None) -> str:
        """The executing module's name of ``op`` (``<root>`` for the model itself)."""
        return (op.module or "<root>") if op is not None else "<root>"

    def where(self, op: OpRecord | None) -> str:
        """``"<op> in <module>"``: how reasons and errors name a call."""
        if op is None:
            return "capture"
        return f"{op.packet} in {self.module_name(op)}"

    def module_of(self, op: OpRecord, class_names: tuple, param=None) -> str | None:
        """Name of the module executing ``op`` when it is an instance of one of ``class_names`` (classes, matched
        by isinstance, or class names matched over its MRO) -- and, with ``param``, when that tensor is the
        module's own parameter (or derived from its own weight); else None."""
        m = self.modules.get(op.module)
        if m is None:
            return None
        classes = tuple(c for c in class_names if isinstance(c, type))
        names = {c.__name__ for c in type(m).__mro__}
        if not (classes and isinstance(m, classes)) and not names.intersection(class_names):
            return None
        if param is not None:
            fqn = self.tape.nodes[self._nid(param)].name or ""
            if not fqn.startswith(op.module + ".") and op.module \
                    and not self._derived_from_own_weight(op.module, param):
                return None
        return op.module

    def _derived_from_own_weight(self, module: str, t) -> bool:
        """Is ``t`` (an op's weight argument) a function of ``module.weight`` with the same channels, e.g.
        the standardised weight of a weight-standardised conv (timm ``ScaledStdConv2d``, NF-Nets)?  Then the
        module's size attributes describe ``t`` and are bound like for the parameter itself."""
        own = self.param_nid.get(f"{module}.weight")
        if own is None or self.shape(own) != self.shape(t):
            return False
        for d in range(min(2, len(self.shape(t)))):
            la, lb = self.layouts[own], self.layouts[self._nid(t)]
            if la is None or lb is None or la[d] is None or lb[d] is None:
                return False
            if [id(x) for x in C.leaves(la[d])] != [id(x) for x in C.leaves(lb[d])]:
                return False
        return True

    def bind(self, module: str, attr: str, layouts, default=None) -> None:
        """``module.attr`` follows ``layouts`` (its kept size after a plan); with no layout it is set to
        ``default``, which is only recorded when it is the attribute's value now (a binding without a layout
        must never rewrite an attribute: every plan would apply it)."""
        if layouts is None:
            m = self.modules.get(module)
            if default is None or m is None or getattr(m, attr, None) != default:
                return
        self.bindings.setdefault((module, attr), Binding(module, attr, layouts, default))

    def bind_reshape(self, op: OpRecord, layouts: list, sizes: list[int]) -> None:
        """Heuristic: int attributes of the executing module equal to a reshape size follow that size."""
        m = self.modules.get(op.module)
        if m is None:
            return
        spec = M.spec_of(m)
        if spec is not None and not spec.infer_attrs:
            return
        ints = {k: v for k, v in vars(m).items() if type(v) is int and v > 1 and k not in _ATTR_DENY
                and not k.startswith("_")}
        if not ints:
            return
        for lay, size in zip(layouts, sizes):
            cands = [(size, lay)]
            ex = C.expand(lay)
            if len(ex) == 1 and len(ex[0]) > 1:
                cands += [(s.size, ((s,),)) for s in ex[0]]
            for j, (value, l) in enumerate(cands):
                for k, v in ints.items():
                    if v == value:
                        self.reshape_cands.setdefault((op.module, k), []).append((op.index, l, j == 0))

    def require_multiple(self, layout, n: int, why: str) -> None:
        """Every group reaching ``layout`` must keep a multiple of ``n`` units (a kernel that needs aligned
        strides, e.g. ``_grouped_mm``'s 16 bytes): plans, the dry run and the pruner's rounding respect it."""
        if n > 1 and layout is not None:
            self.multiples.append((layout, int(n), why))

    def note_scale(self, op: OpRecord, value: float, tensor=None) -> None:
        """A mul/div by a Python number (or SDPA's explicit ``scale``): it may be computed in forward from a size
        attribute that pruning rewrites (``/ math.sqrt(self.head_dim)``), see :meth:`_find_scale_suspects`."""
        self.scale_cands.append((op, float(value), tensor))

    def _find_scale_suspects(self) -> None:
        """Scalars that equal a bound size attribute of the executing module to the power +-1/2 or +-1, on an
        attention tensor (a dim with heads or head_dim).  The tape cannot tell ``/ math.sqrt(self.head_dim)``
        from the literal ``/ math.sqrt(8)`` or from ``self.scale`` set once in ``__init__`` (which pruning
        leaves alone): :meth:`prunekit.graph.PruneGraph._check_scales` re-runs such forwards pruned and
        compares the scalar."""
        by_module: dict[str, list] = {}
        for (mod, attr), b in self.bindings.items():
            if b.layouts is not None:
                by_module.setdefault(mod, []).append((attr, b))
        for op, value, t in self.scale_cands:
            m = self.modules.get(op.module)
            if op.module not in by_module:
                continue
            if m is None or not value or not math.isfinite(value):
                continue
            if t is not None and not any({"head", "head_dim"} & s.tags for d in range(len(self.shape(t)))
                                         for s in C.leaves(self.lay(t, d))):
                continue
            for attr, b in by_module[op.module]:
                if attr in REP_ATTRS:  # query heads per kv head: no attention scale is computed from it (SDPA's
                    continue  # math path scales q and k by sqrt(scale), 0.5 for head_dim 16, == 1/n_rep for 2)
                v = getattr(m, attr, None)
                if type(v) is not int or v < 2:
                    continue
                if any(math.isclose(value, v ** e, rel_tol=1e-6) for e in (0.5, -0.5, 1.0, -1.0)):
                    self.scale_suspects.append((op, value, attr, b))

    def pin_node(self, ref, reason: str) -> None:
        """Pin every dim of tensor ``ref``: its channels keep their size, and groups reaching them are not
        prunable, with ``reason`` (name the op: start it with :meth:`where`)."""
        nid = self._nid(ref)
        if self.layouts[nid] is None:  # pinned for ``reason`` alone (not also "produced by" the same op)
            self._init(nid, None, False)
        lays = self.layouts[nid]
        for d, s in enumerate(self.shape(nid)):
            if lays[d] is None:
                lays[d] = C.fresh(s)
            C.pin(lays[d], reason)

    def pin_op(self, op: OpRecord, reason: str) -> None:
        """Pin every dim of every input and output of ``op`` (what an op without a rule gets)."""
        for r in op.inputs():
            self.pin_node(r, reason)
        for r in op.outs():
            self.pin_node(r, reason)

    # -- run
    def run(self) -> None:
        for op in self.tape.ops:
            self.op = op
            spec = _SPECS.get(op.qualname) if op.qualname else _lookup(op)
            fn = spec.rule if spec is not None else None
            if fn is None:
                self.unsupported.setdefault(op.name, set()).add(self.module_name(op))
                self.pin_op(op, f"unsupported op {op.name} in {self.module_name(op)}")
                continue
            try:
                fn(self, op)
            except C.TieError as e:
                self.pin_op(op, f"{self.where(op)}: {e}")
            except Exception as e:  # a rule that cannot handle an unusual call pins, never guesses
                log.debug("rule for %s failed: %r", op.name, e)
                self.pin_op(op, f"{self.where(op)}: rule could not handle this call ({type(e).__name__}: {e})")
            ins = op.inputs()
            if op.packet in _VIEWLIKE and ins and ins[0].id in self.pderived:
                self.pderived.update(r.id for r in op.outs())
            # any output dim a rule left unset is derived and pinned
            for r in op.outs():
                nid = r.id
                if self.layouts[nid] is None:
                    self._init(nid, f"produced by {self.where(op)}", False)
                else:
                    for d, l in enumerate(self.layouts[nid]):
                        if l is None:
                            s = self.shape(nid)[d]
                            self.layouts[nid][d] = C.fresh(s, f"dim {d} produced by {self.where(op)}" if s > 1 else None)
        self.op = None

    def finish(self) -> None:
        """Pin split factors inside products; bind registered size attributes; resolve reshape-size candidates."""
        self._pin_interleaved()
        self._bind_module_attrs()
        attrs_of: dict[str, list[str]] = {}
        for mod, attr in self.reshape_cands:
            attrs_of.setdefault(mod, []).append(attr)
        for (mod, attr), cands in self.reshape_cands.items():
            want = _wanted_tag(attr)
            # a name that says head_dim never sizes heads (8 heads x head_dim 8: ``head_dim`` does not follow the
            # heads), and one that says heads never sizes head_dim
            free = [(i, l, w) for i, l, w in cands if any(s.size > 1 and not s.pins for s in C.leaves(l))
                    and not _other_tag(want, l)]
            if not free:
                continue
            # one attribute sizes several reshapes as a whole dim (e.g. ``head_dim`` for q, k and v): the sizes it
            # fixes must stay equal, so those spaces are tied (pruned or pinned together) instead of diverging
            same = [(i, l) for i, l, w in cands if w and not _data_dim(l) and not _other_tag(want, l)
                    and all(p in (_INTERLEAVED, _ROPE) for s in C.leaves(l) for p in s.pins)]
            # another size attribute with the same value (e.g. num_heads == head_dim) makes the match ambiguous
            m = self.modules.get(mod)
            rivals = [k for k in attrs_of[mod] if k != attr and getattr(m, k, None) == getattr(m, attr, None)]
            ambiguous = bool(rivals)
            if ambiguous:  # equal values: only the reshapes whose spaces the name describes are tied (q/k and v
                # head_dim sized by one ``self.head_dim``: one attribute, so one group, or a plan breaks the other),
                # and only when no rival's name describes them too (``key_dim == value_dim``: which sizes which?)
                rival_wants = any(_wanted_tag(k) == want for k in rivals)
                same = [(i, l) for i, l in same if want and not rival_wants and all(want in s.tags for s in C.leaves(l))]
            if len({i for i, _ in same}) > 1:
                for i, l in same[1:]:
                    if l is not same[0][1]:
                        C.tie(same[0][1], l, f"{mod}.{attr} sizes several reshapes")
            if (mod, attr) not in self.bindings:
                pick = free[0][1]
                if ambiguous:  # equal values: only a name that says heads or head_dim may choose
                    tagged = [l for _, l, _ in free if want and all(want in s.tags for s in C.leaves(l))]
                    pick = tagged[0] if tagged else None
                if pick is not None:
                    self.bind(mod, attr, pick)
        self._pin_interleaved()  # ties above may have split a factor inside a product
        self._find_scale_suspects()

    def _bind_module_attrs(self) -> None:
        """Size attributes that a layer's :class:`~prunekit.analysis.modules.ModuleSpec` ties to a parameter dim
        (``nn.Linear.out_features`` <- ``weight`` dim 0) follow that dim's layout, even when the op using the
        parameter ran elsewhere (F.linear inside MultiheadAttention, bmm lowering of non-contiguous inputs) or
        no op rule knows the layer (a class registered with ``pk.register_module``).  Only an attribute whose
        current value equals that size is bound; a binding an op rule made already stays."""
        for name, m in self.modules.items():
            spec = M.spec_of(m)
            if spec is None or not spec.attrs:
                continue
            for attr in spec.attrs:
                src = M.attr_source(m, attr)
                if src is None:
                    continue
                pname, dim = src
                pid = self.param_nid.get(f"{name}.{pname}" if name else pname)
                if pid is None or self.layouts[pid] is None:
                    continue
                shape, lays, cur = self.shape(pid), self.layouts[pid], getattr(m, attr, None)
                if dim is None:  # the whole shape, e.g. LayerNorm's normalized_shape
                    if isinstance(cur, (tuple, list)) and tuple(cur) == tuple(shape) and None not in lays:
                        self.bind(name, attr, list(lays))
                elif -len(shape) <= dim < len(shape) and type(cur) is int and cur == shape[dim] \
                        and lays[dim] is not None:
                    self.bind(name, attr, lays[dim])

    def _rope_roots(self) -> set[int]:
        """ids of the root spaces of rotary-embedding frequency buffers (transformers' ``inv_freq``, or a buffer
        of a module whose class name says Rotary): a head_dim tied to them is RoPE's."""
        roots: set[int] = set()
        for nd in self.tape.nodes:
            if nd.kind != "buffer" or self.layouts[nd.id] is None or not nd.name:
                continue
            owner = self.modules.get(nd.name.rpartition(".")[0])
            if not (nd.name.rpartition(".")[2] == "inv_freq" or "rotary" in type(owner).__name__.lower()):
                continue
            for l in self.layouts[nd.id]:
                roots.update(id(C.find(x)) for x in C.leaves(l or ()))
        return roots

    def _pin_interleaved(self) -> None:
        # expanding every distinct term once finds every split factor inside a product (layouts share
        # most of their terms: expanding each node's layout separately repeated the same work ~10x)
        terms: set = set()
        for lays in self.layouts:
            for l in lays or ():
                if l:
                    terms.update(l)
        found: set = set()
        for t in terms:
            C.expand_term(t, found)
        rope = self._rope_roots() if found else set()
        for r in found:
            # tied to the frequencies of a rotary embedding: RoPE's rotate-half inside heads x head_dim
            why = _ROPE if rope and any(id(C.find(x)) in rope for t in _parts_terms(r) for x in t) else _INTERLEAVED
            for t in _parts_terms(r):
                C.pin((t,), why)
            if why not in r.pins:
                r.pins.append(why)


_ROPE = ("head_dim under rotary position embedding (RoPE): rotate-half pairs channel i with i + head_dim/2 inside "
         "every head, and the rotary frequencies are computed from head_dim (a reloaded config recomputes them), "
         "so head_dim keeps its size")
_INTERLEAVED = "channels split inside a product (e.g. rotate-half RoPE inside heads x head_dim): interleaved layout"


def pin_reason(pins: list[str]) -> str:
    """A group's reason from its space's pins, without repeats: "produced by OP in M" is dropped where another
    pin already names the same op ("OP in M: ..."), and equal texts appear once."""
    out: list[str] = []
    for p in pins:
        for pre in ("produced by ", "dim "):
            if p.startswith(pre) and "produced by " in p:
                where = p.split("produced by ", 1)[1]
                if any(q is not p and q.startswith(where) for q in pins):
                    break
        else:
            if p not in out:
                out.append(p)
    return "; ".join(out)


def _wanted_tag(attr: str) -> str | None:
    """The space tag a size attribute's name describes: "head_dim", "head" or None."""
    return "head_dim" if _names_head_dim(attr) else "head" if "head" in attr.lower() else None


def _other_tag(want: str | None, l) -> bool:
    """Does layout ``l`` hold only the other kind of attention channels than the tag ``want`` an attribute's
    name describes (heads for ``head_dim``, head_dim for ``num_heads``)?  A product of both (``attn_dim`` =
    heads x head_dim) is not the other kind."""
    if want is None:
        return False
    other = "head" if want == "head_dim" else "head_dim"
    lv = C.leaves(l)
    return any(other in s.tags for s in lv) and not any(want in s.tags for s in lv)


def _names_head_dim(attr: str) -> bool:
    """Does a size attribute's name say "per-head width" (head_dim, hd, d_k, head_size, ...)?"""
    a = attr.lower()
    return "dim" in a or "size" in a or a in ("hd", "dh", "d_k", "dk", "d_head", "d_v", "dv")


def _data_dim(l) -> bool:
    """Not a single factor of a reshaped channel dim (a merged dim such as batch x heads, a batch/sequence-like
    dim, a model input): never tied by attribute value."""
    if len(l) != 1 or len(l[0]) != 1:
        return True
    return any("nonchannel" in s.tags or "factor" not in s.tags or any(p.startswith("model input") for p in s.pins)
               for s in C.leaves(l))


def _parts_terms(r) -> list:
    kind, parts = r.decomp
    return [t for p in parts for t in C.expand_space(p)]


def node_layout(an: Analyzer, nid: int, d: int):
    if an.layouts[nid] is None:
        return None
    return an.layouts[nid][d]
