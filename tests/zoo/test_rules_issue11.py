"""Issue 11, analysis rules and planning: round_to on every channel-count unit, ConvNeXt's pooled head,
unread buffers, scales computed from pruned size attributes, grouped convs fed by an unaligned concat,
functional layer_norm sized by an attribute."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.analysis.analyzer import Group, Member


def groups_with(graph, fqn: str):
    return [g for g in graph.groups if any(m.fqn == fqn for m in g.members)]


def shapes_of(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def every_plan(graph, frac: float = 0.3) -> dict[int, list[int]]:
    return {g.id: list(range(max(1, int(g.size * frac)))) for g in graph.prunable_groups if g.size > 1}


# ---------------------------------------------------------------- 1. round_to on "group" and head_dim units
def test_unit_step_counts_the_channels_a_unit_spans():
    from prunekit.algorithms.pruner import unit_step

    def grp(unit, *members):
        return Group(0, 16, unit, True, "", True, [], [], [Member(f, 0, 0, sizes, pos) for f, sizes, pos in members])
    assert unit_step(grp("channel", ("a", (16,), 0)), 8) == 8
    assert unit_step(grp("group", ("a", (16,), 0)), 8) == 8  # depthwise: one channel per unit
    assert unit_step(grp("group", ("a", (16, 2), 0), ("b", (16, 2), 0)), 8) == 4  # 2 channels per unit
    assert unit_step(grp("head_dim", ("q", (12, 16), 1)), 8) == 2  # width = 12 heads x head_dim
    assert unit_step(grp("head", ("q", (4, 6), 0)), 8) == 4  # heads are rounded too: 4 heads x 6 = 24
    assert unit_step(grp("group", ("a", (16, 2), 0), ("w", (16,), 0)), 8) == 8  # lcm over members
    assert unit_step(grp("group", ("a", (16,), 0)), 1) == 1


@pytest.fixture(scope="module")
def convnext_atto():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # conv_mlp=False: the MLP runs channels-last (Linear), as in convnext_tiny, so the pooled head input is
    # channels-last and adaptive_avg_pool2d records mean + as_strided_
    return timm.create_model("convnext_atto", conv_mlp=False).eval(), torch.randn(1, 3, 64, 64)


def test_round_to_applies_to_depthwise_tied_streams(convnext_atto):
    """ConvNeXt's residual streams are tied to depthwise convs (unit "group"): with round_to=8 and a global
    FLOPs target every width that changed is a multiple of 8 (was: stem 3 -> 71 style widths)."""
    model0, x = convnext_atto
    model = copy.deepcopy(model0)
    before = shapes_of(model)
    graph = pk.analyze(model, x)
    assert any(g.unit == "group" and g.prunable for g in graph.groups)
    pk.Pruner(model, x, "l2", pk.FlopsTarget(0.5), global_pruning=True, round_to=8).prune()
    after = shapes_of(model)
    changed = [(k, d, before[k][d], after[k][d]) for k in before for d in range(len(before[k]))
               if before[k][d] != after[k][d]]
    assert any(k.startswith("stem.") for k, *_ in changed)  # the stage-0 stream (a "group" unit) was pruned
    bad = [c for c in changed if c[3] % 8]
    assert not bad, bad[:10]


# ---------------------------------------------------------------- 2. ConvNeXt's head: mean + as_strided_
def test_convnext_last_stage_is_prunable(convnext_atto):
    model0, x = convnext_atto
    model = copy.deepcopy(model0)
    graph = pk.analyze(model, x)
    assert not any("as_strided" in g.reason for g in graph.groups)
    fc_in = [g for g in graph.groups if any(m.fqn == "head.fc.weight" and m.dim == 1 for m in g.members)]
    assert len(fc_in) == 1 and fc_in[0].prunable and "stages.3.blocks.1.conv_dw" in fc_in[0].modules
    pinned = [g.reason for g in graph.groups if not g.prunable]
    assert all(r.startswith(("model input", "model output")) for r in pinned), pinned
    with torch.no_grad():
        ref = model(x)
    pk.prune(model, graph, every_plan(graph), verify=True)
    assert model.head.fc.in_features == model.head.norm.normalized_shape[0] < 320
    with torch.no_grad():
        assert model(x).shape == ref.shape


class _Restride(nn.Module):
    """mean(keepdim) then as_strided_ over the pooled tensor: ``swap`` makes it exchange batch and channel
    values (a real rearrangement, must pin); otherwise it restrides to channels-last (values unchanged)."""

    def __init__(self, swap: bool):
        super().__init__()
        self.swap = swap
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.conv(x).relu().mean((2, 3), keepdim=True)
        n, c = y.shape[:2]
        y = y.as_strided((n, c, 1, 1), (1, n, 1, 1) if self.swap else (c, 1, c, c))
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("swap", [False, True])
def test_as_strided_identity_only_when_strides_are_kept(swap):
    x = torch.randn(2, 3, 5, 5)
    graph = pk.analyze(_Restride(swap), x)
    g = groups_with(graph, "conv.weight")[0]
    if swap:
        assert not g.prunable and "as_strided" in g.reason
        # the pooled tensor after the op forms its own pinned group: its reason names the op once
        fc_in = [k for k in groups_with(graph, "fc.weight") if any(m.dim == 1 for m in k.members)][0]
        assert not fc_in.prunable and fc_in.reason.count("as_strided") == 1, fc_in.reason
    else:
        assert g.prunable and g.exact, g.reason
        model = _Restride(False).eval()
        model.load_state_dict(graph.model_ref.state_dict())
        masked = copy.deepcopy(model)
        g2 = pk.analyze(model, x)
        pk.mask(masked, pk.analyze(masked, x), {g.id: [1, 4]})
        pk.prune(model, g2, {g.id: [1, 4]})
        assert model.conv.out_channels == 4
        with torch.no_grad():
            torch.testing.assert_close(model(x), masked(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 3. parameters/buffers no op reads
class _Unread(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.register_buffer("stash", torch.randn(16))  # a kept copy, never read by forward
        self.spare = nn.Parameter(torch.randn(16, 3))

    def forward(self, x):
        return self.b(self.a(x).relu())


def test_unread_buffer_and_parameter_form_no_group():
    model = _Unread()
    x = torch.randn(2, 8)
    graph = pk.analyze(model, x)
    assert not groups_with(graph, "stash") and not groups_with(graph, "spare")
    hidden = groups_with(graph, "a.weight")
    assert hidden and hidden[0].prunable and {m.fqn for m in hidden[0].members} == {"a.weight", "a.bias", "b.weight"}
    stash = model.stash.clone()
    pk.prune(model, graph, {hidden[0].id: [0, 3, 5]})
    assert model.a.out_features == 13 and torch.equal(model.stash, stash) and model.spare.shape == (16, 3)


def test_llama_original_inv_freq_is_left_alone():
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    x = torch.randint(0, 100, (1, 8))
    name = "model.rotary_emb.original_inv_freq"
    orig = dict(model.named_buffers())[name].clone()
    graph = pk.analyze(model, x)
    assert not groups_with(graph, name)
    assert graph.prunable_groups
    pk.prune(model, graph, every_plan(graph), verify=True)
    now = dict(model.named_buffers())[name]
    assert now.shape == orig.shape and torch.equal(now, orig)


# ---------------------------------------------------------------- 4. scales computed from a pruned attribute
class _Attn(nn.Module):
    def __init__(self, mode: str, dim: int = 32, heads: int = 4):
        super().__init__()
        self.num_heads, self.head_dim, self.mode = heads, dim // heads, mode
        self.scale = self.head_dim ** -0.5  # stored once: surgery leaves it alone
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.mode == "sqrt":
            a = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        elif self.mode == "pow":
            a = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)
        elif self.mode == "literal":
            a = (q @ k.transpose(-2, -1)) / math.sqrt(8)
        elif self.mode == "stored":
            a = (q @ k.transpose(-2, -1)) * self.scale
        elif self.mode == "sdpa_derived":
            o = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
            return self.proj(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        o = (a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj(o)


class _AttnNet(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.inp = nn.Linear(6, 32)
        self.attn = _Attn(mode)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.attn(self.inp(x)))


@pytest.mark.parametrize("mode", ["sqrt", "pow", "sdpa_derived", "literal", "stored"])
def test_scale_from_pruned_head_dim_is_inexact(mode):
    """A scale computed in forward from ``self.head_dim`` changes when head_dim is pruned: the group is
    reported inexact, and indeed the pruned model differs from the zeroed original (float64).  A literal or
    a scale stored at construction stays: exact, and equal to the zeroed original to 1e-12."""
    torch.manual_seed(0)
    model = _AttnNet(mode).double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    graph = pk.analyze(model, x)
    hd = [g for g in graph.groups if g.unit == "head_dim" and g.prunable]
    assert len(hd) == 1
    g = hd[0]
    derived = mode in ("sqrt", "pow", "sdpa_derived")
    assert g.exact is not derived
    if derived:
        assert any("head_dim" in r and "scale" in r for r in g.inexact_reasons), g.inexact_reasons
    plan = {g.id: [0, 5]}
    masked = copy.deepcopy(model)
    pk.mask(masked, pk.analyze(masked, x), plan)
    pk.prune(model, graph, plan)
    assert model.attn.head_dim == 6
    with torch.no_grad():
        err = float((model(x) - masked(x)).abs().max() / masked(x).abs().max())
    if derived:
        assert err > 1e-8
    else:
        assert err < 1e-12


# ---------------------------------------------------------------- 5. grouped conv fed by an unaligned concat
class _CatGrouped(nn.Module):
    def __init__(self, transposed: bool):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        conv = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.g = conv(10, 8, 3, padding=1, groups=2)  # groups of 5 cut the 4 + 6 concat: cannot be aligned
        self.c = nn.Conv2d(8, 12, 1)
        self.d = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = torch.cat([self.a(x).relu(), self.b(x).relu()], 1)
        return self.d(self.c(self.g(y)).relu())


@pytest.mark.parametrize("transposed", [False, True])
def test_unaligned_grouped_conv_pins_only_its_channels(transposed):
    model = _CatGrouped(transposed).eval()
    x = torch.randn(1, 3, 8, 8)
    graph = pk.analyze(model, x)
    assert not any(b.module == "g" and b.attr == "groups" for b in graph.bindings)
    g_in = groups_with(graph, "a.weight")[0]
    assert not g_in.prunable and "grouped channels cannot be aligned" in g_in.reason
    mid = [g for g in groups_with(graph, "c.weight") if any(m.fqn == "d.weight" for m in g.members)]
    assert len(mid) == 1 and mid[0].prunable, mid
    with torch.no_grad():
        ref = model(x)
    pk.prune(model, graph, {mid[0].id: [0, 7, 11]})
    assert model.g.groups == 2 and model.c.out_channels == 9 and model.d.in_channels == 9
    with torch.no_grad():
        assert model(x).shape == ref.shape


# ---------------------------------------------------------------- 6. F.layer_norm(x, (self.dim,), w, b)
class _FunctionalLN(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(8, dim)
        self.w = nn.Parameter(torch.randn(dim))
        self.b = nn.Parameter(torch.randn(dim))
        self.fc2 = nn.Linear(dim, 4)

    def forward(self, x):
        return self.fc2(F.layer_norm(self.fc1(x), (self.dim,), self.w, self.b).relu())


def test_functional_layer_norm_follows_size_attribute():
    torch.manual_seed(0)
    model = _FunctionalLN().double().eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    ref_model = copy.deepcopy(model)
    graph = pk.analyze(model, x)
    g = groups_with(graph, "fc1.weight")
    g = [k for k in g if any(m.fqn == "w" for m in k.members)][0]
    assert g.prunable, g.reason
    assert not g.exact and any("normalization" in r for r in g.inexact_reasons)  # statistics over the channels
    drop = [1, 2, 9]
    pk.prune(model, graph, {g.id: drop})
    assert model.dim == 13 and model.w.shape == (13,)
    keep = [i for i in range(16) if i not in drop]
    r = ref_model
    with torch.no_grad():  # the pruned model is layer_norm over the kept channels, exactly
        h = F.layer_norm(r.fc1(x)[:, keep], (13,), r.w[keep], r.b[keep]).relu()
        want = F.linear(h, r.fc2.weight[:, keep], r.fc2.bias)
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
