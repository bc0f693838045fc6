"""The dry run's promise: any plan over the prunable groups applies.

Each model below has a forward that breaks for some plans -- a hard-coded size in a forward that needs real
values (so the meta dry run cannot run), integer arithmetic on a size attribute (``self.n // self.kv``),
a constant group count of a channel shuffle, one ``self.head_dim`` sizing q/k and v.  Before, the dry run's
single plan passed (or was skipped) and other plans failed at prune time.  Now every plan -- every
prunable group at once, at ~30%, ~50% and random counts -- must apply and verify; what cannot be
guaranteed is pinned with a reason.
"""
from __future__ import annotations

import functools
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.surgery.apply import pruned_copy


def channel_shuffle_by_size(x, groups):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class NeedsValuesHardcoded(nn.Module):
    """Reads a value (``.item()``: captured on real tensors, the meta dry run cannot run) AND hard-codes sizes:
    ``split(y, [8, 8])`` and a reshape to ``12 * 4 * 4``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, 1, 1)
        self.b1, self.b2 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.mid = nn.Conv2d(16, 16, 1)
        self.c = nn.Conv2d(16, 12, 3, 1, 1)
        self.d = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        y = F.relu(self.a(x))
        if float(y.mean().item()) > -1e9:  # value-dependent control flow
            y = y * 1.0
        y1, y2 = torch.split(y, [8, 8], 1)
        y = F.relu(self.mid(F.relu(torch.cat([self.b1(y1), self.b2(y2)], 1))))
        z = F.avg_pool2d(F.relu(self.c(y)), 2)
        return self.d(z.reshape(z.shape[0], 12 * 4 * 4))


class GQAIntDiv(nn.Module):
    """GQA with size attributes whose names do not say "head" and equal values (8 heads, head_dim 8): q is viewed
    with -1 heads, kv heads come from ``self.kv`` (bound to the kv-head group), the repeat from ``self.n //
    self.kv``.  Dropping 1 of 4 kv heads keeps ``8 // 3 == 2`` (the old dry run's plan passed); dropping 2 gives a
    repeat of 4 and the attention fails."""

    def __init__(self, sdpa: bool = True):
        super().__init__()
        self.sdpa = sdpa
        self.n, self.d, self.kv = 8, 8, 4
        self.inp = nn.Linear(16, 32)
        self.q, self.k, self.v = nn.Linear(32, 64), nn.Linear(32, 32), nn.Linear(32, 32)
        self.o, self.out = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.inp(x)
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.d).transpose(1, 2)
        k = k.repeat_interleave(self.n // self.kv, dim=1)
        v = v.repeat_interleave(self.n // self.kv, dim=1)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = (q @ k.transpose(-1, -2) * 0.35).softmax(-1) @ v
        return self.out(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


class SharedHeadDim(nn.Module):
    """q/k and v head_dim are separate spaces tied only through one ``self.head_dim`` attribute, with
    ``num_heads == head_dim`` (so the attribute's value alone is ambiguous).  A fixed softmax scale."""

    def __init__(self):
        super().__init__()
        self.num_heads, self.head_dim = 8, 8
        self.inp = nn.Linear(16, 64)
        self.qk, self.v = nn.Linear(64, 128), nn.Linear(64, 64)
        self.o, self.out = nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = self.inp(x)
        b, t, _ = x.shape
        q, k = self.qk(x).view(b, t, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        v = self.v(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        a = (q @ k.transpose(-1, -2) * 0.35).softmax(-1) @ v
        return self.out(x + self.o(a.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)))


class FChannelShuffle(nn.Module):
    """``F.channel_shuffle(y, 3)`` on 12 channels: the 3 groups are a constant; dropping 1 unit of each factor
    keeps 6 channels (divisible by 3, the old dry run passed) but shuffles wrongly; other counts crash with
    "Number of channels must be divisible by groups"."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 12, 3, 1, 1), nn.Conv2d(12, 8, 1)

    def forward(self, x):
        return self.c(F.channel_shuffle(F.relu(self.a(x)), 3))


class UnshuffleFChannelShuffle(nn.Module):
    """``F.channel_shuffle`` after ``pixel_unshuffle``, the group count from a module attribute."""

    def __init__(self):
        super().__init__()
        self.groups = 2
        self.a, self.c = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.c(F.channel_shuffle(F.pixel_unshuffle(F.relu(self.a(x)), 2), self.groups))


class SizeViewShuffle(nn.Module):
    """A channel shuffle that views by ``x.size()`` with a constant group count (2 groups of 3): dropping a group
    makes a dim 1, the op sequence changes, and the old dry run compared only the outputs."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 6, 3, 1, 1), nn.Conv2d(6, 8, 1)

    def forward(self, x):
        return self.c(channel_shuffle_by_size(F.relu(self.a(x)), 2))


class UnshuffleSizeViewShuffle(nn.Module):
    """``pixel_unshuffle`` then a shuffle that views by ``x.size()`` (groups from an attribute)."""

    def __init__(self):
        super().__init__()
        self.groups = 4
        self.a, self.c = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.c(channel_shuffle_by_size(F.pixel_unshuffle(F.relu(self.a(x)), 2), self.groups))


MODELS = {
    "needs_values_hardcoded": (NeedsValuesHardcoded, (1, 3, 8, 8)),
    "gqa_int_div_sdpa": (lambda: GQAIntDiv(True), (2, 12, 16)),
    "gqa_int_div_matmul": (lambda: GQAIntDiv(False), (2, 12, 16)),
    "shared_head_dim": (SharedHeadDim, (2, 5, 16)),
    "f_channel_shuffle": (FChannelShuffle, (1, 3, 8, 8)),
    "unshuffle_f_channel_shuffle": (UnshuffleFChannelShuffle, (1, 3, 8, 8)),
    "size_view_shuffle": (SizeViewShuffle, (1, 3, 8, 8)),
    "unshuffle_size_view_shuffle": (UnshuffleSizeViewShuffle, (1, 3, 8, 8)),
}


@functools.lru_cache(maxsize=None)
def _analysed(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    return model, x, pk.analyze(model, x)


def _plan(graph, counts):
    rng = random.Random(0)
    return {gid: rng.sample(range(graph.group(gid).size), n) for gid, n in counts.items() if n > 0}


def _assert_applies(name, counts):
    model, x, graph = _analysed(name)
    plan = _plan(graph, counts)
    pruned = pruned_copy(model, graph, plan)  # verifies (exact groups against the masked original)
    assert pruned(x).shape == model(x).shape


def _fraction_counts(graph, frac):
    return {g.id: min(g.size - 1, max(1, round(g.size * frac))) for g in graph.prunable_groups}


@pytest.mark.parametrize("frac", [0.3, 0.5, 1.0], ids=["30%", "50%", "all-but-one"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_prunable_group_at_once_applies(name, frac):
    _, _, graph = _analysed(name)
    assert graph.prunable_groups, f"{name}: nothing left to prune"
    _assert_applies(name, _fraction_counts(graph, frac))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=st.data())
@pytest.mark.parametrize("name", sorted(MODELS))
def test_random_counts_apply(name, data):
    _, _, graph = _analysed(name)
    counts = {g.id: data.draw(st.integers(0, g.size - 1), label=f"group {g.id}") for g in graph.prunable_groups}
    _assert_applies(name, counts)


def _group_of(graph, fqn, dim, size=None):
    return [g for g in graph.groups if any(m.fqn == fqn and m.dim == dim for m in g.members)
            and (size is None or g.size == size)]


def test_real_values_dry_run_pins_the_hard_coded_sizes():
    """The split with constant sizes and the constant reshape are found on real tensors and pinned with the reason;
    the groups they do not touch stay prunable."""
    _, _, graph = _analysed("needs_values_hardcoded")
    assert graph.tape.device == "real" and graph.validation_backend == "real"
    split = _group_of(graph, "a.weight", 0)
    assert split and all(not g.prunable and "split_with_sizes" in g.reason for g in split)
    (flat,) = _group_of(graph, "c.weight", 0)
    assert not flat.prunable and "dry-run" in flat.reason
    assert all(g.prunable for g in _group_of(graph, "mid.weight", 0))


def test_gqa_kv_heads_pinned_with_the_reason():
    _, _, graph = _analysed("gqa_int_div_sdpa")
    (kv,) = [g for g in graph.groups if g.unit == "head" and g.size == 4]
    assert not kv.prunable and "dry-run" in kv.reason


def test_one_head_dim_attribute_ties_qk_and_v():
    """``self.head_dim`` sizes the q/k and the v reshapes: one group, prunable (it used to be two groups, both
    pinned, because num_heads == head_dim made the value ambiguous)."""
    _, _, graph = _analysed("shared_head_dim")
    hd = [g for g in graph.groups if g.unit == "head_dim"]
    assert len(hd) == 1 and hd[0].prunable
    assert {"qk", "v", "o"} <= set(hd[0].modules)


@pytest.mark.parametrize("name", ["f_channel_shuffle", "unshuffle_f_channel_shuffle"])
def test_channel_shuffle_group_count_is_pinned(name):
    _, _, graph = _analysed(name)
    pinned = [g for g in graph.groups if not g.prunable and "number of groups is a constant" in g.reason]
    assert pinned
