"""The op registry (issue 12): one spec per op with its channel rule and MACs formula side by side, keyed by
namespace-qualified op, duplicates refused, and ``pk.register_op`` for custom ops."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.analysis.ops import OpSpec, Zero, lookup, register, specs
from prunekit.analysis.rules import RULES
from prunekit.capture.tape import capture
from prunekit.cost.flops import MACS


# ---------------------------------------------------------------- a custom op (defined once per process)
@torch.library.custom_op("pktest::scale_channels", mutates_args=())
def scale_channels(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) times a per-channel weight w (C,)."""
    return x * w.view(1, -1, 1, 1)


@scale_channels.register_fake
def _(x, w):
    return torch.empty_like(x)


@torch.library.custom_op("pktest::conv2d", mutates_args=())
def fake_conv2d(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Named like aten's conv2d, but another op: must not get aten's rule or formula."""
    return torch.nn.functional.conv2d(x, w)


@fake_conv2d.register_fake
def _(x, w):
    return torch.empty(x.shape[0], w.shape[0], x.shape[2] - w.shape[2] + 1, x.shape[3] - w.shape[3] + 1,
                       device=x.device, dtype=x.dtype)


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return torch.ops.pktest.scale_channels(x, self.w)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = Scale(8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.scale(self.c1(x))))


def scale_rule(analyzer, op):
    x, w = op.arg("x"), op.arg("w")
    out = op.outs()[0]
    for d in range(len(analyzer.shape(x))):
        analyzer.copy_dim(x, d, out, d)  # x * w is zero where x is
    analyzer.tie([(x, 1), (w, 0)])


def scale_macs(op, size, shape):
    x = op.arg("x")
    return math.prod(size(x, d) for d in range(len(shape(x))))


@pytest.fixture
def registered():
    reg = pk.register_op(torch.ops.pktest.scale_channels, rule=scale_rule, macs=scale_macs)
    yield reg
    reg.remove()


def _group_of(graph, module):
    return next(g for g in graph.groups if module in g.source)


# ---------------------------------------------------------------- drift
def drift(table) -> list[str]:
    """Specs with a rule but no cost (not declared structural or cost-free), or a cost but no rule."""
    bad = []
    for key, spec in table.items():
        if spec.rule is not None and spec.macs is None and not (spec.structural or spec.cost_free):
            bad.append(f"{key}: a rule but no MACs formula (declare structural=True or cost_free=True)")
        if spec.macs is not None and spec.rule is None:
            bad.append(f"{key}: a MACs formula but no rule (give it a rule, or pinning_rule(reason))")
    return bad


def test_every_op_with_a_rule_has_a_cost_and_every_cost_a_rule():
    assert drift(specs()) == []


def test_the_drift_check_catches_both_directions():
    f = lambda *a: 0  # noqa: E731
    assert len(drift({"x::rule_only": OpSpec("x::rule_only", rule=f),
                      "x::cost_only": OpSpec("x::cost_only", macs=f),
                      "x::ok": OpSpec("x::ok", rule=f, structural=True)})) == 2


def test_the_drifted_ops_of_the_issue():
    for name in ("mv", "addmv", "dot", "_scaled_mm"):  # counted: now with an (explicitly pinning) rule
        spec = lookup(getattr(torch.ops.aten, name))
        assert spec.rule is not None and spec.macs is not None, name
    for name in ("thnn_conv2d", "_scaled_dot_product_fused_attention_overrideable"):  # had a rule: now counted
        spec = lookup(getattr(torch.ops.aten, name))
        assert spec.macs is not None, name


def test_registered_aten_names_exist():
    """No dead entries: every aten name in the registry is an op of this torch (a few are newer than the
    oldest supported torch and are allowed to be missing there)."""
    newer = {"_fused_rms_norm", "_scaled_dot_product_fused_attention_overrideable", "_safe_softmax", "rms_norm",
             "_batch_norm_with_update", "_batch_norm_no_update", "_scaled_dot_product_cudnn_attention"}
    dead = [k for k in specs() if k.startswith("aten::") and not hasattr(torch.ops.aten, k[6:])
            and k[6:] not in newer]
    assert dead == []


def test_markers_have_their_own_namespace():
    assert lookup("prunekit::sdpa_scale").structural
    assert lookup("prunekit::mha_constraint") is not None
    assert lookup("aten::sdpa_scale") is None


def test_elementwise_kinds_are_enum_members():
    assert lookup(torch.ops.aten.relu).zero is Zero.PRESERVING
    assert lookup(torch.ops.aten.sigmoid).zero is Zero.NONE
    assert lookup(torch.ops.aten.add).zero is Zero.ADD
    assert lookup(torch.ops.aten.mul).zero is Zero.MUL
    assert lookup(torch.ops.aten.scalar_tensor).zero is None  # a factory (was registered twice, the factory won)


def test_old_tables_are_views_of_the_registry():
    assert RULES["conv2d"] is lookup(torch.ops.aten.conv2d).rule
    assert MACS["conv2d"] is lookup(torch.ops.aten.conv2d).macs
    assert "relu" in RULES and "relu" not in MACS
    assert "prunekit.sdpa_scale" in RULES
    assert set(MACS) <= set(RULES)


# ---------------------------------------------------------------- duplicates, namespaces
def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="aten::relu is already registered"):
        register(torch.ops.aten.relu, rule=lambda a, op: None, cost_free=True)
    with pytest.raises(ValueError, match="already registered"):
        pk.register_op(torch.ops.aten.conv2d, rule=lambda a, op: None)
    old = lookup(torch.ops.aten.relu)
    with pk.register_op(torch.ops.aten.relu, rule=old.rule, zero=Zero.PRESERVING, cost_free=True,
                        replace=True) as reg:
        assert lookup(torch.ops.aten.relu) is reg.spec
    assert lookup(torch.ops.aten.relu) is old  # the replaced spec is given back


def test_a_bare_name_is_refused():
    with pytest.raises(ValueError, match="no namespace"):
        register("conv2d", rule=lambda a, op: None)


def test_namespace_is_part_of_the_identity():
    assert lookup(torch.ops.quantized.conv2d) is None
    assert lookup(torch.ops.pktest.conv2d) is None
    assert lookup(torch.ops.aten.conv2d) is not None

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
            self.c2 = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.c2(torch.ops.pktest.conv2d(x, self.w))
    model, x = M(), torch.randn(1, 3, 8, 8)
    tape = capture(model, x)
    rec = next(op for op in tape.ops if op.qualname == "pktest::conv2d")
    assert rec.packet == "pktest.conv2d"  # not "conv2d": aten's name tables do not match it either
    graph = pk.analyze(model, x)
    assert any("pktest.conv2d" in k for k in graph.unsupported_ops)
    stats = pk.count(model, x)
    assert stats.macs == 2 * 6 * 6 * 6  # only c2 (aten's formula is not applied to pktest::conv2d)


def test_op_record_reads_arguments_by_schema_name():
    model, x = nn.Conv2d(4, 4, 3, groups=2, bias=False), torch.randn(1, 4, 5, 5)
    rec = next(op for op in capture(model, x).ops if op.qualname == "aten::convolution")
    assert rec.arg("groups") == 2 and rec.arg("transposed") is False
    assert rec.arg("bias") is None and rec.arg("no_such_argument", 7) == 7


# ---------------------------------------------------------------- register_op with a torch.library custom op
def test_custom_op_is_pinned_before_registration():
    model, x = Net(), torch.randn(2, 3, 8, 8)
    graph = pk.analyze(model, x)
    g = _group_of(graph, "c1")
    assert not g.prunable
    assert "pktest.scale_channels" in g.reason


def test_custom_op_is_prunable_and_exact_after_registration(registered):
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    graph = pk.analyze(model, x)
    g = _group_of(graph, "c1")
    assert g.prunable and g.exact, g
    assert "scale.w" in {m.fqn for m in g.members}
    zeroed = copy.deepcopy(model)  # the reference, zeroed by hand: c1's output channels 1 and 5
    with torch.no_grad():
        zeroed.c1.weight[[1, 5]] = 0
        zeroed.c1.bias[[1, 5]] = 0
    pruned = pk.prune(model, graph, {g.id: [1, 5]})
    assert pruned.scale.w.shape == (6,) and pruned.c1.out_channels == 6 and pruned.c2.in_channels == 6
    torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-5)


def test_custom_op_macs_are_counted(registered):
    model, x = Net(), torch.randn(2, 3, 8, 8)
    convs = 2 * 8 * 8 * 8 * 3 * 9 + 2 * 4 * 8 * 8 * 8 * 9
    assert pk.count(model, x).macs == convs + 2 * 8 * 8 * 8
    graph = pk.analyze(model, x)
    g = _group_of(graph, "c1")
    pruned = pk.prune(model, graph, {g.id: [0, 1]})
    assert pk.count(pruned, x).macs == 2 * 6 * 8 * 8 * 3 * 9 + 2 * 4 * 8 * 8 * 6 * 9 + 2 * 6 * 8 * 8


def test_registration_is_undone(registered):
    registered.remove()
    assert lookup(torch.ops.pktest.scale_channels) is None
    reg = pk.register_op(torch.ops.pktest.scale_channels, rule=scale_rule, macs=scale_macs)
    pk.unregister_op(torch.ops.pktest.scale_channels)
    assert lookup(torch.ops.pktest.scale_channels) is None
    reg.remove()  # harmless after unregister_op


def test_an_elementwise_custom_op_needs_only_its_zero_kind():
    model, x = Net(), torch.randn(2, 3, 8, 8)
    with pk.register_op(torch.ops.pktest.scale_channels, zero=Zero.MUL, cost_free=True):
        g = _group_of(pk.analyze(model, x), "c1")
        assert g.prunable, g
    assert lookup(torch.ops.pktest.scale_channels) is None
