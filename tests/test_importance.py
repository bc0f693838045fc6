"""Importance criteria: hand-computed scores on tiny layers, head groups, resnet18 coverage, model hygiene."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.plan.importance import CRITERIA, get_criterion, unit_view
from prunekit.analysis.analyzer import Member

ALL = sorted(CRITERIA)
DATA = ("taylor", "taylor_act", "hessian")
CALIB = ("activation", "wanda_sp", "flap")  # calibration criteria: data, no loss (tests/test_calibration.py)


# ---------------------------------------------------------------------------- tiny models
class ConvBNConv(nn.Module):
    """Conv2d(2,3,1) -> BN(3) -> ReLU -> Conv2d(3,2,1) with hand-set weights."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.c1.weight.copy_(torch.tensor([[1., 2.], [0., -3.], [4., 0.]]).reshape(3, 2, 1, 1))
            self.c1.bias.copy_(torch.tensor([10., -20., 30.]))
            self.bn.weight.copy_(torch.tensor([0.5, -2., 1.]))
            self.bn.bias.copy_(torch.tensor([1., 1., -1.]))
            self.c2.weight.copy_(torch.tensor([[1., 0., 2.], [-1., 1., 0.]]).reshape(2, 3, 1, 1))

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x))))


def conv_group(model=None):
    model = model or ConvBNConv()
    graph = pk.analyze(model, torch.randn(1, 2, 4, 4))
    g = next(g for g in graph.groups if "c1" in g.source)
    assert g.prunable and g.size == 3
    return model, graph, g


def linear_out(weight, bias=None):
    """A single Linear whose output channels form a prunable group (prune_outputs=True)."""
    out_f, in_f = weight.shape
    model = nn.Linear(in_f, out_f)
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(torch.zeros(out_f) if bias is None else bias)
    graph = pk.analyze(model, torch.randn(1, in_f), prune_outputs=True)
    g = next(g for g in graph.groups if any(m.fqn == "weight" and m.dim == 0 for m in g.members))
    assert g.size == out_f
    return model, graph, g


class Attention(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.heads, self.hd).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), scale=0.5)
        return self.o(y.transpose(1, 2).reshape(b, n, self.heads * self.hd))


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.attn = Attention()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.attn(self.inp(x)).mean(1))


# ---------------------------------------------------------------------------- the member helper
@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data())
def test_unit_view_rows_are_exactly_the_group_slices(sizes, data):
    pos = data.draw(st.integers(0, len(sizes) - 1))
    offset = data.draw(st.integers(0, 3))
    extra = data.draw(st.integers(0, 2))
    ndim = data.draw(st.integers(1, 3))
    dim = data.draw(st.integers(0, ndim - 1))
    shape = [data.draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[dim] = offset + math.prod(sizes) + extra
    t = torch.randn(shape)
    m = Member("w", dim, offset, tuple(sizes), pos)
    v = unit_view(m, t)
    assert v.shape[0] == sizes[pos]
    for u in range(sizes[pos]):
        ref = t.index_select(dim, m.indices(torch.tensor([u]))).movedim(dim, 0).reshape(-1)
        assert torch.equal(v[u], ref)


def test_unit_view_rejects_a_tensor_that_does_not_fit():
    with pytest.raises(ValueError, match="Re-run pk.analyze"):
        unit_view(Member("w", 0, 2, (3,), 0), torch.zeros(4, 2))


# ---------------------------------------------------------------------------- magnitude by hand
# c1 rows [1,2] [0,-3] [4,0]; |gamma| .5 2 1; c2 columns [1,-1] [0,1] [2,0]
L1_C1, L1_BN, L1_C2 = [3., 3., 4.], [.5, 2., 1.], [2., 1., 2.]
L2_C1, L2_C2 = [math.sqrt(5), 3., 4.], [math.sqrt(2), 1., 2.]


@pytest.mark.parametrize("reduction,expected", [
    ("mean", [(3 + .5 + 2) / 3, (3 + 2 + 1) / 3, (4 + 1 + 2) / 3]),
    ("sum", [5.5, 6., 7.]),
    ("max", [3., 3., 4.]),
])
def test_l1_with_consumers_each_reduction(reduction, expected):
    model, graph, g = conv_group()
    s = get_criterion("l1", reduction=reduction).scores(model, graph)
    assert set(s) == {gr.id for gr in graph.prunable_groups}
    torch.testing.assert_close(s[g.id], torch.tensor(expected))


def test_l2_each_reduction_and_member_options():
    model, graph, g = conv_group()
    cols = list(zip(L2_C1, L1_BN, L2_C2))
    for red, f in (("mean", lambda c: sum(c) / 3), ("sum", sum), ("max", max)):
        s = get_criterion("l2", reduction=red).scores(model, graph, [g.id])[g.id]
        torch.testing.assert_close(s, torch.tensor([f(c) for c in cols]))
    # without consumers: c1 rows and BN scale only
    s = get_criterion("l1", reduction="sum", include_consumers=False).scores(model, graph, [g])[g.id]
    torch.testing.assert_close(s, torch.tensor([3.5, 5., 5.]))
    # with biases: c1.bias |10 -20 30| and bn.bias |1 1 -1| join the sum
    s = get_criterion("l1", reduction="sum", include_bias=True).scores(model, graph, [g])[g.id]
    torch.testing.assert_close(s, torch.tensor([5.5 + 11, 6. + 21, 7. + 31]))
    # frozen parameters can be left out
    model.c2.weight.requires_grad_(False)
    s = get_criterion("l1", reduction="sum", skip_frozen=True).scores(model, graph, [g])[g.id]
    torch.testing.assert_close(s, torch.tensor([3.5, 5., 5.]))


def test_normalize_options():
    model, graph, g = conv_group()
    raw = torch.tensor([5.5, 6., 7.])
    for how, exp in (("mean", raw / raw.mean()), ("max", raw / 7), ("sum", raw / raw.sum()),
                     ("standard", (raw - raw.mean()) / raw.std(unbiased=False))):
        s = get_criterion("l1", reduction="sum", normalize=how).scores(model, graph, [g])[g.id]
        torch.testing.assert_close(s, exp)
    with pytest.raises(ValueError, match="normalize"):
        get_criterion("l1", normalize="minmax")
    with pytest.raises(ValueError, match="reduction"):
        get_criterion("l1", reduction="median")


# ---------------------------------------------------------------------------- FPGM, BN scale, LAMP, random
def test_fpgm_geometric_median_scores_lowest():
    model = ConvBNConv()
    with torch.no_grad():  # filters (0,0), (3,0), (0,4): distance sums 3+4, 3+5, 4+5
        model.c1.weight.copy_(torch.tensor([[0., 0.], [3., 0.], [0., 4.]]).reshape(3, 2, 1, 1))
    model, graph, g = conv_group(model)
    for red in ("mean", "sum", "max"):  # one source layer: consumers / BN do not take part
        s = get_criterion("fpgm", reduction=red).scores(model, graph, [g])[g.id]
        torch.testing.assert_close(s, torch.tensor([7., 8., 9.]))
        assert s.argmin() == 0


def test_bn_scale_is_abs_gamma_and_falls_back_to_l1(caplog):
    model, graph, g = conv_group()
    s = get_criterion("bn_scale").scores(model, graph, [g])[g.id]
    torch.testing.assert_close(s, torch.tensor([.5, 2., 1.]))
    lin, lgraph, lg = linear_out(torch.tensor([[1., -2.], [3., 0.], [0., .5]]))
    with caplog.at_level(logging.INFO, logger="prunekit.importance"):
        s = get_criterion("bn_scale").scores(lin, lgraph, [lg])[lg.id]
    torch.testing.assert_close(s, torch.tensor([3., 3., .5]))
    assert "l1" in caplog.text and str(lg.id) in caplog.text


def test_lamp_formula_with_ties():
    # squared row norms 1, 4, 9, 4 -> 1/(1+4+4+9), 4/(4+4+9), 9/9, 4/(4+4+9)
    lin, graph, g = linear_out(torch.tensor([[1., 0.], [2., 0.], [0., 3.], [0., -2.]]))
    s = get_criterion("lamp").scores(lin, graph, [g])[g.id]
    torch.testing.assert_close(s, torch.tensor([1 / 18, 4 / 17, 1., 4 / 17]))


def test_random_is_seeded():
    model, graph, g = conv_group()
    a = get_criterion("random", seed=3).scores(model, graph)
    b = get_criterion("random", seed=3).scores(model, graph)
    c = get_criterion("random", seed=4).scores(model, graph)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[g.id], c[g.id])
    assert ((a[g.id] >= 0) & (a[g.id] < 1)).all()
    # groups get their own streams (same-size groups do not rank alike)
    two = [gr for gr in graph.groups if gr.size == 2]
    r = get_criterion("random", seed=3).scores(model, graph, two)
    assert len(two) == 2 and not torch.equal(r[two[0].id], r[two[1].id])
    # a group's scores do not depend on which other groups are scored
    assert torch.equal(get_criterion("random", seed=3).scores(model, graph, [g])[g.id], a[g.id])


# ---------------------------------------------------------------------------- data criteria by hand
W3 = torch.tensor([[1., 2.], [3., -1.], [.5, .5]])
C3 = torch.tensor([1., -2., 3.])


def weighted_sum_loss(model, batch):
    return (model(batch) * C3).sum()


def test_taylor_on_linear_with_known_gradient():
    # dL/dW[j] = c_j * x, so sum_i w_ji g_ji = c_j * (W_j . x) = 3, -4, 3 for x = (1, 1)
    lin, graph, g = linear_out(W3, torch.tensor([1., 0., 0.]))
    x = torch.tensor([[1., 1.]])
    s = get_criterion("taylor").scores(lin, graph, [g], data=[x], loss_fn=weighted_sum_loss)[g.id]
    torch.testing.assert_close(s, torch.tensor([3., 4., 3.]))
    # accumulated per batch: x and -x flip the sign of w*g but both count
    s = get_criterion("taylor").scores(lin, graph, [g], data=lambda: [x, -x], loss_fn=weighted_sum_loss)[g.id]
    torch.testing.assert_close(s, torch.tensor([6., 8., 6.]))
    s = get_criterion("taylor", max_batches=1).scores(lin, graph, [g], data=[x, -x], loss_fn=weighted_sum_loss)
    torch.testing.assert_close(s[g.id], torch.tensor([3., 4., 3.]))
    # the bias joins when asked: g_b = c, |w*g| adds |b_j c_j| = 1, 0, 0 inside the member mean
    s = get_criterion("taylor", include_bias=True, reduction="sum").scores(
        lin, graph, [g], data=[x], loss_fn=weighted_sum_loss)[g.id]
    torch.testing.assert_close(s, torch.tensor([4., 4., 3.]))


def test_taylor_act_on_linear_with_known_gradient():
    # a = W x + b; dL/da = c.  Sample 1 x=(1,1): a = (4, 2, 1) -> |a c| = 4, 4, 3; sample 2 x=0: a = b -> 1, 0, 0
    lin, graph, g = linear_out(W3, torch.tensor([1., 0., 0.]))
    x = torch.tensor([[1., 1.], [0., 0.]])
    s = get_criterion("taylor_act").scores(lin, graph, [g], data=[x], loss_fn=weighted_sum_loss)[g.id]
    torch.testing.assert_close(s, torch.tensor([2.5, 2., 1.5]))


def test_taylor_act_on_conv_matches_autograd():
    torch.manual_seed(0)
    model, graph, g = conv_group()
    model.eval()
    x = torch.randn(3, 2, 4, 4)
    loss_fn = lambda m, b: m(b).pow(2).sum()  # noqa: E731
    s = get_criterion("taylor_act").scores(model, graph, [g], data=[x], loss_fn=loss_fn)[g.id]
    a = model.c1(x)
    a.retain_grad()
    model.c2(F.relu(model.bn(a))).pow(2).sum().backward()
    ref = (a * a.grad).sum((2, 3)).abs().mean(0).detach()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(s, ref)


def test_hessian_on_linear_with_mse():
    # W = [[1,1],[0,1]], b = 0, x = (1,2), y = 0: out = (3,2); mse = mean(out^2) -> dL/dout = out = (3,2)
    # G = dL/dout x^T = [[3,6],[2,4]]; 0.5 * sum_row (G*W)^2 = 0.5*(9+36), 0.5*(0+16)
    lin, graph, g = linear_out(torch.tensor([[1., 1.], [0., 1.]]))
    batch = (torch.tensor([[1., 2.]]), torch.zeros(1, 2))
    mse = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    s = get_criterion("hessian").scores(lin, graph, [g], data=[batch], loss_fn=mse)[g.id]
    torch.testing.assert_close(s, torch.tensor([22.5, 8.]))
    s = get_criterion("hessian").scores(lin, graph, [g], data=[batch, batch], loss_fn=mse)[g.id]
    torch.testing.assert_close(s, torch.tensor([45., 16.]))


def test_default_loss_and_forward_fn():
    lin, graph, g = linear_out(W3)
    x, y = torch.tensor([[1., 1.]]), torch.tensor([2])
    ref = get_criterion("taylor").scores(lin, graph, [g], data=[(x, y)],
                                         loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))[g.id]
    s = get_criterion("taylor").scores(lin, graph, [g], data=[(x, y)])[g.id]
    torch.testing.assert_close(s, ref)
    assert (s > 0).all()
    doubled = get_criterion("taylor").scores(lin, graph, [g], data=[(x, y)], forward_fn=lambda m, t: m(t) * 0)
    assert torch.equal(doubled[g.id], torch.zeros(3))  # forward_fn replaced model(x) in the default loss
    with pytest.raises(ValueError, match=r"expects batches \(x, y\)"):
        get_criterion("taylor").scores(lin, graph, [g], data=[x])


def test_data_criteria_need_data_and_a_scalar_loss():
    model, graph, g = conv_group()
    for name in DATA:
        assert get_criterion(name).needs_data
        with pytest.raises(ValueError, match=f"criterion '{name}' needs data=... batches and a loss_fn"):
            get_criterion(name).scores(model, graph)
    assert not any(get_criterion(n).needs_data for n in set(ALL) - set(DATA) - set(CALIB))
    with pytest.raises(ValueError, match="scalar"):
        get_criterion("taylor").scores(model, graph, data=[torch.randn(2, 2, 4, 4)], loss_fn=lambda m, b: m(b))
    with pytest.raises(ValueError, match="no batches"):
        get_criterion("hessian").scores(model, graph, data=[], loss_fn=lambda m, b: m(b).sum())


@pytest.mark.parametrize("name", DATA)
def test_data_criteria_leave_the_model_unchanged(name):
    torch.manual_seed(1)
    model = nn.Sequential(ConvBNConv(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(32, 4))
    model.train()  # BN in training mode would update running stats during the passes
    model[1].eval()  # mixed training flags must come back as they were
    model[0].c2.weight.requires_grad_(False)
    model[3].weight.grad = torch.full_like(model[3].weight, 7.)
    grad_obj = model[3].weight.grad
    graph = pk.analyze(model, torch.randn(2, 2, 4, 4))
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    modes = {k: m.training for k, m in model.named_modules()}
    batches = [(torch.randn(4, 2, 4, 4), torch.randint(0, 4, (4,))) for _ in range(2)]
    rng = torch.get_rng_state()  # dropout in the passes must not move the user's RNG
    def loss_fn(m, b):  # a loss that switches modes itself (some user code does): flags must still come back
        m.train()
        return F.cross_entropy(m(b[0]), b[1])

    s = get_criterion(name).scores(model, graph, data=batches, loss_fn=loss_fn)
    assert s and all(torch.isfinite(v).all() for v in s.values())
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    assert modes == {k: m.training for k, m in model.named_modules()}
    assert model[3].weight.grad is grad_obj and (grad_obj == 7).all()
    assert all(p.grad is None for k, p in model.named_parameters() if k != "3.weight")
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------------------- head groups
def test_head_group_unit_aggregates_the_whole_head():
    torch.manual_seed(0)
    model = AttnNet()
    x = torch.randn(2, 4, 5)
    graph = pk.analyze(model, x)
    head = next(g for g in graph.prunable_groups if g.unit == "head")
    assert head.size == 2 and {"attn.q", "attn.k", "attn.v"} <= set(head.source)
    # each unit row is exactly the head's slice of the parameter (all head_dim rows)
    for u in range(2):
        for m, (fqn, dim, idx) in zip(head.members, head.slices([u])):  # slices come in member order
            p = model.get_parameter(fqn).detach()
            assert len(idx) == 4  # head_dim entries along the member's dim
            assert torch.equal(unit_view(m, p)[u], p.index_select(dim, idx).movedim(dim, 0).reshape(-1))
    with torch.no_grad():  # silence head 1 (rows/columns 4..7 of q, k, v, o)
        for lin in (model.attn.q, model.attn.k, model.attn.v):
            lin.weight[4:].zero_()
            lin.bias[4:].zero_()
        model.attn.o.weight[:, 4:].zero_()
    data = [(torch.randn(3, 4, 5), torch.randint(0, 3, (3,)))]
    for name in ("l1", "l2", "lamp", "bn_scale", "taylor", "taylor_act", "hessian"):
        s = get_criterion(name).scores(model, graph, data=data)[head.id]
        assert s.shape == (2,) and s[1] < s[0], name
        if name not in ("l1", "l2", "bn_scale"):
            assert s[1] == 0, name


class FunctionalLinear(nn.Module):
    """``lin``'s weight is used through F.linear by the parent (as nn.MultiheadAttention does with out_proj)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(x, self.lin.weight, self.lin.bias)))


def test_taylor_act_falls_back_to_taylor_when_no_source_module_runs(caplog):
    torch.manual_seed(0)
    model = FunctionalLinear()
    x = torch.randn(2, 4)
    graph = pk.analyze(model, x)
    g = next(g for g in graph.prunable_groups if g.source == ["lin"])
    data = [(x, torch.tensor([0, 2]))]
    with caplog.at_level(logging.INFO, logger="prunekit.importance"):
        s = get_criterion("taylor_act").scores(model, graph, [g], data=data)
    assert "taylor_act: 1 group(s) use taylor" in caplog.text and f"[{g.id}]" in caplog.text
    torch.testing.assert_close(s[g.id], get_criterion("taylor").scores(model, graph, [g], data=data)[g.id])
    assert (s[g.id] > 0).all()


# ---------------------------------------------------------------------------- a real network
@pytest.fixture(scope="module")
def resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    return model, pk.analyze(model, x), [(x, torch.tensor([1, 7]))]


@pytest.mark.parametrize("name", ALL)
def test_resnet18_scores_every_prunable_group(resnet, name):
    model, graph, data = resnet
    assert len(graph.prunable_groups) >= 10
    s = pk.get_criterion(name, normalize="mean").scores(model, graph, data=data)
    assert set(s) == {g.id for g in graph.prunable_groups}
    for g in graph.prunable_groups:
        v = s[g.id]
        assert v.dtype == torch.float32 and v.shape == (g.size,) and torch.isfinite(v).all(), (name, g)
    if name != "bn_scale":  # random-init BN scales are all 1
        assert any(s[g.id].std() > 0 for g in graph.prunable_groups)


# ---------------------------------------------------------------------------- registry
def test_registry():
    assert set(ALL) == {"l1", "l2", "fpgm", "taylor", "taylor_act", "bn_scale", "lamp", "random", "hessian",
                        "activation", "wanda_sp", "flap"}
    for name, cls in CRITERIA.items():
        c = get_criterion(name)
        assert isinstance(c, cls) and isinstance(c, pk.Criterion) and c.name == name
    assert get_criterion("L2Norm").name == "l2" and get_criterion("TaylorFOWeight").name == "taylor"
    c = get_criterion("lamp", reduction="max")
    assert get_criterion(c) is c and c.reduction == "max"
    assert get_criterion(CRITERIA["fpgm"], normalize="max").normalize == "max"
    with pytest.raises(ValueError, match="unknown importance criterion 'nope'"):
        get_criterion("nope")
    with pytest.raises(TypeError):
        get_criterion(c, reduction="sum")
    model, graph, g = conv_group()
    assert set(get_criterion("l1").scores(model, graph, groups=[g.id])) == {g.id}
    with pytest.raises(KeyError):
        get_criterion("l1").scores(model, graph, groups=[999])
