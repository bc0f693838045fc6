"""The op registry: one :class:`OpSpec` per op, holding its channel rule, its MACs formula and how its
output behaves under zeroing.

An op is named by its overload packet -- ``torch.ops.aten.conv2d``, ``torch.ops.mylib.myop`` for a
``torch.library`` custom op -- and stored under its namespace-qualified name (``"aten::conv2d"``), which is
what the capture records for every call (:attr:`OpRecord.qualname`).  The namespace is part of the
identity: ``quantized::conv2d`` is a different op from ``aten::conv2d`` and does not get its rule.  The
capture's own markers live in the ``prunekit`` namespace (``"prunekit::sdpa_scale"``).

A **rule** is ``rule(analyzer, op)``: it receives the :class:`~prunekit.analysis.analyzer.Analyzer` and the
:class:`~prunekit.capture.OpRecord` of one call and states, through the analyzer, how the channels of
the op's outputs relate to those of its inputs (see :func:`prunekit.register_op` for the methods a rule
calls).  A **MACs formula** is ``macs(op, size, shape)``: ``size(ref, dim)`` is a dim's (kept) size --
an int or a symbolic polynomial, so the formula may only add and multiply sizes -- and ``shape(ref)`` the
captured shape.  An op with no spec is pinned: every dim it touches keeps its size.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace as _dc_replace
from typing import Any, Callable, Iterator, Mapping, MutableMapping

Rule = Callable[[Any, Any], None]
MacsFormula = Callable[[Any, Callable, Callable], Any]


class Zero(enum.Enum):
    """How an elementwise op's output behaves when channels of its inputs are masked to zero.

    The analysis tracks which tensors are exactly zero on masked channels: only then is removing the
    channels equal to zeroing them for the ops downstream (a matmul contracting over them, a sum)."""

    NONE = "none"
    """The output is not zero there (``sigmoid(0) = 0.5``, ``exp(0) = 1``)."""
    PRESERVING = "zp"
    """``f(0) = 0``: zero where every tensor input is zero (``relu``, ``neg``, ``clone``)."""
    ADD = "add"
    """Zero where every input is a zero tensor and no non-zero scalar is added (``add``, ``sub``)."""
    MUL = "mul"
    """Zero where any input is zero (``mul``)."""
    DIV = "div"
    """Zero where the numerator (first input) is zero (``div``)."""
    WHERE = "where"
    """``where(cond, a, b)``: zero where both branches are zero."""


@dataclass(frozen=True)
class OpSpec:
    """Everything prunekit knows about one op.

    ``rule``: the channel rule (``None``: the op is pinned as unsupported).  ``macs``: the MACs formula
    (``None``: counts 0).  ``zero``: for an elementwise op, how it behaves under zeroing (:class:`Zero`).
    ``structural``: the op only moves, views or creates values (reshape, cat, indexing, factories, the
    capture's markers): no arithmetic, so no MACs.  ``cost_free``: the op computes, but the counting
    convention (``torch.utils.flop_counter``: only convolutions, matrix products and attention) gives it
    0 MACs (elementwise ops, norms, reductions, pooling).  An op with a rule and no MACs formula must say
    which of the two it is; an op with a formula must have a rule (possibly one that pins, see
    :func:`pinning_rule`)."""

    op: str  # namespace-qualified name, "aten::conv2d"
    rule: Rule | None = None
    macs: MacsFormula | None = None
    zero: Zero | None = None
    structural: bool = False
    cost_free: bool = False
    doc: str = ""

    @property
    def packet(self) -> str:
        """The name the capture records as ``OpRecord.packet``: ``"conv2d"`` for aten, ``"ns.name"`` else."""
        return packet_name(self.op)


_SPECS: dict[str, OpSpec] = {}


def packet_name(qualname: str) -> str:
    """``"aten::conv2d"`` -> ``"conv2d"``; ``"quantized::conv2d"`` -> ``"quantized.conv2d"``."""
    ns, _, name = qualname.partition("::")
    return name if ns == "aten" else f"{ns}.{name}"


def qualname(op: Any) -> str:
    """The namespace-qualified name of an op given as an overload packet (``torch.ops.aten.conv2d``), an
    overload (``torch.ops.aten.conv2d.default``), a ``torch.library.custom_op`` object, an OpRecord, or a
    string ``"ns::name"``."""
    if isinstance(op, str):
        if "::" not in op:
            raise ValueError(f"op name {op!r} has no namespace: pass the op object (torch.ops.aten.{op}, "
                             f"torch.ops.mylib.{op}) or a qualified name such as 'aten::{op}'")
        return op
    q = getattr(op, "qualname", None)
    if isinstance(q, str) and "::" in q:  # an OpRecord
        return q
    if hasattr(op, "_qualified_op_name"):  # OpOverloadPacket
        return op._qualified_op_name
    sch = getattr(op, "_schema", None)
    if sch is not None:  # OpOverload
        return sch.name
    q = getattr(op, "_qualname", None)
    if isinstance(q, str):  # torch.library.custom_op's CustomOpDef
        return q
    name = getattr(op, "name", None)
    if isinstance(name, str) and getattr(op, "packet", None) is not None:  # an OpRecord built without qualname
        ns = name.split(".", 1)[0]
        return f"aten::{op.packet}" if ns == "aten" else f"{ns}::{op.packet.split('.')[-1]}"
    raise TypeError(f"cannot name op {op!r}: pass an op such as torch.ops.aten.conv2d or torch.ops.mylib.myop")


def register(op: Any, rule: Rule | None = None, macs: MacsFormula | None = None, zero: Zero | None = None, *,
             structural: bool = False, cost_free: bool = False, replace: bool = False, doc: str = "") -> OpSpec:
    """Register the spec of one op (see :class:`OpSpec`).  An op already registered is refused (a
    ValueError) unless ``replace=True``: two families claiming one op is a bug, not an override."""
    key = qualname(op)
    if key in _SPECS and not replace:
        raise ValueError(f"op {key} is already registered (rule {_fn_name(_SPECS[key].rule)}); pass replace=True "
                         "to replace its spec, or unregister it first")
    if zero is not None and not isinstance(zero, Zero):
        raise TypeError(f"op {key}: zero must be a prunekit Zero member (e.g. Zero.PRESERVING), got {zero!r}")
    spec = OpSpec(key, rule, macs, zero, structural, cost_free, doc)
    _SPECS[key] = spec
    return spec


def register_many(ops, rule: Rule | None = None, macs: MacsFormula | None = None, zero: Zero | None = None,
                  **flags) -> None:
    """:func:`register` each of ``ops`` (bare aten names or op objects) with the same spec."""
    for op in ops:
        register(f"aten::{op}" if isinstance(op, str) and "::" not in op else op, rule, macs, zero, **flags)


def unregister(op: Any) -> OpSpec | None:
    """Remove an op's spec (returns it, or None when it had none)."""
    return _SPECS.pop(qualname(op), None)


def lookup(op: Any) -> OpSpec | None:
    """The spec of an op (an op object, a qualified name, or an OpRecord), or None."""
    q = getattr(op, "qualname", None)
    if isinstance(q, str) and q:
        return _SPECS.get(q)
    try:
        return _SPECS.get(qualname(op))
    except (TypeError, ValueError):
        return None


def specs() -> Mapping[str, OpSpec]:
    """Every registered spec, by qualified name (a read-only view)."""
    return _ReadOnly(_SPECS)


def pinning_rule(reason: str) -> Rule:
    """A rule that pins every dim the op touches, for ``reason`` (an op that is counted but whose channels
    are deliberately not followed)."""
    def pin(analyzer, op):
        analyzer.pin_op(op, f"{analyzer.where(op)}: {reason}")
    pin.__name__ = pin.__qualname__ = "pinned"
    return pin


def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class _ReadOnly(Mapping):
    def __init__(self, d):
        self._d = d

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


class FieldView(MutableMapping):
    """The deprecated per-field tables (``RULES``, ``MACS``) as views over the registry, keyed by the name
    the capture records as ``OpRecord.packet`` (``"conv2d"`` for aten ops, ``"ns.name"`` for others).
    Assignment replaces that field of the op's spec (kept so code that patched the old dicts still works);
    new code registers with :func:`prunekit.register_op`."""

    def __init__(self, field: str):
        self._field = field

    @staticmethod
    def _key(name: str) -> str:
        if "::" in name:
            return name
        ns, dot, rest = name.partition(".")
        return f"{ns}::{rest}" if dot and ns != "aten" and not name.startswith("_") else f"aten::{name}"

    def __getitem__(self, name):
        spec = _SPECS.get(self._key(name)) if isinstance(name, str) else None
        v = getattr(spec, self._field) if spec is not None else None
        if v is None:
            raise KeyError(name)
        return v

    def __setitem__(self, name, value):
        key = self._key(name)
        spec = _SPECS.get(key)
        _SPECS[key] = _dc_replace(spec, **{self._field: value}) if spec is not None \
            else OpSpec(key, **{self._field: value})

    def __delitem__(self, name):
        key = self._key(name)
        spec = _SPECS.get(key)
        if spec is None or getattr(spec, self._field) is None:
            raise KeyError(name)
        _SPECS[key] = _dc_replace(spec, **{self._field: None})

    def __iter__(self) -> Iterator[str]:
        return iter([s.packet for s in _SPECS.values() if getattr(s, self._field) is not None])

    def __len__(self) -> int:
        return sum(getattr(s, self._field) is not None for s in _SPECS.values())

    def __contains__(self, name) -> bool:
        try:
            self[name]
            return True
        except KeyError:
            return False


class OpRegistration:
    """What :func:`register_op` returns: the registered spec; :meth:`remove` (or leaving a ``with`` block)
    unregisters it and gives back the spec it replaced, if any."""

    def __init__(self, spec: OpSpec, previous: OpSpec | None):
        self.spec, self._previous, self._active = spec, previous, True

    def remove(self) -> None:
        if not self._active:
            return
        self._active = False
        if _SPECS.get(self.spec.op) is self.spec:
            if self._previous is not None:
                _SPECS[self.spec.op] = self._previous
            else:
                del _SPECS[self.spec.op]

    def __enter__(self) -> "OpRegistration":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def register_op(op: Any, rule: Rule | None = None, macs: MacsFormula | None = None, zero: Zero | None = None, *,
                structural: bool = False, cost_free: bool = False, replace: bool = False) -> OpRegistration:
    """Teach prunekit how an op moves channels (and what it costs): a ``torch.library`` custom op, or an ATen
    op it does not know yet.  Without a spec an op pins every dim it touches ("unsupported op ...").

    ``op``: the op's overload packet, e.g. ``torch.ops.mylib.scale_channels`` (its namespace is part of its
    identity: ``torch.ops.quantized.conv2d`` is not ``torch.ops.aten.conv2d``), an overload, or the object
    ``torch.library.custom_op`` returned.  An op that already has a spec is refused unless ``replace=True``.
    The registration lasts until ``.remove()`` is called on the returned object or :func:`unregister_op`
    (or use it as a context manager: ``with pk.register_op(...):``).

    ``zero`` alone (no ``rule``): the op is elementwise, and :class:`Zero` says how its output behaves where
    its inputs are zero (``Zero.PRESERVING`` for ``f(0) = 0``).

    ``rule(analyzer, op)`` for anything else.  ``op`` is the call's
    :class:`~prunekit.capture.OpRecord`: ``op.args`` / ``op.kwargs`` with tensors replaced by
    ``TRef`` s, ``op.arg("name")`` reads an argument by its schema name, ``op.outs()`` lists the output
    tensors, ``op.module`` names the executing module.  The rule states, for every output dim, which
    channels it holds, through the :class:`~prunekit.analysis.analyzer.Analyzer`:

    * ``analyzer.shape(t)``, ``analyzer.lay(t, d)``, ``analyzer.zero(t, d)``: an input's shape, the channel
      layout of its dim ``d``, and whether it is zero on masked channels;
    * ``analyzer.copy_dim(x, d, out, d2)``: output dim ``d2`` is input dim ``d`` (a passthrough);
      ``analyzer.set(out, d, layout)`` / ``analyzer.set_zero(out, d, flag)`` for a layout built otherwise;
    * ``analyzer.tie([(a, d), (b, e)])``: those dims are the same channels (pruned together);
    * ``analyzer.pin_node(t, reason)`` / ``analyzer.pin_op(op, reason)``: keep dims at their size; start
      the reason with ``analyzer.where(op)`` so it names the op and module;
    * the layout algebra of :mod:`prunekit.analysis.spaces` (``fresh``, ``split_sizes``, ``merge``,
      ``slice_layout``, ``concat``, ``mix`` for dims whose removal is not equal to zeroing, ``pin``).

    Output dims a rule leaves unset are pinned; an exception in a rule pins the op's tensors (the analysis
    never guesses).  A prunable group is checked by the dry run and, after pruning, by the verification
    against the masked model, so a wrong rule is caught rather than silently trusted.

    ``macs(op, size, shape)``: the call's multiply-accumulates for ``pk.count``, FLOPs targets and the FLOPs
    loss; ``size(t, d)`` is dim ``d``'s (kept) size -- it may be a symbolic polynomial, so only add and
    multiply sizes -- and ``shape(t)`` the captured shape.  ``structural`` / ``cost_free``: declare that
    the op has no MACs on purpose (it only moves values / the counting convention does not count it).

    Example::

        @torch.library.custom_op("mylib::scale_channels", mutates_args=())
        def scale_channels(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x (N, C, ...), w (C,)
            return x * w.view(-1, *[1] * (x.dim() - 2))

        def rule(analyzer, op):
            x, w = op.arg("x"), op.arg("w")
            out = op.outs()[0]
            for d in range(len(analyzer.shape(x))):
                analyzer.copy_dim(x, d, out, d)
            analyzer.tie([(x, 1), (w, 0)])  # the weight follows the channels

        pk.register_op(torch.ops.mylib.scale_channels, rule=rule,
                       macs=lambda op, size, shape: 0, cost_free=True)
    """
    if rule is None and zero is not None:
        from .elementwise import elementwise

        def rule(analyzer, record, _zero=zero):
            elementwise(analyzer, record, _zero)
    if rule is None and macs is None:
        raise ValueError(f"register_op({qualname(op)}): give a rule (or a zero kind for an elementwise op) "
                         "and/or a macs formula")
    previous = _SPECS.get(qualname(op))
    spec = register(op, rule, macs, zero, structural=structural, cost_free=cost_free, replace=replace)
    return OpRegistration(spec, previous)


def unregister_op(op: Any) -> None:
    """Forget the spec of ``op`` (registered with :func:`register_op`); the op is pinned again."""
    unregister(op)
