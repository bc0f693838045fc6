"""Randomly generated CNNs (conv/bn/relu stacks with residual adds, concats, grouped and depthwise convs):
analyze + prune with a random plan must verify, keep the output shape and run on another batch size."""
from __future__ import annotations

import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk

KINDS = ["conv", "conv", "grouped", "dw", "add", "cat"]


class RandomNet(nn.Module):
    """Built from a spec: a list of (kind, channels, flag, ref) steps over a growing list of feature maps."""

    def __init__(self, spec, cin: int = 3):
        super().__init__()
        self.steps: list[tuple[str, int]] = []
        self.layers = nn.ModuleList()
        chans = [cin]  # channels of every feature map so far (0 = the input)
        for kind, c, flag, ref in spec:
            cur = chans[-1]
            j = ref % len(chans)
            if kind == "conv":
                mods = [nn.Conv2d(cur, c, 3 if flag else 1, padding=1 if flag else 0)]
                mods += [nn.BatchNorm2d(c), nn.ReLU()] if flag or ref % 2 else [nn.ReLU()]
                layer, cur = nn.Sequential(*mods), c
            elif kind == "grouped" and cur % 2 == 0:
                c = 2 * max(1, c // 2)
                layer, cur = nn.Sequential(nn.Conv2d(cur, c, 3, padding=1, groups=2), nn.ReLU()), c
            elif kind in ("dw", "grouped"):
                mult = 2 if flag else 1
                layer = nn.Sequential(nn.Conv2d(cur, cur * mult, 3, padding=1, groups=cur), nn.BatchNorm2d(cur * mult))
                cur = cur * mult
                kind = "dw"
            elif kind == "add":
                # residual add of an earlier feature map (projected with a 1x1 conv when widths differ)
                layer = nn.Conv2d(chans[j], cur, 1) if (chans[j] != cur or flag) else nn.Identity()
            else:  # cat
                layer = nn.Identity()
                cur = cur + chans[j]
            self.steps.append((kind, j))
            self.layers.append(layer)
            chans.append(cur)
        self.head = nn.Conv2d(chans[-1], 3, 1)

    def forward(self, x):
        feats = [x]
        for (kind, j), layer in zip(self.steps, self.layers):
            cur = feats[-1]
            if kind == "add":
                y = cur + layer(feats[j])
            elif kind == "cat":
                y = torch.cat([cur, feats[j]], dim=1)
            else:
                y = layer(cur)
            feats.append(y)
        return self.head(feats[-1])


step = st.tuples(st.sampled_from(KINDS), st.integers(2, 6), st.booleans(), st.integers(0, 7))


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(step, min_size=1, max_size=7), seed=st.integers(0, 2 ** 16))
def test_random_architecture_prunes_and_verifies(spec, seed):
    torch.manual_seed(seed)
    model = RandomNet(spec).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    graph = pk.analyze(model, x)
    rng = random.Random(seed)
    plan = {}
    for g in graph.prunable_groups:
        if rng.random() < 0.8:
            k = min(g.size - 1, max(1, round(g.size * rng.uniform(0.3, 0.5))))
            plan[g.id] = rng.sample(range(g.size), k)
    masked = None
    if plan and all(graph.group(g).exact for g in plan):
        import copy
        masked = copy.deepcopy(model)
        pk.mask(masked, pk.analyze(masked, x), plan)
    pk.prune(model, graph, plan, verify=True)
    x3 = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        out = model(x)
        out3 = model(x3)
    assert out.shape == ref.shape
    assert out3.shape == (3,) + tuple(ref.shape[1:])
    if masked is not None:  # exact groups: equal to the masked original on a fresh input too
        with torch.no_grad():
            torch.testing.assert_close(out3, masked(x3), rtol=1e-3, atol=1e-4)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels
            assert m.weight.shape[1] * m.groups == m.in_channels
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape[0] == m.num_features == m.running_mean.shape[0]
