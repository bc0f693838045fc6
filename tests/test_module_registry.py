"""The module registry (analysis/modules.py): one place for layer knowledge, looked up by isinstance, and
``pk.register_module`` for a custom layer whose size attributes must follow pruning."""
import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.analysis import modules as M


class HeadProj(nn.Module):
    """A projection that subclasses no torch layer; its forward reads ``self.out_features``."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out))
        self.in_features, self.out_features = d_in, d_out

    def forward(self, x):
        return (x @ self.weight.t()).reshape(-1, self.out_features) + self.bias


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = HeadProj(6, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.act(self.proj(x)))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 5, 6)


@pytest.fixture
def registered_headproj():
    spec = pk.register_module(HeadProj, out_dim=0, in_dim=1, act_dim=-1,
                              attrs={"out_features": ("weight", 0), "in_features": ("weight", 1)})
    yield spec
    pk.unregister_module(HeadProj)


def _proj_group(graph):
    return next(g for g in graph.groups if any(m.fqn == "proj.weight" and m.dim == 0 for m in g.members))


def test_unregistered_layer_attribute_is_not_followed(net):
    model, x = net
    assert M.spec_of(model.proj) is None
    g = _proj_group(pk.analyze(model, x))
    # nothing rewrites proj.out_features, so the pruned forward breaks and the dry run pins the group
    assert not g.prunable and "dry-run" in g.reason
    assert g.source == []  # not known as a source layer either


def test_registered_layer_prunes_exactly_and_attribute_follows(net, registered_headproj):
    model, x = net
    graph = pk.analyze(model, x)
    g = _proj_group(graph)
    assert g.prunable and g.exact and g.source == ["proj"]
    assert any(b.module == "proj" and b.attr == "out_features" for b in graph.bindings)
    drop = [1, 4, 7, 9]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.proj.weight[drop] = 0
        zeroed.proj.bias[drop] = 0
        ref = zeroed(x)
    pk.prune(model, graph, {g.id: drop})
    assert model.proj.out_features == 12 and model.proj.weight.shape == (12, 6)
    assert model.proj.in_features == 6 and model.head.in_features == 12
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_registered_layer_is_scored_as_a_source(net, registered_headproj):
    model, x = net
    from prunekit.plan.importance.base import member_role
    g = _proj_group(pk.analyze(model, x))
    roles = {(m.fqn, m.dim): member_role(model, m) for m in g.members}
    assert roles[("proj.weight", 0)] == "source" and roles[("head.weight", 1)] == "consumer"


def test_registration_refused_twice_replace_and_unregister():
    pk.register_module(HeadProj, out_dim=0)
    try:
        with pytest.raises(ValueError, match="already registered"):
            pk.register_module(HeadProj, out_dim=0)
        new = pk.register_module(HeadProj, M.ModuleSpec(out_dim=1), replace=True)
        assert M.spec_of(HeadProj(2, 3)) is new and M.source_dim(HeadProj(2, 3)) == 1
    finally:
        pk.unregister_module(HeadProj)
    assert M.spec_of(HeadProj) is None and M.source_dim(HeadProj(2, 3)) is None
    with pytest.raises(KeyError):
        pk.unregister_module(HeadProj)
    with pytest.raises(ValueError, match="already registered"):  # torch's own layers are registered too
        pk.register_module(nn.Linear, out_dim=0)


def test_bad_specs_are_refused():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        pk.register_module(int, out_dim=0)
    with pytest.raises(TypeError, match="attrs"):
        pk.register_module(HeadProj, attrs={"out_features": "weight"})
    assert M.spec_of(HeadProj) is None


def test_lookup_by_isinstance_most_specific_wins():
    from timm.layers import Conv2dSame
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    assert M.source_dim(Conv2dSame(3, 4, 3)) == 0 and M.spec_of(Conv2dSame(3, 4, 3)).act_dim == 1
    assert M.source_dim(NonDynamicallyQuantizableLinear(3, 4)) == 0
    assert M.source_dim(nn.ConvTranspose2d(3, 4, 3)) == 1 and M.source_dim(nn.Embedding(5, 4)) == 1
    assert M.is_norm(nn.InstanceNorm2d(3)) and M.spec_of(nn.GroupNorm(2, 4)).channel_first
    assert M.spec_of(nn.LayerNorm(4)).channel_first is False

    class Conv2d(nn.Module):  # shares a torch class name but is no torch conv: names do not match anymore
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 3, 1, 1))
    assert M.source_dim(Conv2d()) is None

    class MyLinear(nn.Linear):
        pass
    assert M.spec_of(MyLinear(2, 2)) is M.spec_of(nn.Linear(2, 2))
    mine = pk.register_module(MyLinear, out_dim=1)
    try:
        assert M.spec_of(MyLinear(2, 2)) is mine and M.source_dim(nn.Linear(2, 2)) == 0
    finally:
        pk.unregister_module(MyLinear)
    assert M.source_dim(MyLinear(2, 2)) == 0


def test_module_attr_has_one_home():
    from prunekit.surgery import module_attr
    assert module_attr is M.module_attr
    m = Net()
    assert module_attr(m, "proj.weight") == (m.proj, "weight")
