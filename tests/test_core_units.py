"""Unit tests: the channel-space algebra, Group.slices index math, plan validation, rollback, meta
device analysis, and the mask / apply_masks / unmask round trip."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.analysis import spaces as C


# ---------------------------------------------------------------- helpers
def leaf(l):
    """The single root leaf of a one-leaf layout."""
    ls = C.leaves(l)
    assert len(ls) == 1
    return ls[0]


def term_sizes(l):
    return [tuple(s.size for s in t) for t in C.expand(l)]


def term_ids(l):
    return [tuple(C.find(s).id for s in t) for t in C.expand(l)]


# ---------------------------------------------------------------- spaces.core
def test_fresh_and_sizes():
    l = C.fresh(5)
    assert C.layout_size(l) == 5 and term_sizes(l) == [(5,)]
    assert C.fresh(0) == ()
    p = C.fresh(4, "why")
    assert leaf(p).pins == ["why"]
    n = C.fresh_nonchannel(7, "spatial")
    assert "nonchannel" in leaf(n).tags and leaf(n).pins == ["spatial"]
    assert C.kept_size(None, {}) == 1


def test_tie_unions_and_propagates_pins_mix_tags():
    a, b = C.fresh(4), C.fresh(4, "b is pinned")
    C.mix(a, "a is inexact")
    C.tag(a, "head")
    assert C.tie(a, b) is True
    ra, rb = C.find(a[0][0]), C.find(b[0][0])
    assert ra is rb
    assert "b is pinned" in ra.pins and "a is inexact" in ra.mix and "head" in ra.tags
    # tying again is a no-op
    assert C.tie(a, b) is True and C.find(a[0][0]) is ra


def test_tie_is_transitive():
    a, b, c = C.fresh(3), C.fresh(3), C.fresh(3)
    C.tie(a, b)
    C.tie(b, c)
    assert C.find(a[0][0]) is C.find(c[0][0])


def test_tie_size_mismatch_pins_both():
    a, b = C.fresh(4), C.fresh(5)
    assert C.tie(a, b, "my-op") is False
    for l in (a, b):
        assert any("my-op" in r and "cannot be aligned" in r for r in leaf(l).pins)
    assert C.find(a[0][0]) is not C.find(b[0][0])
    assert C.tie(None, a) is False


def test_tie_single_against_concat_cat_decomposes():
    a = C.fresh(8)
    b1, b2 = C.fresh(3), C.fresh(5)
    assert C.tie(a, C.concat([b1, b2]))
    assert term_sizes(a) == [(3,), (5,)]
    assert term_ids(a) == [(C.find(b1[0][0]).id,), (C.find(b2[0][0]).id,)]


def test_tie_single_against_product_prod_decomposes():
    a = C.fresh(6)
    x, y = C.fresh(2), C.fresh(3)
    assert C.tie(a, C.merge([x, y]))
    assert term_sizes(a) == [(2, 3)]
    assert term_ids(a) == [(C.find(x[0][0]).id, C.find(y[0][0]).id)]


def test_tie_incompatible_products_pins():
    p = C.merge([C.fresh(2), C.fresh(3)])
    q = C.merge([C.fresh(3), C.fresh(2)])
    assert C.tie(p, q, "perm") is False
    assert all(any("perm" in r for r in s.pins) for s in C.leaves(p))


def test_merge_distributes_over_concat():
    a, b, c = C.fresh(2), C.fresh(3), C.fresh(4)
    m = C.merge([C.concat([a, b]), c])
    assert C.layout_size(m) == 2 * 4 + 3 * 4
    assert term_sizes(m) == [(2, 4), (3, 4)]
    assert term_ids(m) == [(leaf(a).id, leaf(c).id), (leaf(b).id, leaf(c).id)]
    assert C.concat([a, b]) == (a[0], b[0])


def test_split_sizes_prod_decomposes_leaf():
    l = C.fresh(12)
    p, q = C.split_sizes(l, [3, 4])
    assert C.layout_size(p) == 3 and C.layout_size(q) == 4
    assert term_ids(l) == [(leaf(p).id, leaf(q).id)]
    # a second reshape must respect the factors: 12 = 3 x 4 cannot be viewed as 4 x 3
    with pytest.raises(C.TieError):
        C.split_sizes(l, [4, 3])
    # ... but 12 -> (6, 2) refines the 4 into 2 x 2: 6 = 3 x 2
    a, b = C.split_sizes(l, [6, 2])
    assert term_sizes(l) == [(3, 2, 2)]
    assert [C.find(z).id for z in C.expand(a)[0]][0] == leaf(p).id
    assert term_sizes(a) == [(3, 2)] and term_sizes(b) == [(2,)]


def test_split_sizes_refines_across_factors():
    l = C.fresh(12)
    C.split_sizes(l, [2, 6])
    x, y = C.split_sizes(l, [4, 3])  # 4 = 2 x (first 2 of the 6), 3 = rest of the 6
    assert term_sizes(l) == [(2, 2, 3)]
    assert term_sizes(x) == [(2, 2)] and term_sizes(y) == [(3,)]


def test_split_sizes_trivial_and_errors():
    l = C.fresh(6)
    one, same = C.split_sizes(l, [1, 6])
    assert same is l and C.layout_size(one) == 1
    with pytest.raises(C.TieError):
        C.split_sizes(l, [4, 2])  # 8 != 6
    with pytest.raises(C.TieError):
        C.split_sizes(C.concat([C.fresh(2), C.fresh(4)]), [2, 3])  # reshape across a concatenation
    with pytest.raises(C.TieError):
        C.split_sizes(C.merge([C.fresh(2), C.fresh(3)]), [3, 2])  # boundary inside a factor


def test_slice_layout_cuts_leaf():
    l = C.fresh(10)
    s = C.slice_layout(l, 3, 7)
    assert C.layout_size(s) == 4
    assert term_sizes(l) == [(3,), (4,), (3,)]
    assert term_ids(s) == [term_ids(l)[1]]
    # full-range slice touches nothing
    assert C.layout_size(C.slice_layout(C.fresh(5), 0, 5)) == 5


def test_slice_layout_across_concat():
    a, b = C.fresh(3), C.fresh(5)
    l = C.concat([a, b])
    s = C.slice_layout(l, 2, 6)
    assert term_sizes(s) == [(1,), (3,)]
    assert term_sizes(a) == [(2,), (1,)] and term_sizes(b) == [(3,), (2,)]


def test_slice_layout_of_product():
    x, y = C.fresh(2), C.fresh(4)
    l = C.merge([x, y])
    s = C.slice_layout(l, 4, 8)  # second row of the 2 x 4 product
    assert C.layout_size(s) == 4
    assert [z.id for z in C.leaves(s)] == [leaf(y).id]
    assert term_sizes(x) == [(1,), (1,)]
    with pytest.raises(C.TieError):
        C.slice_layout(C.merge([C.fresh(2), C.fresh(4)]), 0, 2)  # cut inside the stride


def test_kept_size():
    x, y = C.fresh(2), C.fresh(4)
    l = C.merge([x, y])
    assert C.kept_size(l, {}) == 8
    assert C.kept_size(l, {leaf(y).id: 1}) == 6
    assert C.kept_size(l, {leaf(x).id: 1, leaf(y).id: 2}) == 2
    c = C.concat([C.fresh(3), C.fresh(5)])
    assert C.kept_size(c, {C.leaves(c)[1].id: 2}) == 6
    assert C.kept_size(c, {C.leaves(c)[0].id: 1, C.leaves(c)[1].id: 4}) == 3


def test_pin_mix_skip_single_units():
    l = C.concat([C.fresh(1), C.fresh(3)])
    C.pin(l, "p")
    C.mix(l, "m")
    small, big = C.leaves(l)
    assert small.pins == [] and small.mix == []
    assert big.pins == ["p"] and big.mix == ["m"]
    C.pin(l, "p")
    assert big.pins == ["p"]  # no duplicate reasons


# ---------------------------------------------------------------- Group.slices on a tiny model
class CatGrouped(nn.Module):
    """a (4) and b (6) concatenated into m; m's 8 outputs feed a grouped conv (2 groups)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.m = nn.Conv2d(10, 8, 1)
        self.g = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.m(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))
        return self.head(torch.relu(self.g(torch.relu(y))))


def _x(batch=2):
    return torch.randn(batch, 3, 6, 6)


def _owned(g, units):
    out = {}
    for f, d, idx in g.slices(units):
        assert idx.dtype == torch.long
        out.setdefault((f, d), []).extend(idx.tolist())
    return {k: sorted(v) for k, v in out.items()}


def _group(graph, fqn, dim, unit=None):
    gs = [g for g in graph.groups if any(f == fqn and d == dim for f, d, _ in g.slices([]))
          and (unit is None or g.unit == unit)]
    assert len(gs) == 1, gs
    return gs[0]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = CatGrouped().eval()
    x = _x()
    return model, x, pk.analyze(model, x)


def test_slices_concat(tiny):
    _, _, graph = tiny
    ga = _group(graph, "a.weight", 0)
    gb = _group(graph, "b.weight", 0)
    assert ga.size == 4 and gb.size == 6 and ga.prunable and gb.prunable
    assert _owned(ga, [0, 2]) == {("a.weight", 0): [0, 2], ("a.bias", 0): [0, 2], ("m.weight", 1): [0, 2]}
    assert _owned(gb, [1, 3]) == {("b.weight", 0): [1, 3], ("b.bias", 0): [1, 3], ("m.weight", 1): [5, 7]}
    assert _owned(gb, [5]) == {("b.weight", 0): [5], ("b.bias", 0): [5], ("m.weight", 1): [9]}
    assert ga.source == ["a"] and gb.source == ["b"]


def test_slices_grouped_conv(tiny):
    _, _, graph = tiny
    grp = _group(graph, "g.weight", 0, unit="group")
    assert grp.size == 2
    # conv group 1 = m's outputs 4..7 = g's outputs 3..5 = head's inputs 3..5
    assert _owned(grp, [1]) == {("m.weight", 0): [4, 5, 6, 7], ("m.bias", 0): [4, 5, 6, 7],
                                ("g.weight", 0): [3, 4, 5], ("g.bias", 0): [3, 4, 5],
                                ("head.weight", 1): [3, 4, 5]}
    # input channel 1 of every conv group = m's outputs 1 and 5 = g.weight[:, 1]
    cin = _group(graph, "g.weight", 1)
    assert cin.size == 4
    assert _owned(cin, [1]) == {("m.weight", 0): [1, 5], ("m.bias", 0): [1, 5], ("g.weight", 1): [1]}
    # output channel 2 of every conv group = g's outputs 2 and 5
    cout = [g for g in graph.groups if g.size == 3 and any(f == "head.weight" for f, _, _ in g.slices([]))]
    assert len(cout) == 1
    assert _owned(cout[0], [2]) == {("g.weight", 0): [2, 5], ("g.bias", 0): [2, 5], ("head.weight", 1): [2, 5]}


def test_slices_prune_matches_index_math(tiny):
    model, x, graph = tiny
    grp = _group(graph, "g.weight", 0, unit="group")
    cin = _group(graph, "g.weight", 1)
    w_m, w_g = model.m.weight.detach().clone(), model.g.weight.detach().clone()
    pk.prune(model, graph, {grp.id: [0], cin.id: [3]})
    assert model.g.groups == 1 and model.g.in_channels == 3 and model.g.out_channels == 3
    torch.testing.assert_close(model.m.weight, w_m[[4, 5, 6]])
    torch.testing.assert_close(model.g.weight, w_g[3:6][:, [0, 1, 2]])


def test_slices_rejects_bad_units(tiny):
    _, _, graph = tiny
    g = graph.prunable_groups[0]
    with pytest.raises(ValueError):
        g.slices([g.size])
    with pytest.raises(ValueError):
        g.slices([-1])


# ---------------------------------------------------------------- plan validation
def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(sd[k].shape == state[k].shape and torch.equal(sd[k], state[k])
                                             for k in state)


def test_plan_bad_group_id(tiny):
    model, x, graph = tiny
    before = _state(model)
    with pytest.raises((KeyError, ValueError, pk.PruningError)):
        pk.prune(model, graph, {len(graph.groups) + 5: [0]})
    with pytest.raises((KeyError, ValueError, pk.PruningError, TypeError)):
        pk.prune(model, graph, {"a": [0]})
    assert _same_state(model, before)


def test_plan_out_of_range_units(tiny):
    model, x, graph = tiny
    g = graph.prunable_groups[0]
    before = _state(model)
    with pytest.raises(pk.PruningError, match=r"\[0, %d\)" % g.size):
        pk.prune(model, graph, {g.id: [g.size]})
    with pytest.raises(pk.PruningError):
        pk.prune(model, graph, {g.id: [-1]})
    assert _same_state(model, before)


def test_plan_removing_all_units(tiny):
    model, x, graph = tiny
    g = graph.prunable_groups[0]
    before = _state(model)
    with pytest.raises(pk.PruningError, match="keep at least one"):
        pk.prune(model, graph, {g.id: list(range(g.size))})
    assert _same_state(model, before)


def test_plan_pinned_group(tiny):
    model, x, graph = tiny
    pinned = [g for g in graph.groups if not g.prunable]
    assert pinned
    before = _state(model)
    for g in pinned:
        with pytest.raises(pk.PruningError, match="not prunable"):
            pk.prune(model, graph, {g.id: [0]})
    assert _same_state(model, before)


def test_plan_not_a_mapping(tiny):
    model, x, graph = tiny
    with pytest.raises(TypeError):
        pk.prune(model, graph, [(0, [1])])


def test_graph_still_usable_after_rejected_plan(tiny):
    model, x, graph = tiny
    g = graph.prunable_groups[0]
    with pytest.raises(pk.PruningError):
        pk.prune(model, graph, {g.id: list(range(g.size))})
    pk.prune(model, graph, {g.id: [0]})
    with pytest.raises(pk.PruningError, match="already used"):
        pk.prune(model, graph, {g.id: [1]})


def test_empty_plan_is_noop(tiny):
    model, x, graph = tiny
    before = _state(model)
    assert pk.prune(model, graph, {}) is model
    assert pk.prune(model, graph, {graph.prunable_groups[0].id: []}) is model
    assert _same_state(model, before)


def test_graph_of_other_model(tiny):
    model, x, graph = tiny
    other = copy.deepcopy(model)
    with pytest.raises(pk.PruningError):
        pk.prune(other, graph, {graph.prunable_groups[0].id: [0]})


def test_missing_example_input():
    with pytest.raises(ValueError):
        pk.analyze(CatGrouped())
    with pytest.raises(TypeError):
        pk.analyze(lambda x: x, torch.randn(1, 3, 4, 4))


def test_wrong_example_input_raises_capture_error():
    with pytest.raises(pk.CaptureError):
        pk.analyze(CatGrouped(), torch.randn(2, 5, 6, 6))


# ---------------------------------------------------------------- rollback on VerificationError
class ShapeDependentValue(nn.Module):
    """The forward reads a channel count at Python level and changes *values* (not shapes) with it:
    the dry run sees identical ops and shapes; only verification can catch it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.bn(self.c1(x))
        y = y * (2.0 if y.shape[1] == 8 else -3.0)
        return self.c2(torch.relu(y))


def test_rollback_on_verification_error():
    torch.manual_seed(0)
    model = ShapeDependentValue().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    graph = pk.analyze(model, x)
    g = [g for g in graph.prunable_groups if "c1" in g.modules][0]
    params_before = {n: p for n, p in model.named_parameters()}
    before = _state(model)
    with pytest.raises(pk.VerificationError, match="restored"):
        pk.prune(model, graph, {g.id: [0, 3, 5]}, verify=True)
    assert _same_state(model, before)
    # the very same Parameter objects are back (optimizers holding them keep working)
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    assert model.c1.out_channels == 8 and model.bn.num_features == 8 and model.c2.in_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    # verify=False trusts the analysis and removes the units
    pk.prune(model, pk.analyze(model, x), {g.id: [0, 3, 5]}, verify=False)
    assert model.c1.out_channels == 5


class GroupNormReluHead(nn.Module):
    """FCOS's regression tower in small: conv -> GroupNorm -> ReLU -> conv -> ReLU, so the output has exact zeros."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.c2(torch.relu(self.gn(self.c1(x)))))


def test_inexact_group_with_exact_zeros_in_the_output_verifies():
    # an inexact group (one channel of every GroupNorm group: the statistics change) is checked on shapes only;
    # that check once compared values with rtol=inf, and inf * 0 = NaN failed wherever the output was exactly 0
    torch.manual_seed(0)
    model = GroupNormReluHead().eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert (model(x) == 0).any()
    graph = pk.analyze(model, x)
    inexact = [g for g in graph.prunable_groups if not g.exact and "c1" in g.modules]
    assert inexact, [(g.id, g.size, g.exact) for g in graph.groups]
    pk.prune(model, graph, {inexact[0].id: [0]})
    assert model.c1.out_channels == 6 and model.gn.num_channels == 6 and model.gn.num_groups == 2


# ---------------------------------------------------------------- meta device
def _structure(graph):
    return [(g.size, g.unit, g.prunable, g.exact, sorted((f, d) for f, d, _ in g.slices([])))
            for g in graph.groups]


def test_analyze_meta_model():
    torch.manual_seed(0)
    cpu = CatGrouped().eval()
    ref = _structure(pk.analyze(cpu, _x()))
    with torch.device("meta"):
        meta = CatGrouped()
    assert next(meta.parameters()).is_meta
    g1 = pk.analyze(meta, _x())
    assert _structure(g1) == ref
    g2 = pk.analyze(meta, torch.empty(2, 3, 6, 6, device="meta"))
    assert _structure(g2) == ref
    assert all(p.is_meta for p in meta.parameters())  # untouched
    assert g1.macs() == pk.analyze(cpu, _x()).macs() > 0


def test_analyze_device_meta_on_cpu_model():
    torch.manual_seed(0)
    cpu = CatGrouped().eval()
    assert _structure(pk.analyze(cpu, _x(), device="meta")) == _structure(pk.analyze(cpu, _x(), device="real"))


# ---------------------------------------------------------------- mask / apply_masks / unmask
def test_mask_apply_unmask_roundtrip(tiny):
    model, x, graph = tiny
    ga = _group(graph, "a.weight", 0)
    grp = _group(graph, "g.weight", 0, unit="group")
    plan = {ga.id: [1, 2], grp.id: [0]}
    orig = _state(model)
    masked_entries = {}  # fqn -> bool mask of entries the plan owns
    for gid, units in plan.items():
        for f, d, idx in graph.group(gid).slices(units):
            m = masked_entries.setdefault(f, torch.zeros_like(orig[f], dtype=torch.bool))
            m.index_fill_(d, idx, True)

    pk.mask(model, graph, plan)
    sd = model.state_dict()
    for k, v in orig.items():
        if k in masked_entries:
            assert (sd[k][masked_entries[k]] == 0).all(), k
            assert torch.equal(sd[k][~masked_entries[k]], v[~masked_entries[k]]), k
        else:
            assert torch.equal(sd[k], v), k
    # the masked model computes what the pruned model computes (both groups are exact)
    assert all(graph.group(g).exact for g in plan)
    pruned = copy.deepcopy(model)
    pk.unmask(pruned)
    pk.prune(pruned, pk.analyze(pruned, x), plan)
    x2 = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x2), model(x2), rtol=1e-4, atol=1e-5)

    # a fake optimizer step moves every parameter; apply_masks re-zeroes only the masked entries
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    pk.apply_masks(model)
    sd = model.state_dict()
    for k, m in masked_entries.items():
        assert (sd[k][m] == 0).all(), k
        torch.testing.assert_close(sd[k][~m], orig[k][~m] + 1.0)

    # unmask restores the original values of the masked entries and keeps the trained ones
    pk.unmask(model)
    sd = model.state_dict()
    for k, v in orig.items():
        if k in masked_entries:
            m = masked_entries[k]
            assert torch.equal(sd[k][m], v[m]), k
            torch.testing.assert_close(sd[k][~m], v[~m] + 1.0)
        elif k.endswith(("weight", "bias")):
            torch.testing.assert_close(sd[k], v + 1.0)
    # no masks left: apply_masks is a no-op
    before = _state(model)
    pk.apply_masks(model)
    assert _same_state(model, before)


def test_mask_accumulates_and_unmask_restores_all(tiny):
    model, x, graph = tiny
    ga = _group(graph, "a.weight", 0)
    gb = _group(graph, "b.weight", 0)
    orig = _state(model)
    pk.mask(model, graph, {ga.id: [0]})
    pk.mask(model, graph, {gb.id: [4]})
    pk.mask(model, graph, {ga.id: [3]})
    w = model.m.weight
    assert (w[:, [0, 3, 8]] == 0).all()
    assert (model.a.weight[[0, 3]] == 0).all() and (model.b.weight[4] == 0).all()
    pk.unmask(model)
    assert _same_state(model, orig)


def test_mask_rejects_pinned_group(tiny):
    model, x, graph = tiny
    pinned = [g for g in graph.groups if not g.prunable][0]
    with pytest.raises(pk.PruningError):
        pk.mask(model, graph, {pinned.id: [0]})


def test_mask_twice_unmask_restores_values_at_mask_time():
    import prunekit as pk
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.Conv2d(6, 2, 3)).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = pk.analyze(model, x)
    gid = graph.prunable_groups[0].id
    pk.mask(model, graph, {gid: [0]})
    with torch.no_grad():
        model[0].weight[1].fill_(7.0)  # training moved unit 1 before it was masked
    pk.mask(model, graph, {gid: [1]})
    assert model[0].weight[1].abs().sum() == 0
    pk.unmask(model)
    assert torch.all(model[0].weight[1] == 7.0)


def test_mask_refuses_graph_of_another_model():
    import prunekit as pk
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(6, 2, 3))
    b = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Conv2d(6, 2, 3))
    graph = pk.analyze(a, torch.randn(1, 3, 8, 8))
    with pytest.raises(pk.PruningError, match="different model"):
        pk.mask(b, graph, {graph.prunable_groups[0].id: [0]})


def test_factory_ops_are_not_replayed_on_the_real_fallback():
    """A forward that needs real values falls back from meta to real tensors; factory ops (arange) created in the
    meta attempt must not come back as meta tensors in the real one."""
    class NeedsValues(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            idx = torch.arange(4).float()
            if float(idx.sum().item()) > 0:  # .item() is impossible on meta
                x = x + idx
            return self.fc(x)

    model = NeedsValues().eval()
    x = torch.randn(2, 4)
    pk.analyze(model, x)  # meta attempt fails at .item(): the real attempt must see a real arange
    graph = pk.analyze(model, x)
    assert graph.tape.device == "real"


def test_dry_run_runs_on_real_tensors_not_pinning_everything_when_the_forward_needs_real_values():
    """A forward that calls .item() is captured with real tensors; the meta dry run cannot run it at all, so it
    runs on real tensors instead (not skipped, not pinning every group); pk.prune's verification still checks."""
    class NeedsValues(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            if float(h.sum().item()) >= 0:  # .item() is impossible on meta
                h = h * 2
            return self.fc2(h)

    model = NeedsValues().eval()
    x = torch.randn(2, 4)
    graph = pk.analyze(model, x)
    assert graph.tape.device == "real"
    assert graph.validation_skipped is None and graph.validation_backend == "real"
    g = next(g for g in graph.groups if any(m.fqn == "fc1.weight" and m.dim == 0 for m in g.members))
    assert g.prunable and g.size == 8
    ref = model(x)
    pk.prune(model, graph, {g.id: [0, 3]})
    assert model.fc1.out_features == 6 and model(x).shape == ref.shape


def test_meta_cache_key_keeps_list_nesting():
    """The meta fast path caches output metadata by argument signature: int lists of different lengths must not
    collide when flattened (``max_pool2d(x, [3], [3, 1])`` vs ``max_pool2d(x, [3, 3], [1])``)."""
    from prunekit.capture.tape import _meta_call
    x = torch.empty(1, 2, 9, 9, device="meta")
    f = torch.ops.aten.max_pool2d.default
    a = _meta_call(f, (x, [3], [3, 1]), {})
    b = _meta_call(f, (x, [3, 3], [1]), {})
    assert tuple(a.shape) == tuple(f(x, [3], [3, 1]).shape) == (1, 2, 3, 7)
    assert tuple(b.shape) == tuple(f(x, [3, 3], [1]).shape) == (1, 2, 7, 7)


def test_meta_cache_replays_in_place_ops_only_for_signatures_that_passed():
    """In-place ops on meta (relu_, hardswish_, add_) are replayed from the cache (they cost ~1-2 ms each as
    Python decompositions) -- but a new signature still runs the kernel, so a broken broadcast still raises."""
    from prunekit.capture.tape import _meta_call
    f = torch.ops.aten.add_.Tensor
    x = torch.empty(2, 8, device="meta")
    assert _meta_call(f, (x, torch.empty(8, device="meta")), {}) is x
    assert _meta_call(f, (x, torch.empty(8, device="meta")), {}) is x  # replayed
    with pytest.raises(RuntimeError):
        _meta_call(f, (x, torch.empty(7, device="meta")), {})
    h = torch.ops.aten.hardswish_.default
    y = torch.empty(3, 5, device="meta")
    assert _meta_call(h, (y,), {}) is y and _meta_call(h, (y,), {}) is y


def test_analyses_in_parallel_threads_match_sequential_ones():
    """Capture state (dispatch mode, module stack hooks, interleaved-factor collection, space ids) is per
    analysis: different models analysed at the same time in several threads give the same groups as one after
    another.  (One model object analysed by two threads at once is not supported: the dry run swaps its tensors.)"""
    import threading

    def conv_net():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()

    def mlp():
        return nn.Sequential(nn.Linear(5, 12), nn.GELU(), nn.LayerNorm(12), nn.Linear(12, 6), nn.ReLU(),
                             nn.Linear(6, 2)).eval()

    torch.manual_seed(0)
    cases = [(conv_net(), torch.randn(2, 3, 9, 9)) if i % 2 == 0 else (mlp(), torch.randn(3, 5)) for i in range(6)]
    want = [pk.analyze(m, x).summary() for m, x in cases]
    got: list = [None] * len(cases)
    start = threading.Barrier(len(cases))

    def run(i):
        start.wait()
        got[i] = pk.analyze(*cases[i]).summary()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
