"""Every algorithm takes the constraint names of the vocabulary -- ``round_to``, ``max_ratio``, ``ignore`` -- with
the meaning they have for :class:`prunekit.Pruner`."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

import prunekit as pk


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.head(x.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("cls", [pk.Pruner, pk.AdaptivePruner, pk.LearnedPruner, pk.TrainingPruner])
def test_channel_algorithms_accept_round_to_max_ratio_ignore(cls):
    params = inspect.signature(cls.__init__).parameters
    assert {"round_to", "max_ratio", "ignore"} <= set(params), cls.__name__


def test_slice_pruner_accepts_ignore():
    # slice pruning masks slices inside filters; widths do not change, so round_to / max_ratio have no meaning
    assert "ignore" in inspect.signature(pk.SlicePruner.__init__).parameters


def _learned(max_ratio, steps=60, **kw):
    torch.manual_seed(0)
    model = Net()
    lp = pk.LearnedPruner(model, X, pk.FlopsTarget(0.3), steps, max_ratio=max_ratio, **kw)
    lp.prepare()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps + 1):
        out = model(X)
        p, f, e, d = lp.losses(step)
        loss = out.pow(2).mean() + f + e + d
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lp, model


def test_learned_pruner_max_ratio_caps_what_a_group_loses():
    lp, _ = _learned(1.0)
    assert min(lp.kept().values()) < 8  # unconstrained, the 0.3 target cuts a group below half
    lp, model = _learned(0.5)
    assert lp.max_ratio == 0.5
    floor = {g.id: math.ceil(g.size * 0.5) for g in lp.groups}
    assert all(k >= floor[gid] for gid, k in lp.kept().items()), (lp.kept(), floor)
    small = lp.finalize()
    assert small.c1.out_channels >= 8 and small.c2.out_channels >= 8


def test_learned_pruner_max_ratio_bounds_the_reachable_target():
    model = Net()
    free = pk.LearnedPruner(model, X, pk.FlopsTarget(0.5), 10).prunable_proportion
    capped = pk.LearnedPruner(Net(), X, pk.FlopsTarget(0.5), 10, max_ratio=0.25)
    assert capped.prunable_proportion < free
    lp = pk.LearnedPruner(Net(), X, pk.FlopsTarget(0.1), 10, max_ratio=0.25)
    with pytest.raises(ValueError, match="max_ratio"):
        lp.prepare()
    with pytest.raises(ValueError, match="max_ratio must be in"):
        pk.LearnedPruner(Net(), X, pk.FlopsTarget(0.5), 10, max_ratio=0)
