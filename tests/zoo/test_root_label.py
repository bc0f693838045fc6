"""The root module (name "") shows as ``<root>`` in messages that list a group's modules (issue 11)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.surgery.apply import PruningError


class RootParam(nn.Module):
    """The root owns a parameter that reaches the output (so its group is pinned and lists the root)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return self.proj(x) * self.scale


def test_pinned_group_error_names_the_root_module():
    model = RootParam().eval()
    graph = pk.analyze(model, torch.randn(2, 4))
    (g,) = [g for g in graph.groups if "" in g.modules]
    assert not g.prunable
    with pytest.raises(PruningError) as e:
        pk.prune(model, graph, {g.id: [0]})
    msg = str(e.value)
    assert "<root>" in msg and "(, " not in msg and ", )" not in msg, msg
