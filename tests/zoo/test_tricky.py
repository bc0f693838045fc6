"""Analyze + prune every model of the tricky zoo with a random plan, then check the pruned model.

Verification inside ``pk.prune`` already compares exact groups with the masked original on the
example input; these tests add what it does not check: another batch size, state_dict round
trips, tracing/export, module attributes, and the expected grouping of specific models.
"""
from __future__ import annotations

import copy
import functools
import math
import random
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.capture import flatten_outputs

from ._common import call

try:
    from .tricky_models import TRICKY, MatmulAttention, SDPAAttention
except ImportError:  # pragma: no cover - tests/zoo is not a package
    from tricky_models import TRICKY, MatmulAttention, SDPAAttention

NAMES = sorted(TRICKY)


# ---------------------------------------------------------------- helpers
def flat(out):
    """Flatten a model output into [(path, tensor)] (the library's own output flattening)."""
    tensors, paths = flatten_outputs(out)
    return list(zip(paths, tensors))


def shapes(out):
    return [(p, tuple(t.shape)) for p, t in flat(out)]


def assert_close_outputs(a, b, rtol=1e-4, atol=1e-5):
    fa, fb = flat(a), flat(b)
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        assert x.shape == y.shape, p
        if x.is_floating_point():
            scale = max(1.0, float(x.abs().max())) if x.numel() else 1.0
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol * scale, msg=f"output {p} differs")
        else:
            assert torch.equal(x, y), p


def random_plan(graph, seed: int = 0) -> dict[int, list[int]]:
    """Remove 30-50% of the units of every prunable group (at least one, keeping at least one)."""
    rng = random.Random(seed)
    plan = {}
    for g in graph.prunable_groups:
        n = g.size
        lo = max(1, math.ceil(0.3 * n))
        hi = max(lo, n // 2)
        k = min(rng.randint(lo, hi), n - 1)
        plan[g.id] = sorted(rng.sample(range(n), k))
    return plan


def groups_of(graph, fqn: str, dim: int | None = None):
    """Groups owning (part of) ``fqn`` along ``dim`` (via the public ``Group.slices``)."""
    res = []
    for g in graph.groups:
        if any(f == fqn and (dim is None or d == dim) for f, d, _ in g.slices([])):
            res.append(g)
    return res


def group_of(graph, fqn: str, dim: int):
    gs = groups_of(graph, fqn, dim)
    assert len(gs) == 1, f"{fqn} dim {dim} is owned by {len(gs)} groups: {gs}"
    return gs[0]


def slice_map(g, units=None) -> dict[tuple[str, int], list[int]]:
    """{(fqn, dim): sorted indices} of ``units`` (default: all units) of group ``g``."""
    units = range(g.size) if units is None else units
    res: dict[tuple[str, int], list[int]] = {}
    for f, d, idx in g.slices(units):
        res.setdefault((f, d), [])
        res[(f, d)] += idx.tolist()
    return {k: sorted(v) for k, v in res.items()}


def make(name: str, batch: int = 2, seed: int = 0):
    factory, inp = TRICKY[name]
    torch.manual_seed(seed)
    model = factory().eval()
    # non-trivial BN statistics so BN is not an identity
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    torch.manual_seed(seed + 1)
    return model, inp(batch)


def try_export(model, inputs):
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else \
        ((tuple(inputs), {}) if isinstance(inputs, (tuple, list)) else ((inputs,), {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, args, kwargs)


def export_call(ep, inputs):
    m = ep.module()
    return call(m, inputs)


def trace(model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(inputs, dict):
            return torch.jit.trace(model, example_kwarg_inputs=inputs, strict=False, check_trace=False)
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else inputs
        return torch.jit.trace(model, args, strict=False, check_trace=False)


@functools.lru_cache(maxsize=None)
def pruned(name: str):
    """(original copy, pruned model, graph, plan, example input, reference output of the original)."""
    model, x = make(name)
    original = copy.deepcopy(model)
    with torch.no_grad():
        ref = call(model, x)
    graph = pk.analyze(model, x)
    plan = random_plan(graph, seed=len(name))
    pk.prune(model, graph, plan, verify=True)
    return original, model, graph, plan, x, ref


@functools.lru_cache(maxsize=None)
def exports_before(name: str) -> bool:
    model, x = make(name)
    try:
        try_export(model, x)
        return True
    except Exception:  # noqa: BLE001 - some models are simply not exportable
        return False


# ---------------------------------------------------------------- registry sanity
def test_zoo_is_large_enough():
    assert len(TRICKY) >= 28
    for name, (factory, inp) in TRICKY.items():
        assert callable(factory) and callable(inp), name


@pytest.mark.parametrize("name", NAMES)
def test_analyze_leaves_model_unchanged(name):
    model, x = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = call(model, x)
    graph = pk.analyze(model, x)
    assert graph.groups, "no groups found"
    for g in graph.groups:
        assert g.unit in ("channel", "head", "head_dim", "group")
        assert g.size >= 2
        assert g.prunable == (g in graph.prunable_groups)
        if not g.prunable:
            assert g.reason, f"pinned group {g.id} has no reason"
        if not g.exact:
            assert g.inexact_reasons
    assert isinstance(graph.summary(), str) and "prunable" in graph.summary()
    lines = graph.log_groups()
    assert len(lines) == len(graph.prunable_groups)
    for line, g in zip(lines, graph.prunable_groups):
        assert line.startswith(f"group {g.id}: source ")
    assert 0.0 <= graph.prunable_proportion <= 1.0
    assert graph.flops() == 2 * graph.macs()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    with torch.no_grad():
        assert_close_outputs(ref, call(model, x), rtol=0, atol=0)


# ---------------------------------------------------------------- prune with a random plan
@pytest.mark.parametrize("name", NAMES)
def test_prune_random_plan(name):
    original, model, graph, plan, x, ref = pruned(name)
    with torch.no_grad():
        out = call(model, x)
    assert shapes(out) == shapes(ref), "output shapes changed"
    # the plan really removed parameters
    n_orig = sum(p.numel() for p in original.parameters())
    n_new = sum(p.numel() for p in model.parameters())
    if plan:
        assert n_new < n_orig
        assert graph.macs(plan) <= graph.macs()
    else:
        assert n_new == n_orig
    # the graph is single-use
    if plan:
        with pytest.raises(pk.PruningError):
            pk.prune(model, graph, plan)


@pytest.mark.parametrize("name", NAMES)
def test_pruned_runs_on_other_batch_size(name):
    original, model, graph, plan, x, ref = pruned(name)
    _, inp = TRICKY[name]
    torch.manual_seed(123)
    x5 = inp(5)
    with torch.no_grad():
        out5 = call(model, x5)
        ref5 = call(original, x5)
    assert shapes(out5) == shapes(ref5)
    for p, t in flat(out5):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), p
    # with only exact groups, the pruned model must equal the masked original on *any* input
    if plan and all(graph.group(g).exact for g in plan):
        masked = copy.deepcopy(original)
        g2 = pk.analyze(masked, x)
        assert [g.size for g in g2.groups] == [g.size for g in graph.groups]
        pk.mask(masked, g2, plan)
        with torch.no_grad():
            assert_close_outputs(call(masked, x5), out5)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_roundtrip(name):
    original, model, graph, plan, x, ref = pruned(name)
    # through a FRESH model: the original architecture built again, resized from the saved pruning record
    sd = model.state_dict()
    with tempfile.TemporaryDirectory() as d:
        clone = pk.load(pk.save(model, Path(d) / "pruned.safetensors"), TRICKY[name][0]).eval()
    assert clone is not model
    for k, v in clone.state_dict().items():
        assert v.shape == sd[k].shape and torch.equal(v, sd[k]), k
    assert sorted(clone.state_dict()) == sorted(sd)
    with torch.no_grad():
        assert_close_outputs(call(model, x), call(clone, x), rtol=0, atol=0)
    # the pruned state_dict does not load into the unpruned model when something was removed
    if plan:
        with pytest.raises(RuntimeError):
            copy.deepcopy(original).load_state_dict(sd)


@pytest.mark.parametrize("name", NAMES)
def test_jit_trace_after_pruning(name):
    original, model, graph, plan, x, ref = pruned(name)
    traced = trace(model, x)
    with torch.no_grad():
        assert_close_outputs(call(model, x), call(traced, x))


@pytest.mark.parametrize("name", NAMES)
def test_export_after_pruning(name):
    if not exports_before(name):
        pytest.skip("torch.export fails on the unpruned model")
    original, model, graph, plan, x, ref = pruned(name)
    ep = try_export(model, x)
    with torch.no_grad():
        assert_close_outputs(call(model, x), export_call(ep, x))


# ---------------------------------------------------------------- module attributes match the new shapes
def attribute_problems(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    bad = []

    def chk(name, what, got, want):
        if got != want:
            bad.append(f"{name}.{what} = {got}, weight says {want}")

    for name, m in model.named_modules():
        if not isinstance(m, kinds):
            continue
        if isinstance(m, nn.modules.conv._ConvNd):
            w = m.weight
            if m.transposed:
                chk(name, "in_channels", m.in_channels, w.shape[0])
                chk(name, "out_channels", m.out_channels, w.shape[1] * m.groups)
            else:
                chk(name, "out_channels", m.out_channels, w.shape[0])
                chk(name, "in_channels", m.in_channels, w.shape[1] * m.groups)
            if m.in_channels % m.groups or m.out_channels % m.groups:
                bad.append(f"{name}: groups={m.groups} does not divide {m.in_channels}/{m.out_channels}")
            if m.bias is not None:
                chk(name, "bias", m.bias.shape[0], m.out_channels)
        elif isinstance(m, nn.Linear):
            chk(name, "out_features", m.out_features, m.weight.shape[0])
            chk(name, "in_features", m.in_features, m.weight.shape[1])
        elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
            n = m.weight.shape[0] if m.weight is not None else (
                m.running_mean.shape[0] if m.running_mean is not None else m.num_features)
            chk(name, "num_features", m.num_features, n)
            if m.running_mean is not None:
                chk(name, "running_mean", m.running_mean.shape[0], m.num_features)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                chk(name, "normalized_shape", tuple(m.normalized_shape), tuple(m.weight.shape))
        elif isinstance(m, nn.GroupNorm):
            if m.weight is not None:
                chk(name, "num_channels", m.num_channels, m.weight.shape[0])
            if m.num_channels % m.num_groups:
                bad.append(f"{name}: num_groups={m.num_groups} does not divide num_channels={m.num_channels}")
        elif isinstance(m, nn.Embedding):
            chk(name, "embedding_dim", m.embedding_dim, m.weight.shape[1])
            chk(name, "num_embeddings", m.num_embeddings, m.weight.shape[0])
        elif isinstance(m, nn.PReLU):
            chk(name, "num_parameters", m.num_parameters, m.weight.numel())
        elif isinstance(m, nn.MultiheadAttention):
            chk(name, "embed_dim", m.embed_dim, m.in_proj_weight.shape[1])
            chk(name, "3*embed_dim", 3 * m.embed_dim, m.in_proj_weight.shape[0])
            chk(name, "num_heads*head_dim", m.num_heads * m.head_dim, m.embed_dim)
            chk(name, "out_proj.in_features(weight)", m.out_proj.weight.shape[1], m.embed_dim)
            chk(name, "kdim", m.kdim, m.embed_dim)
            chk(name, "vdim", m.vdim, m.embed_dim)
        elif isinstance(m, MatmulAttention):  # hand-written attention: the reshape attributes must follow
            chk(name, "3*num_heads*head_dim", 3 * m.num_heads * m.head_dim, m.qkv.weight.shape[0])
            chk(name, "num_heads*head_dim", m.num_heads * m.head_dim, m.proj.weight.shape[1])
        elif isinstance(m, SDPAAttention):
            chk(name, "num_heads*head_dim", m.num_heads * m.head_dim, m.q.weight.shape[0])
            chk(name, "num_heads*head_dim (v)", m.num_heads * m.head_dim, m.v.weight.shape[0])
    return bad


NON_LINEAR_KINDS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                    nn.Embedding, nn.PReLU, nn.MultiheadAttention, MatmulAttention, SDPAAttention)

@pytest.mark.parametrize("name", NAMES)
def test_module_attributes_conv_norm_embedding(name):
    original, model, graph, plan, x, ref = pruned(name)
    assert attribute_problems(model, NON_LINEAR_KINDS) == []


_LINEAR_ATTR_OPEN: dict[str, str] = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=_LINEAR_ATTR_OPEN[n], strict=True,
                                                                           raises=AssertionError))
                                  if n in _LINEAR_ATTR_OPEN else n for n in NAMES])
def test_module_attributes_linear(name):
    original, model, graph, plan, x, ref = pruned(name)
    assert attribute_problems(model, (nn.Linear,)) == []


# ---------------------------------------------------------------- outputs are pinned by default
@pytest.mark.parametrize("name", NAMES)
def test_model_outputs_pinned_by_default(name):
    model, x = make(name)
    graph = pk.analyze(model, x)
    out_groups = [g for g in graph.groups if "model output" in g.reason]
    assert out_groups, "no group is pinned for reaching a model output"
    for g in out_groups:
        assert not g.prunable


PRUNE_OUTPUT_MODELS = ["residual_add", "mlp", "conv1d", "depthwise", "dense_concat"]


def _output_group(name):
    """(model, x, graph with prune_outputs=True, the group that owns the output channels)."""
    model, x = make(name)
    g0 = pk.analyze(model, x)
    last = [g for g in g0.groups if "model output" in g.reason]
    assert len(last) == 1 and not last[0].prunable
    owned = {(f, d) for f, d, _ in last[0].slices([])}
    graph = pk.analyze(model, x, prune_outputs=True)
    cands = [g for g in graph.groups if {(f, d) for f, d, _ in g.slices([])} == owned]
    assert len(cands) == 1
    return model, x, graph, cands[0]


@pytest.mark.parametrize("name", PRUNE_OUTPUT_MODELS)
def test_prune_outputs_true_makes_output_channels_prunable(name):
    model, x, graph, g = _output_group(name)
    assert g.prunable, g.reason
    assert "model output" not in g.reason
    assert len(graph.prunable_groups) > len(pk.analyze(model, x).prunable_groups)
    # without verification the output really loses the unit
    with torch.no_grad():
        n_out = call(model, x).shape[1]
    pk.prune(model, graph, {g.id: [0]}, verify=False)
    with torch.no_grad():
        assert call(model, x).shape[1] == n_out - 1


@pytest.mark.parametrize("name", PRUNE_OUTPUT_MODELS)
def test_prune_outputs_true_verified(name):
    model, x, graph, g = _output_group(name)
    with torch.no_grad():
        ref = call(model, x)
    drop = [0, g.size - 1] if g.size > 2 else [0]
    pk.prune(model, graph, {g.id: drop}, verify=True)
    keep = [i for i in range(ref.shape[1]) if i not in drop]
    with torch.no_grad():
        out = call(model, x)
    assert out.shape[1] == ref.shape[1] - len(drop)
    # only the output channels changed: the kept ones are exactly the original's (verification skips
    # value checks for outputs whose shape changed, so check it here)
    torch.testing.assert_close(out, ref[:, keep], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- every prunable group really is prunable
KEEP_ONE_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=KEEP_ONE_XFAIL[n], strict=True,
                                                                           raises=AssertionError))
                                  if n in KEEP_ONE_XFAIL else n for n in NAMES])
def test_each_group_alone_down_to_one_unit(name):
    """Any valid plan on a prunable group must work: remove all units but the first / but the last."""
    model0, x = make(name)
    graph0 = pk.analyze(model0, x)
    failures = []
    for g in graph0.prunable_groups:
        for units in (list(range(1, g.size)), list(range(g.size - 1))):
            model = copy.deepcopy(model0)
            graph = pk.analyze(model, x)
            try:
                pk.prune(model, graph, {g.id: units}, verify=True)
            except pk.PruningError as e:
                failures.append(f"group {g.id} ({', '.join(g.modules)}) units {units}: {str(e)[:160]}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- expected grouping, per model
def analyzed(name, **kw):
    model, x = make(name)
    return model, x, pk.analyze(model, x, **kw)


def test_plain_cnn_groups():
    _, _, graph = analyzed("plain_cnn")
    g = group_of(graph, "features.0.0.weight", 0)
    assert g.prunable and g.exact and g.size == 8
    sm = slice_map(g)
    assert sm[("features.0.1.weight", 0)] == list(range(8))
    assert sm[("features.0.1.running_mean", 0)] == list(range(8))
    assert sm[("features.1.0.weight", 1)] == list(range(8))
    assert g.source == ["features.0.0"]
    assert "features.1.0" in g.describe()
    # flatten of a (N, 16, 1, 1) map feeds fc: same group, index for index
    g3 = group_of(graph, "features.3.0.weight", 0)
    assert slice_map(g3)[("fc.weight", 1)] == list(range(16))
    assert graph.group(1).reason == "model input" or not group_of(graph, "features.0.0.weight", 1).prunable


def test_residual_add_shares_one_group():
    _, _, graph = analyzed("residual_add")
    g = group_of(graph, "stem.weight", 0)
    assert g is group_of(graph, "conv2.weight", 0)
    assert g is group_of(graph, "conv1.weight", 1)
    assert g is group_of(graph, "head.weight", 1)
    assert g.prunable and g.exact
    assert set(g.source) == {"stem", "conv2"}
    inner = group_of(graph, "conv1.weight", 0)
    assert inner is not g and inner is group_of(graph, "conv2.weight", 1)


def test_residual_sub_mul_div_broadcast():
    _, _, graph = analyzed("residual_sub_mul_div")
    g = group_of(graph, "a.weight", 0)
    for fqn, d in (("b.weight", 0), ("b.weight", 1), ("g.weight", 0), ("g.weight", 1), ("scale", 0),
                   ("head.weight", 1)):
        assert group_of(graph, fqn, d) is g, fqn
    assert g.prunable and g.exact


def test_dense_concat_offsets():
    _, _, graph = analyzed("dense_concat")
    stem = group_of(graph, "stem.weight", 0)
    l0 = group_of(graph, "layers.0.2.weight", 0)
    l1 = group_of(graph, "layers.1.2.weight", 0)
    for g in (stem, l0, l1):
        assert g.prunable and g.exact
    assert slice_map(stem)[("trans.weight", 1)] == list(range(0, 6))
    assert slice_map(l0)[("trans.weight", 1)] == list(range(6, 10))
    assert slice_map(l1)[("trans.weight", 1)] == list(range(10, 14))
    # the same channels at the same offset in every later consumer (and its BN)
    assert slice_map(l0)[("layers.1.2.weight", 1)] == list(range(6, 10))
    assert slice_map(l0)[("layers.2.2.weight", 1)] == list(range(6, 10))
    assert slice_map(l0)[("layers.2.0.weight", 0)] == list(range(6, 10))
    assert slice_map(l0, [1, 3])[("trans.weight", 1)] == [7, 9]
    assert slice_map(l1, [0])[("layers.2.0.running_var", 0)] == [10]


def test_split_chunk_narrow_boundaries():
    _, _, graph = analyzed("split_chunk_narrow")
    a = group_of(graph, "p1.weight", 1)
    assert slice_map(a)[("stem.weight", 0)] == [0, 1, 2, 3]
    # chunk(2) of `mid`: chunk recomputes its halves from the pruned size, so the halves shrink together
    # (row i of the first half is tied to row 4+i of the second); the first half is added to p2's output;
    # narrow(m, 1, 2, 3) cuts at 2 and 5, so the tied pieces are 0:2~4:6 and 2:4~6:8
    mids = groups_of(graph, "mid.weight", 0)
    assert sorted(slice_map(g)[("mid.weight", 0)] for g in mids) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    g_p2 = groups_of(graph, "p2.weight", 0)
    assert sorted(slice_map(g)[("mid.weight", 0)] for g in g_p2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # narrow(m, 1, 2, 3) feeds q with mid's rows 2..4: the literal length 3 pins them (row 4 pins its partner 0)
    q_in = groups_of(graph, "q.weight", 1)
    assert all(not g.prunable for g in q_in)
    # the literal split sizes [4, 8] break when stem's channels change: those groups are pinned, not wrong
    assert not group_of(graph, "p1.weight", 1).prunable


def test_slicing_groups():
    _, _, graph = analyzed("slicing")
    left = group_of(graph, "left.weight", 1)
    right = group_of(graph, "right.weight", 1)
    assert left is not right
    assert slice_map(left)[("stem.weight", 0)] == [0, 1, 2, 3]
    assert slice_map(right)[("stem.weight", 0)] == [4, 5, 6, 7, 8, 9]
    assert group_of(graph, "left.weight", 0) is group_of(graph, "right.weight", 0)


def test_unbind_pins_stack_dim_keeps_channels():
    _, _, graph = analyzed("unbind")
    gs = groups_of(graph, "qkv.weight", 0)
    by_size = {g.size: g for g in gs}
    assert set(by_size) == {3, 6}
    assert not by_size[3].prunable and "unbind" in by_size[3].reason
    c = by_size[6]
    assert c.prunable and c is group_of(graph, "head.weight", 1)
    assert slice_map(c, [1])[("qkv.weight", 0)] == [1, 7, 13]


def test_flatten_linear_index_math():
    _, _, graph = analyzed("flatten_linear")
    g = group_of(graph, "conv2.weight", 0)
    assert g.size == 4
    assert slice_map(g, [1])[("fc1.weight", 1)] == list(range(16, 32))
    assert slice_map(g, [0, 3])[("fc1.weight", 1)] == list(range(0, 16)) + list(range(48, 64))


def test_channels_last_mlp_groups():
    _, _, graph = analyzed("channels_last_mlp")
    g = group_of(graph, "stem.weight", 0)
    for fqn, d in (("fc1.weight", 1), ("fc2.weight", 0), ("fc2.bias", 0), ("head.weight", 1)):
        assert group_of(graph, fqn, d) is g
    assert g.prunable and g.exact
    hidden = group_of(graph, "fc1.weight", 0)
    assert hidden is group_of(graph, "fc2.weight", 1) and hidden.prunable


def test_shuffle_view_permutation():
    # g1 output channel i = gi * 4 + ci (2 groups of 4); after view/transpose/view it sits at position
    # p = ci * 2 + gi, which g2 (2 groups of 4) reads as p = gj * 4 + cj.
    _, _, graph = analyzed("shuffle_view")
    g2_group = [g for g in groups_of(graph, "g2.weight", 0) if g.unit == "group"]
    assert len(g2_group) == 1 and g2_group[0].size == 2
    sm = slice_map(g2_group[0], [1])  # gj = 1  <=>  ci in {2, 3}
    assert sm[("g1.weight", 0)] == [2, 3, 6, 7]
    assert sm[("g2.weight", 0)] == [4, 5, 6, 7]
    assert sm[("head.weight", 1)] == [4, 5, 6, 7]
    g1_group = [g for g in groups_of(graph, "g1.weight", 0) if g.unit == "group" and g is not g2_group[0]]
    assert len(g1_group) == 1 and g1_group[0].size == 2
    sm = slice_map(g1_group[0], [1])  # gi = 1: rows 4..7 of g1, inputs 4..7 of g1, odd cj of g2
    assert sm[("g1.weight", 0)] == [4, 5, 6, 7]
    assert sm[("stem.weight", 0)] == [4, 5, 6, 7]
    assert sm[("g2.weight", 1)] == [1, 3]


def test_pixel_shuffle_index_math():
    _, _, graph = analyzed("pixel_shuffle")
    g = group_of(graph, "out.weight", 1)
    assert g.size == 6 and g.prunable and g.exact
    assert slice_map(g, [2])[("conv.weight", 0)] == [8, 9, 10, 11]
    sub = [h for h in groups_of(graph, "conv.weight", 0) if h is not g]
    assert sub and all(not h.prunable and "sub-pixel" in h.reason for h in sub)


def test_pixel_unshuffle_index_math():
    _, _, graph = analyzed("pixel_unshuffle")
    g = group_of(graph, "conv.weight", 0)
    assert g.size == 5 and g.prunable
    assert slice_map(g, [1, 4])[("out.weight", 1)] == [4, 5, 6, 7, 16, 17, 18, 19]


def test_grouped_conv_groups():
    _, _, graph = analyzed("grouped_conv")
    gs = groups_of(graph, "c1.weight", 0)
    units = {g.unit: g for g in gs}
    assert "group" in units
    grp = units["group"]
    assert grp.size == 4 and grp.prunable
    assert slice_map(grp, [1])[("c1.weight", 0)] == [2, 3]
    assert slice_map(grp, [1])[("c2.weight", 0)] == [3, 4, 5]
    assert slice_map(grp, [1])[("c3.weight", 1)] == [3, 4, 5]
    per = [g for g in gs if g is not grp][0]
    assert per.size == 2
    assert slice_map(per, [1])[("c1.weight", 0)] == [1, 3, 5, 7]
    assert slice_map(per, [1])[("c2.weight", 1)] == [1]


def test_depthwise_shares_producer_group():
    _, _, graph = analyzed("depthwise")
    g = group_of(graph, "pw1.weight", 0)
    assert group_of(graph, "dw.weight", 0) is g
    assert group_of(graph, "bn.weight", 0) is g
    assert group_of(graph, "pw2.weight", 1) is g
    assert g.prunable and g.exact and g.size == 8


def test_depthwise_multiplier_index_math():
    _, _, graph = analyzed("depthwise_multiplier")
    g = group_of(graph, "pw1.weight", 0)
    assert g.size == 6 and g.prunable
    assert slice_map(g, [2])[("dw.weight", 0)] == [4, 5]
    assert slice_map(g, [2])[("pw2.weight", 1)] == [4, 5]
    mult = [h for h in groups_of(graph, "dw.weight", 0) if h is not g]
    assert len(mult) == 1 and mult[0].size == 2
    assert slice_map(mult[0], [1])[("dw.weight", 0)] == [1, 3, 5, 7, 9, 11]


def test_conv_transpose_groups():
    _, _, graph = analyzed("conv_transpose")
    g = group_of(graph, "c1.weight", 0)
    assert group_of(graph, "up1.weight", 0) is g and g.prunable
    out1 = groups_of(graph, "up1.weight", 1)
    assert sum(h.size for h in out1 if h.unit != "group") * \
        max([h.size for h in out1 if h.unit == "group"] or [1]) == 6


def test_embedding_rows_pinned_dim_prunable():
    _, _, graph = analyzed("embedding_linear")
    rows = group_of(graph, "emb.weight", 0)
    assert not rows.prunable and "token" in rows.reason
    d = group_of(graph, "emb.weight", 1)
    assert d.prunable and d is group_of(graph, "fc1.weight", 1)


def test_norm_groups():
    _, _, graph = analyzed("norms")
    assert group_of(graph, "bn.weight", 0) is group_of(graph, "c1.weight", 0)
    gn = groups_of(graph, "gn.weight", 0)
    assert {g.unit for g in gn} >= {"group"}
    inner = [g for g in gn if g.unit != "group"]
    assert inner and all(not g.exact for g in inner)
    ln = group_of(graph, "ln.weight", 0)
    assert not ln.exact and any("normalization" in r for r in ln.inexact_reasons)
    assert group_of(graph, "inorm.weight", 0) is group_of(graph, "c3.weight", 0)


def test_instancenorm_channels_prunable():
    model, x, graph = analyzed("norms")
    g = group_of(graph, "inorm.weight", 0)
    assert g.prunable, g.reason
    pk.prune(model, graph, {g.id: [0, 1]})
    assert model.inorm.num_features == 4


def test_layernorm2d_group_inexact_and_prunable():
    model, x, graph = analyzed("layernorm2d")
    g = group_of(graph, "norm.weight", 0)
    assert g is group_of(graph, "c1.weight", 0) and g is group_of(graph, "c2.weight", 1)
    assert g.prunable and not g.exact
    pk.prune(model, graph, {g.id: [1, 5]})
    assert tuple(model.norm.normalized_shape) == (6,)
    assert model(x).shape == (2, 4, 8, 8)


def test_prelu_per_channel_weight():
    model, x, graph = analyzed("prelu")
    g = group_of(graph, "act.weight", 0)
    assert g is group_of(graph, "c1.weight", 0) and g.prunable
    assert not groups_of(graph, "act2.weight")  # a single slope owns no channels
    pk.prune(model, graph, {g.id: [0, 7]})
    assert model.act.weight.shape == (6,) and model.act.num_parameters == 6


def test_pool_upsample_single_group():
    _, _, graph = analyzed("pool_upsample")
    g = group_of(graph, "c1.weight", 0)
    assert g is group_of(graph, "c2.weight", 0) and g is group_of(graph, "c3.weight", 1)
    assert g.prunable and g.exact


def test_squeeze_excite_groups():
    _, _, graph = analyzed("squeeze_excite")
    g = group_of(graph, "c1.weight", 0)
    assert g is group_of(graph, "fc1.weight", 1) and g is group_of(graph, "fc2.weight", 0)
    assert g is group_of(graph, "c2.weight", 1) and g.prunable
    se = group_of(graph, "fc1.weight", 0)
    assert se is group_of(graph, "fc2.weight", 1) and se.prunable


def test_matmul_attention_heads():
    model, x, graph = analyzed("matmul_attention")
    gs = groups_of(graph, "attn.qkv.weight", 0)
    heads = [g for g in gs if g.unit == "head"]
    hdim = [g for g in gs if g.unit == "head_dim" and g.size == 4]
    assert len(heads) == 1 and heads[0].size == 3 and heads[0].prunable
    assert len(hdim) == 1 and hdim[0].size == 4 and hdim[0].prunable
    assert slice_map(heads[0], [1])[("attn.qkv.weight", 0)] == [4, 5, 6, 7, 16, 17, 18, 19, 28, 29, 30, 31]
    assert slice_map(heads[0], [1])[("attn.proj.weight", 1)] == [4, 5, 6, 7]
    assert slice_map(hdim[0], [0])[("attn.qkv.weight", 0)] == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    # qkv's leading 3 is pinned (it is selected by index)
    three = [g for g in gs if g.size == 3 and g.unit != "head"]
    assert all(not g.prunable for g in three)
    pk.prune(model, graph, {heads[0].id: [2], hdim[0].id: [0]})
    assert model.attn.num_heads == 2 and model.attn.head_dim == 3
    assert model(x).shape == (2, 4, 4)


def test_sdpa_attention_heads():
    _, _, graph = analyzed("sdpa_attention")
    heads = [g for g in groups_of(graph, "attn.q.weight", 0) if g.unit == "head"]
    assert len(heads) == 1 and heads[0].size == 2
    h = heads[0]
    for fqn in ("attn.k.weight", "attn.v.weight"):
        assert h in groups_of(graph, fqn, 0)
    assert slice_map(h, [1])[("attn.o.weight", 1)] == list(range(6, 12))
    qk = [g for g in groups_of(graph, "attn.q.weight", 0) if g.unit == "head_dim"]
    v = [g for g in groups_of(graph, "attn.v.weight", 0) if g.unit == "head_dim"]
    # one ``self.head_dim`` sizes the q, k and v views, so q/k and v head_dim are pruned as one group
    assert len(qk) == 1 and len(v) == 1 and qk[0] is v[0]
    assert qk[0] in groups_of(graph, "attn.k.weight", 0)
    assert qk[0].exact  # explicit scale: zeroing q/k channels is exact


def test_shared_head_dim_attribute_ties_q_and_v():
    """q/k head_dim and v head_dim sized by one attribute must shrink together (and the attribute follows)."""
    model, x, graph = analyzed("sdpa_attention")
    hd = [g for g in groups_of(graph, "attn.v.weight", 0) if g.unit == "head_dim"][0]
    assert hd.prunable and hd.size == 6
    pk.prune(model, graph, {hd.id: [0, 4]})
    assert model.attn.head_dim == 4 and model.attn.q.out_features == 8 and model.attn.v.out_features == 8
    assert model(x).shape == (2, 4, 4)


def test_rope_rotate_half_inside_heads_is_never_cut_wrong():
    """Rotate-half RoPE splits head_dim inside the heads x head_dim product: head_dim is kept whole, whole heads
    stay prunable and remove the right rows (a split inside a product interleaves per head)."""
    from tests._deps import require_transformers
    require_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=1, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, use_cache=False, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (1, 12))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    graph = pk.analyze(model, x)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not any(g.prunable for g in groups_of(graph, q, 0) if g.unit != "head")
    kv_heads = [g for g in groups_of(graph, q, 0) if g.unit == "head" and g.prunable
                and g in groups_of(graph, "model.layers.0.self_attn.k_proj.weight", 0)]
    assert len(kv_heads) == 1 and kv_heads[0].size == 2  # (the query slots within kv groups: tests/zoo/test_hf_gqa.py)
    # kv head 1 owns q heads 2 and 3 (repeat_kv order), i.e. q rows 32..63
    assert slice_map(kv_heads[0], [1])[(q, 0)] == list(range(32, 64))
    pk.prune(model, graph, {kv_heads[0].id: [0]})  # verified against the masked model
    assert model.model.layers[0].self_attn.k_proj.out_features == 16


def test_torch_mha_groups_and_attributes():
    model, x, graph = analyzed("torch_mha")
    gs = groups_of(graph, "mha.in_proj_weight", 0)
    heads = [g for g in gs if g.unit == "head"]
    assert len(heads) == 1 and heads[0].size == 2 and heads[0].prunable
    pk.prune(model, graph, {heads[0].id: [1]})
    m = model.mha
    assert m.num_heads == 1 and m.embed_dim == 4 and m.head_dim == 4
    assert m.in_proj_weight.shape == (12, 4)
    assert model(x).shape == (2, 4, 4)


def test_free_params_in_one_group():
    _, _, graph = analyzed("free_params")
    g = group_of(graph, "patch.weight", 0)
    for fqn, d in (("cls_token", 2), ("pos_embed", 2), ("gamma", 0), ("fc1.weight", 1), ("fc2.weight", 0),
                   ("head.weight", 1)):
        assert group_of(graph, fqn, d) is g, fqn
    assert g.prunable and g.exact
    assert not groups_of(graph, "pos_embed", 1) or not group_of(graph, "pos_embed", 1).prunable


def test_shared_linear_ties_in_and_out():
    _, _, graph = analyzed("shared_linear")
    g = group_of(graph, "inp.weight", 0)
    assert g is group_of(graph, "shared.weight", 0) is group_of(graph, "shared.weight", 1)
    assert g is group_of(graph, "out.weight", 1) and g.prunable


def test_tied_embedding_stays_tied():
    model, x, graph = analyzed("tied_embedding")
    g = group_of(graph, "emb.weight", 1)
    assert g.prunable and g is group_of(graph, "fc1.weight", 1) and g is group_of(graph, "fc2.weight", 0)
    vocab = group_of(graph, "emb.weight", 0)
    assert not vocab.prunable
    pk.prune(model, graph, {g.id: [0, 3, 5]})
    assert model.lm_head.weight is model.emb.weight
    assert model.emb.weight.shape == (16, 5) and model.emb.embedding_dim == 5
    assert model(x).shape == (2, 5, 16)


def test_multi_input_groups():
    _, _, graph = analyzed("two_inputs")
    g = group_of(graph, "img.weight", 0)
    assert g is group_of(graph, "aux.weight", 0) and g is group_of(graph, "mix.weight", 1) and g.prunable
    assert not group_of(graph, "aux.weight", 1).prunable  # input features
    _, _, graph = analyzed("kwargs_input")
    g = group_of(graph, "enc.weight", 0)
    assert g is group_of(graph, "gate.weight", 0) and g is group_of(graph, "out.weight", 1) and g.prunable


def test_multi_output_reasons():
    _, _, graph = analyzed("tuple_output")
    assert "model output [0]" in group_of(graph, "cls.weight", 0).reason
    assert "model output [1]" in group_of(graph, "seg.weight", 0).reason
    assert group_of(graph, "body.weight", 0).prunable
    _, _, graph = analyzed("dict_output")
    assert "model output ['logits']" in group_of(graph, "logits.weight", 0).reason
    b = group_of(graph, "b.weight", 0)
    assert b.prunable and b.exact  # summed over channels: zeroed channels add nothing


def test_inplace_ops_groups():
    _, _, graph = analyzed("inplace_ops")
    g = group_of(graph, "c1.weight", 0)
    assert g is group_of(graph, "c2.weight", 0) and g is group_of(graph, "w", 1)
    assert g is group_of(graph, "c3.weight", 1) and g.prunable and g.exact


def test_nested_containers_names():
    _, _, graph = analyzed("nested_containers")
    g = group_of(graph, "body.1.1.weight", 0)
    assert g is group_of(graph, "body.2.norm.weight", 0) and g is group_of(graph, "body.2.proj.0.weight", 1)
    assert "body.2.norm" in g.modules and g.prunable


@pytest.mark.parametrize("name,op", [("unknown_sort", "sort"), ("unknown_gather", "gather"),
                                     ("unknown_fft", "fft"), ("unknown_elementwise", "lgamma")])
def test_unknown_ops_are_pinned(name, op):
    model, x, graph = analyzed(name)
    g = group_of(graph, "c1.weight", 0)
    assert not g.prunable
    assert op in g.reason or any(op in k for k in graph.unsupported_ops)
    c2_in = group_of(graph, "c2.weight", 1)
    assert not c2_in.prunable
    with pytest.raises(pk.PruningError):
        pk.prune(model, graph, {g.id: [0]})


def test_unsupported_op_reported():
    _, _, graph = analyzed("unknown_elementwise")
    assert "aten.lgamma.default" in graph.unsupported_ops
    assert "lgamma" in graph.summary()
    # the layers after the unknown op are still prunable
    assert group_of(graph, "c2.weight", 0).prunable


def test_plain_mlp_units_are_channels():
    _, _, graph = analyzed("mlp")
    assert {g.unit for g in graph.groups} == {"channel"}


def test_heads_equal_head_dim_stay_separate_groups():
    """num_heads == head_dim (4 x 4): the two attributes must not be confused with each other."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads, self.hd = 4, 4
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (t.view(b, n, self.heads, self.hd).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x)))
            y = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v
            return self.o(y.transpose(1, 2).reshape(b, n, self.heads * self.hd))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), Attn(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 6, 5)
    graph = pk.analyze(model, x)
    units = sorted(g.unit for g in groups_of(graph, "1.q.weight", 0))
    assert "head" in units and "head_dim" in units
    head = [g for g in groups_of(graph, "1.q.weight", 0) if g.unit == "head"][0]
    pk.prune(model, graph, {head.id: [1]})
    assert model[1].heads == 3 and model[1].hd == 4 and model[1].q.out_features == 12


def test_interpolated_position_table_keeps_its_grid():
    """A position table resampled to the feature grid (NaFlexViT-style): its grid rows are not channels."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.pos_y = nn.Parameter(torch.randn(1, 6, 8))  # 6 grid rows x 8 channels
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            h = self.stem(x)
            py = nn.functional.interpolate(self.pos_y.permute(0, 2, 1), size=h.shape[2], mode="linear")  # (1, 8, H)
            return self.head(h + py.unsqueeze(-1))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 5, 5)
    graph = pk.analyze(model, x)
    assert not any(g.prunable for g in groups_of(graph, "pos_y", 1))
    ch = group_of(graph, "pos_y", 2)
    assert ch is group_of(graph, "stem.weight", 0) and ch.prunable and ch.exact
    pk.prune(model, graph, {ch.id: [0, 5]})
    assert model.pos_y.shape == (1, 6, 6)


def test_dry_run_pins_exactly_the_hard_coded_groups_in_every_block():
    """CaiT-style attention reshapes with the residual width (C // heads): the dry run must pin each block's
    head groups (localised by the failing op) and leave the MLP groups of every block prunable."""
    class Block(nn.Module):
        def __init__(self, dim=12, heads=3):
            super().__init__()
            self.heads = heads
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, 20), nn.Linear(20, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            y = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
            x = x + self.proj(y.transpose(1, 2).reshape(b, n, c))
            return x + self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), *[Block() for _ in range(4)], nn.Linear(12, 2)).eval()
    x = torch.randn(2, 6, 5)
    graph = pk.analyze(model, x)
    for k in range(1, 5):
        assert not any(g.prunable for g in groups_of(graph, f"{k}.qkv.weight", 0)), k
        assert group_of(graph, f"{k}.fc1.weight", 0).prunable, k
    plan = {g.id: [0] for g in graph.prunable_groups}
    pk.prune(model, graph, plan)
    assert model(x).shape == (2, 6, 2)



def test_dry_run_on_the_meta_view_leaves_the_model_untouched():
    """The dry run removes channels from the user's own module (with its tensors swapped for meta ones)
    and rolls every change back: same tensor objects and values, same attributes, ties kept, even when
    checks fail and are bisected (a literal 4 in the forward) and when the model has tied weights."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.conv = nn.Conv1d(8, 8, 1)
            self.bn = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight  # tied

        def forward(self, ids):
            x = self.bn(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
            y = self.fc(x)
            y = y.view(y.shape[0], y.shape[1], 4, -1).flatten(2)  # the literal 4 pins fc's channels
            return self.head(x + y)

    torch.manual_seed(0)
    model = Net().eval()
    ids = torch.randint(0, 10, (2, 5))
    ref = model(ids)
    tensors = {k: (v, v.detach().clone()) for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    attrs = {n: dict(vars(m)) for n, m in model.named_modules()}
    graph = pk.analyze(model, ids)
    assert any(not g.prunable and "dry-run" in g.reason for g in graph.groups), graph.summary()
    assert any(g.prunable for g in graph.groups)
    assert model.head.weight is model.emb.weight
    for k, v in list(model.named_parameters()) + list(model.named_buffers()):
        assert v is tensors[k][0] and v.device.type == "cpu", k
        torch.testing.assert_close(v, tensors[k][1], rtol=0, atol=0)
    for n, m in model.named_modules():
        now = {k: v for k, v in vars(m).items() if not k.startswith("_")}
        assert now == {k: v for k, v in attrs[n].items() if not k.startswith("_")}, n
        assert set(m._parameters) == set(attrs[n]["_parameters"])
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)


def test_dry_run_separates_equal_size_groups_that_meet_in_a_reshape():
    """EfficientAttention-style (timm nextvit): ``y.reshape(B, N, C)`` takes C from another tensor of equal
    width.  With equal dry-run cuts the two widths coincide and the dry run passes although pruning either group
    alone (or by different amounts) breaks the forward; equal-size groups must get different cuts."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 12)
            self.m1 = nn.Linear(6, 5)  # puts b's group id 3 after a's: ids 0 and 3 got equal cuts before
            self.b = nn.Linear(6, 12)
            self.out_a, self.out_b, self.out_m = nn.Linear(12, 3), nn.Linear(12, 3), nn.Linear(5, 3)

        def forward(self, x):
            u = self.a(x)
            bsz, n, c = u.shape
            m = self.m1(x)
            v = self.b(x).reshape(bsz, n, c)  # b's width is taken from u
            return self.out_a(u) + self.out_b(v) + self.out_m(m)

    model, x = Net().eval(), torch.randn(2, 4, 6)
    graph = pk.analyze(model, x)
    ga, gb = group_of(graph, "a.weight", 0), group_of(graph, "b.weight", 0)
    assert ga is not gb and ga.size == gb.size == 12
    assert not ga.prunable and not gb.prunable, graph.summary()
    assert "dry-run" in ga.reason and "dry-run" in gb.reason
    from prunekit.verify.dryrun import dry_run_plan as _dry_run_plan
    plan = _dry_run_plan([ga, gb, group_of(graph, "m1.weight", 0)])
    assert len(plan[ga.id]) != len(plan[gb.id])


def test_weight_standardised_conv_is_prunable_and_its_inputs_are_inexact():
    """timm ScaledStdConv2d / NF-Nets: the conv runs on ``batch_norm(weight.reshape(1, out_channels, -1))``, not
    on the parameter.  Its size attributes must still be bound (the reshape uses ``self.out_channels``), and
    cutting its input channels changes the per-filter statistics: prunable, verified, but not exact."""
    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                             momentum=0.0, eps=1e-5).reshape_as(self.weight)
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    torch.manual_seed(0)
    model = nn.Sequential(StdConv(3, 8, 3, padding=1), nn.ReLU(), StdConv(8, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = pk.analyze(model, x)
    g1, g2 = group_of(graph, "0.weight", 0), group_of(graph, "2.weight", 0)
    assert g1.prunable and g2.prunable, graph.summary()
    assert not g1.exact and any("batch statistics" in r for r in g1.inexact_reasons)  # feeds conv 2's statistics
    assert g2.exact  # conv 2's outputs only feed a ReLU, the pooling and the Linear
    pk.prune(model, graph, {g1.id: [1, 4], g2.id: [0]})
    assert (model[0].out_channels, model[2].in_channels, model[2].out_channels) == (6, 6, 5)
    assert model(x).shape == (2, 2)


def test_lstm_input_channels_are_prunable_and_input_size_follows():
    """nn.LSTM checks ``input.size(-1) == input_size`` and runs on ``_flat_weights`` (its own list of parameter
    references): pruning the channels that feed it must update both."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 10)
            self.rnn = nn.LSTM(10, 12, num_layers=2, batch_first=True, bidirectional=True)
            self.out = nn.Linear(24, 3)

        def forward(self, x):
            y, _ = self.rnn(torch.relu(self.inp(x)))
            return self.out(y)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 6)
    graph = pk.analyze(model, x)
    g = group_of(graph, "inp.weight", 0)
    assert g.prunable and g.exact, graph.summary()
    pk.prune(model, graph, {g.id: [0, 3, 7]})  # verified against the masked model
    assert model.rnn.input_size == 7 and model.rnn.weight_ih_l0.shape == (48, 7)
    assert model.rnn.weight_ih_l0_reverse.shape == (48, 7)
    assert model.rnn._flat_weights[0] is model.rnn.weight_ih_l0
    assert model(torch.randn(3, 4, 6)).shape == (3, 4, 3)
