"""Minimal reproductions of defects found by the extended random-architecture generator (test_random_arch.py)
and by the fresh-model round trips of the zoo tests (_common.py).  Each is a small explicit model; the ones
whose fix belongs to another branch of issue 11 are strict xfails with the diagnosis, so the merge flips them.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.surgery.apply import pruned_copy

try:
    from ._common import assert_same_outputs, roundtrip, run
except ImportError:  # pragma: no cover - tests/zoo is not a package
    from _common import assert_same_outputs, roundtrip, run


def _zeroed(model, graph, plan):
    ref = copy.deepcopy(model)
    tensors = dict(ref.named_parameters()) | dict(ref.named_buffers())
    with torch.no_grad():
        for gid, units in plan.items():
            for fqn, dim, idx in graph.group(gid).slices(units):
                tensors[fqn].index_fill_(dim, torch.as_tensor(idx, dtype=torch.long), 0.0)
    return ref


# ------------------------------------------------------------------------------ fixed here
class VersionedBlock(nn.Module):
    """A module whose ``_load_from_state_dict`` checks its state-dict version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_load_keeps_module_state_dict_versions(tmp_path):
    """Found by the fresh-model round trip on torchvision mnasnet0_5: a state dict read from a safetensors file
    has no ``_metadata`` (module versions), and MNASNet refuses to load without them.  pk.load and
    pk.load_state_dict_pruned now use the freshly built model's own versions."""
    torch.manual_seed(0)
    model = VersionedBlock().eval()
    x = torch.randn(2, 3, 5, 5)
    graph = pk.analyze(model, x)
    (g,) = [g for g in graph.prunable_groups if g.size == 8]
    pk.prune(model, graph, {g.id: [1, 4, 6]})
    roundtrip(model, x, VersionedBlock)  # pk.load(path, factory) and load_state_dict_pruned(fresh, sd, ...)
    path = pk.save(model, tmp_path / "m.safetensors")
    fresh = VersionedBlock().eval()
    pk.load_state_dict_pruned(fresh, path, example_inputs=x)
    assert_same_outputs(run(model, x), run(fresh, x), "load_state_dict_pruned(fresh, path)")


# ------------------------------------------------------------------------------ left to other branches
class HalfSplit(nn.Module):
    """Channels split in two halves at ``x.shape[-1] // 2`` (computed in forward), a Linear on each half."""

    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(6, 9), nn.Linear(4, 4), nn.Linear(5, 5), nn.Linear(9, 3)

    def forward(self, x):
        x = self.inp(x)
        h = x.shape[-1] // 2
        a, b = torch.split(x, [h, x.shape[-1] - h], dim=-1)
        return self.out(torch.cat([self.a(a), self.b(b)], -1))


def test_split_at_runtime_half_width_is_pinned_or_prunes():
    torch.manual_seed(0)
    model = HalfSplit().eval()
    x = torch.randn(2, 6)
    graph = pk.analyze(model, x)
    for g in graph.prunable_groups:  # the promise: every plan over the prunable groups applies
        pruned_copy(model, graph, {g.id: [0]}, verify=True)
    # the dry run's plan that shrinks the split's parts unevenly found it: both halves are pinned with the reason,
    # the Linears after them stay prunable
    halves = [g for g in graph.groups if "inp" in g.modules and g.size in (4, 5)]
    assert len(halves) == 2 and not any(g.prunable for g in halves), graph.summary()
    assert all("cannot shrink unevenly" in g.reason for g in halves), [g.reason for g in halves]
    assert {g.size for g in graph.prunable_groups} == {4, 5}, graph.summary()


class AttrSplit(nn.Module):
    """The same split, sized by an attribute (``self.half``) or by the parts' own widths: any plan applies."""

    def __init__(self, mode):
        super().__init__()
        self.mode, self.half = mode, 4
        self.inp, self.a, self.b, self.out = nn.Linear(6, 9), nn.Linear(4, 4), nn.Linear(5, 5), nn.Linear(9, 3)

    def forward(self, x):
        x = self.inp(x)
        if self.mode == "attr":
            a, b = torch.split(x, [self.half, x.shape[-1] - self.half], dim=-1)
        else:
            a, b = x[..., :self.a.in_features], x[..., self.a.in_features:]
        return self.out(torch.cat([self.a(a), self.b(b)], -1))


@pytest.mark.parametrize("mode", ["attr", "in_features"])
def test_split_sized_by_part_widths_stays_prunable(mode):
    torch.manual_seed(0)
    model = AttrSplit(mode).eval()
    x = torch.randn(2, 6)
    graph = pk.analyze(model, x)
    for g in graph.prunable_groups:
        pruned_copy(model, graph, {g.id: [0]}, verify=True)
    halves = [g for g in graph.groups if "inp" in g.modules and g.size in (4, 5)]
    assert all(g.prunable for g in halves) or mode == "attr", graph.summary()


class CatThenGrouped(nn.Module):
    """Two conv branches concatenated and fed to a groups=2 conv whose groups are exactly the two branches."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.g = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(torch.relu(self.g(y)).mean((2, 3)))


def test_grouped_conv_after_concat_keeps_its_outputs_prunable():
    torch.manual_seed(0)
    model = CatThenGrouped().eval()
    x = torch.randn(2, 3, 4, 4)
    graph = pk.analyze(model, x)
    outs = [g for g in graph.prunable_groups if "g" in g.modules and "head" in g.modules]
    assert outs, [(g.id, g.modules, g.reason) for g in graph.groups]
    # the concat's pieces are the conv's group blocks: channel j of every group (a's j-th and b's j-th) is one unit
    (ins,) = [g for g in graph.prunable_groups if {"a", "b", "g"} <= set(g.modules)]
    assert ins.size == 4, graph.summary()
    plan = {outs[0].id: [0, 2], ins.id: [1]}
    want = run(_zeroed(model, graph, plan), x)
    pk.prune(model, graph, plan)
    assert_same_outputs(want, run(model, x), "pruned vs zeroed", rtol=1e-5, atol=1e-6)


def test_load_reads_safetensors_whose_header_length_starts_with_0x80(tmp_path):
    """Found by the fresh-model round trips (timm and tricky models): pk.load took a safetensors file whose
    8-byte header length starts with byte 0x80 for a pickle.  The header is padded here until it does."""
    torch.manual_seed(0)
    model = VersionedBlock().eval()
    x = torch.randn(2, 3, 5, 5)
    graph = pk.analyze(model, x)
    (g,) = [g for g in graph.prunable_groups if g.size == 8]
    pk.prune(model, graph, {g.id: [0, 5]})
    for pad in range(600):
        path = pk.save(model, tmp_path / "m.safetensors", extra={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:  # pragma: no cover
        pytest.fail("could not make a header length starting with 0x80")
    fresh = pk.load(path, VersionedBlock)
    assert_same_outputs(run(model, x), run(fresh, x), "pk.load of a 0x80 header")
