"""Randomly generated models built from what real models contain, pruned with a random non-empty plan.

The generator (hypothesis strategies below) composes a CNN stage (conv / grouped / depthwise convs, BN, GN,
IN, SE gating, residual adds, concats, chunk / narrow) and optionally a token stage (patchify to
channels-last tokens, a free cls token and position embedding, Linear MLPs, LayerNorm / RMSNorm, layer-scale
parameters, attention that reshapes into heads by its own size attributes -- ``self.num_heads``,
``self.head_dim``, ``self.dim`` -- with matmul/softmax or SDPA, GQA that repeats kv heads by
``repeat_interleave`` or ``expand``, qkv split by ``chunk``/``split``/reshape), and several outputs.

For every generated model:

* ``pk.analyze`` leaves it untouched (state dict and outputs) and finds at least one prunable group;
* a random non-empty plan over the prunable groups is drawn;
* its exact groups, pruned alone, give exactly (float64, tight tolerance) what the original gives with those
  units zeroed (the zeroed reference is built from ``Group.slices``, not by prunekit's own masking);
* the whole plan either prunes (verified; output shapes kept, another batch size runs, module attributes
  agree with the parameter shapes) or is refused with the model restored (state dict and outputs unchanged).

``PRUNEKIT_RANDOM_STRICT=1`` turns a refusal into a failure (to hunt for plans the dry run offered but that
cannot be applied).  The CI variant is derandomized (deterministic); ``-m slow`` runs many more examples.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.surgery.apply import pruned_copy

try:
    from ._common import assert_same_outputs, assert_state_unchanged, run, snapshot
except ImportError:  # pragma: no cover - tests/zoo is not a package
    from _common import assert_same_outputs, assert_state_unchanged, run, snapshot

STRICT = os.environ.get("PRUNEKIT_RANDOM_STRICT") == "1"
# Generator features switched off while they hit a known defect (name them here with the minimal reproduction in
# test_random_found.py).  None now: "head_dim_scale", "fln_attr" and "grouped_after_mix" were, until the fixes of
# issue 11 were merged.
DISABLED: set[str] = set()

# steps after which a grouped conv's groups line up with whole channel spaces (see "grouped_after_mix")
CLEAN = {"stem", "conv", "grouped", "dw", "se", "norm"}
SIDE = 4  # input images are (B, 3, SIDE, SIDE)


# ---------------------------------------------------------------------------------------------- CNN stage
def _norm2d(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        g = next(d for d in (4, 3, 2, 1) if c % d == 0)
        return nn.GroupNorm(g, c)
    if kind == "in":
        return nn.InstanceNorm2d(c, affine=True)
    return nn.Identity()


class SE(nn.Module):
    def __init__(self, c: int, r: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class ChunkMix(nn.Module):
    """Split the channels in two (chunk, or split by a size attribute), convolve one half, concat back."""

    def __init__(self, c: int, by_attr: bool):
        super().__init__()
        self.half, self.by_attr = c // 2, by_attr
        w = c - c // 2  # the second part of the split; chunk(2) makes the FIRST part the larger one
        self.conv = nn.Conv2d(w, w, 3, padding=1)

    def forward(self, x):
        if self.by_attr:
            a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
            return torch.cat([a, self.conv(b)], dim=1)
        a, b = x.chunk(2, dim=1)
        return torch.cat([self.conv(a), b], dim=1)


class Narrow(nn.Module):
    """Keep the first ``self.keep`` channels (a size attribute nothing updates: must pin or fall back)."""

    def __init__(self, c: int, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        return x.narrow(1, 0, self.keep)


def build_cnn(steps, cin: int):
    layers, plan, chans = nn.ModuleList(), [], [cin]
    prev = "stem"
    for kind, c, flag, ref in steps:
        cur = chans[-1]
        j = ref % len(chans)
        if kind == "conv":
            norm = ("bn", "gn", "in", "none")[ref % 4]
            layer = nn.Sequential(nn.Conv2d(cur, c, 3 if flag else 1, padding=1 if flag else 0), _norm2d(norm, c),
                                  nn.ReLU())
            cur = c
        elif kind == "grouped" and cur % 2 == 0 and ("grouped_after_mix" not in DISABLED or prev in CLEAN):
            c = 2 * max(1, c // 2)
            layer, cur = nn.Sequential(nn.Conv2d(cur, c, 3, padding=1, groups=2), nn.ReLU()), c
        elif kind in ("dw", "grouped"):
            mult = 2 if flag else 1
            layer = nn.Sequential(nn.Conv2d(cur, cur * mult, 3, padding=1, groups=cur), nn.BatchNorm2d(cur * mult))
            cur, kind = cur * mult, "dw"
        elif kind == "add":
            layer = nn.Conv2d(chans[j], cur, 1) if (chans[j] != cur or flag) else nn.Identity()
        elif kind == "cat":
            layer, cur = nn.Identity(), cur + chans[j]
        elif kind == "se":
            layer = SE(cur, max(2, c // 2))
        elif kind == "chunk" and cur >= 2:
            layer = ChunkMix(cur, flag)
        elif kind == "narrow" and cur >= 3:
            layer = Narrow(cur, cur - 1)
            cur -= 1
        else:
            kind, layer = "norm", _norm2d(("bn", "gn", "in")[ref % 3], cur)
        plan.append((kind, j))
        prev = kind
        layers.append(layer)
        chans.append(cur)
    return layers, plan, chans


# ---------------------------------------------------------------------------------------------- token stage
class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class AttrLN(nn.Module):
    """``F.layer_norm(x, (self.dim,))``: a norm whose size is a module attribute."""

    def __init__(self, d: int):
        super().__init__()
        self.dim = d
        self.weight, self.bias = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return F.layer_norm(x, (self.dim,), self.weight, self.bias)


def _norm1d(kind: str, d: int) -> nn.Module:
    if kind == "ln":
        return nn.LayerNorm(d)
    if kind == "rms":
        return RMSNorm(d)
    if kind == "fln":
        return AttrLN(d)
    return nn.Identity()


class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int, norm: str, layer_scale: bool, gated: bool):
        super().__init__()
        self.norm = _norm1d(norm, d)
        self.gated = gated
        self.fc1 = nn.Linear(d, 2 * hidden if gated else hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5) if layer_scale else None

    def forward(self, x):
        h = self.fc1(self.norm(x))
        if self.gated:  # SwiGLU-style: chunk the hidden units in two
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        y = self.fc2(h)
        return x + (y * self.gamma if self.gamma is not None else y)


class Attention(nn.Module):
    """Multi-head / grouped-query attention over (B, N, D) tokens.

    ``qkv``: "fused" (one Linear, reshaped into (3, heads, head_dim)), "chunk" (one Linear, chunked in 3 on the
    last dim), "split" (one Linear split by q/k/v sizes computed from attributes) or "sep" (three Linears; the
    only layout for GQA).  ``shape``: reshape by attributes ("attr"), by ``-1`` for head_dim ("minus1") or for
    the heads ("heads_minus1").  ``kernel``: "sdpa" or "matmul" (softmax(q k^T * scale) v).  ``rep``: how kv
    heads are repeated for GQA: "interleave" (repeat_interleave) or "expand" (expand + reshape).
    """

    def __init__(self, d, heads, kv_heads, head_dim, qkv, shape, kernel, rep, norm, layer_scale, scale_attr,
                 out_mode="minus1", bias=True):
        super().__init__()
        self.out_mode = out_mode
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.dim = heads * head_dim  # inner width, used in the final reshape
        self.kv_dim = kv_heads * head_dim
        self.qkv_mode, self.shape_mode, self.kernel, self.rep = qkv, shape, kernel, rep
        self.scale_attr = scale_attr
        self.scale = head_dim ** -0.5  # a float fixed at build time (not re-derived from head_dim)
        self.norm = _norm1d(norm, d)
        if qkv == "sep":
            self.q = nn.Linear(d, self.dim, bias=bias)
            self.k = nn.Linear(d, self.kv_dim, bias=bias)
            self.v = nn.Linear(d, self.kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(d, 3 * self.dim, bias=bias)
        self.proj = nn.Linear(self.dim, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5) if layer_scale else None

    def _heads(self, t, n_heads):
        B, N = t.shape[0], t.shape[1]
        if self.shape_mode == "attr":
            t = t.reshape(B, N, n_heads, self.head_dim)
        elif self.shape_mode == "minus1":
            t = t.reshape(B, N, n_heads, -1)
        else:
            t = t.view(B, N, -1, self.head_dim)
        return t.transpose(1, 2)

    def _repeat(self, t):
        r = self.num_heads // self.num_kv_heads
        if r == 1:
            return t
        if self.rep == "interleave":
            return t.repeat_interleave(r, dim=1)
        B, H, N, hd = t.shape
        return t[:, :, None].expand(B, H, r, N, hd).reshape(B, H * r, N, hd)

    def forward(self, x):
        B, N, _ = x.shape
        h = self.norm(x)
        if self.qkv_mode == "fused":
            qkv = self.qkv(h).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            if self.qkv_mode == "sep":
                q, k, v = self.q(h), self.k(h), self.v(h)
            elif self.qkv_mode == "chunk":
                q, k, v = self.qkv(h).chunk(3, dim=-1)
            else:
                q, k, v = self.qkv(h).split([self.dim, self.dim, self.dim], dim=-1)
            q = self._heads(q, self.num_heads)
            kv_heads = self.num_kv_heads if self.qkv_mode == "sep" else self.num_heads
            k, v = self._heads(k, kv_heads), self._heads(v, kv_heads)
            k, v = self._repeat(k), self._repeat(v)
        scale = self.head_dim ** -0.5 if self.scale_attr else self.scale
        if self.kernel == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            o = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v
        if self.out_mode == "dim":  # an inner-width attribute (heads * head_dim) that surgery does not know
            o = o.transpose(1, 2).reshape(B, N, self.dim)
        elif self.out_mode == "prod":
            o = o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        else:
            o = o.transpose(1, 2).reshape(B, N, -1)
        y = self.proj(o)
        return x + (y * self.gamma if self.gamma is not None else y)


class HalfMix(nn.Module):
    """Split tokens' channels in two on the last dim (chunk or narrow), a Linear on each, concat."""

    def __init__(self, d: int, narrow: bool):
        super().__init__()
        self.narrow_mode = narrow
        self.a = nn.Linear(d // 2, d // 2)
        self.b = nn.Linear(d - d // 2, d - d // 2)

    def forward(self, x):
        h = x.shape[-1] // 2
        if self.narrow_mode:
            a, b = x.narrow(-1, 0, h), x.narrow(-1, h, x.shape[-1] - h)
        else:
            a, b = torch.split(x, [h, x.shape[-1] - h], dim=-1)
        return torch.cat([self.a(a), self.b(b)], dim=-1)


class RandomNet(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        c0 = spec["stem"]
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        self.layers, self.steps, chans = build_cnn(spec["cnn"], c0)
        c = chans[-1]
        tok = spec["tokens"]
        self.side = chans  # unused; keeps the widths for debugging
        self.aux = nn.Conv2d(chans[spec["aux_ref"] % len(chans)], 3, 1) if spec["aux"] else None
        if tok is None:
            # a neck conv, as in real CNNs: its output channels are prunable whatever the steps pinned
            self.neck = nn.Sequential(nn.Conv2d(c, spec["neck"], 1), nn.ReLU())
            self.head = nn.Linear(spec["neck"], 5)
            return
        d, patch, cls, pos = tok["dim"], tok["patch"], tok["cls"], tok["pos"]
        self.patch = nn.Conv2d(c, d, 2, stride=2) if patch else nn.Linear(c, d)
        n = (SIDE // 2) ** 2 if patch else SIDE * SIDE
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.5) if cls else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + (1 if cls else 0), d) * 0.5) if pos else None
        blocks = []
        for b in tok["blocks"]:
            if b[0] == "mlp":
                _, hidden, norm, ls, gated = b
                blocks.append(Mlp(d, hidden, norm, ls, gated))
            elif b[0] == "attn":
                _, heads, kv_div, hd, qkv, shape, kernel, rep, norm, ls, scale_attr, out_mode = b
                kv = heads // kv_div if (qkv == "sep" and heads % kv_div == 0) else heads
                blocks.append(Attention(d, heads, kv, hd, qkv, shape, kernel, rep, norm, ls, scale_attr, out_mode))
            elif b[0] == "half" and d >= 2:
                blocks.append(HalfMix(d, b[1]))
            else:
                blocks.append(_norm1d(b[1], d))
        self.blocks = nn.Sequential(*blocks)
        self.norm = _norm1d(tok["final_norm"], d)
        self.head = nn.Linear(d, 5)
        self.head_cls = nn.Linear(d, 2) if (cls and tok["cls_out"]) else None

    def forward(self, x):
        feats = [self.stem(x)]
        for (kind, j), layer in zip(self.steps, self.layers):
            cur = feats[-1]
            if kind == "add":
                y = cur + layer(feats[j])
            elif kind == "cat":
                y = torch.cat([cur, feats[j]], dim=1)
            else:
                y = layer(cur)
            feats.append(y)
        h = feats[-1]
        outs = {}
        if self.aux is not None:
            outs["aux"] = self.aux(feats[self.spec["aux_ref"] % len(feats)])
        if self.spec["tokens"] is None:
            outs["logits"] = self.head(self.neck(h).mean((2, 3)))
            return outs if len(outs) > 1 else outs["logits"]
        if isinstance(self.patch, nn.Conv2d):
            t = self.patch(h).flatten(2).transpose(1, 2)
        else:
            t = self.patch(h.flatten(2).transpose(1, 2))  # Linear on channels-last tokens
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        if self.pos_embed is not None:
            t = t + self.pos_embed
        t = self.norm(self.blocks(t))
        outs["logits"] = self.head(t.mean(1))
        if self.head_cls is not None:
            outs["cls"] = self.head_cls(t[:, 0])
        if len(outs) == 1:
            return outs["logits"]
        return tuple(outs.values()) if self.spec["tuple_out"] else outs


# ---------------------------------------------------------------------------------------------- strategies
WIDTH = st.integers(4, 16)
cnn_step = st.tuples(st.sampled_from(["conv", "conv", "grouped", "dw", "add", "cat", "se", "chunk", "narrow",
                                      "norm"]), WIDTH, st.booleans(), st.integers(0, 7))
norm1d = st.sampled_from([n for n in ("ln", "rms", "none", "fln") if not (n == "fln" and "fln_attr" in DISABLED)])
mlp_block = st.tuples(st.just("mlp"), WIDTH, norm1d, st.booleans(), st.booleans())
attn_block = st.tuples(st.just("attn"), st.integers(2, 4), st.sampled_from([1, 2, 4]), st.integers(2, 4),
                       st.sampled_from(["fused", "chunk", "split", "sep", "sep"]),
                       st.sampled_from(["attr", "minus1", "heads_minus1"]), st.sampled_from(["sdpa", "matmul"]),
                       st.sampled_from(["interleave", "expand"]), norm1d, st.booleans(),
                       st.booleans() if "head_dim_scale" not in DISABLED else st.just(False),
                       st.sampled_from(["minus1", "minus1", "prod", "dim"]))
half_block = st.tuples(st.just("half"), st.booleans())
norm_block = st.tuples(st.just("norm"), norm1d)
tokens = st.fixed_dictionaries({
    "dim": WIDTH, "patch": st.booleans(), "cls": st.booleans(), "pos": st.booleans(), "cls_out": st.booleans(),
    "final_norm": norm1d,
    "blocks": st.tuples(st.lists(st.one_of(attn_block, attn_block, mlp_block, half_block, norm_block), max_size=3),
                        mlp_block).map(lambda t: t[0] + [t[1]]),  # ends with an MLP, as transformers do
})
specs = st.fixed_dictionaries({
    "stem": WIDTH, "neck": WIDTH, "cnn": st.lists(cnn_step, min_size=0, max_size=5), "tokens": st.one_of(st.none(), tokens, tokens),
    "aux": st.booleans(), "aux_ref": st.integers(0, 7), "tuple_out": st.booleans(),
})


# ---------------------------------------------------------------------------------------------- the check
def make(spec, seed: int):
    torch.manual_seed(seed)
    model = RandomNet(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.double().eval()


def zeroed(model: nn.Module, graph, plan) -> nn.Module:
    """A copy of ``model`` with every parameter/buffer slice owned by ``plan``'s units set to zero."""
    ref = copy.deepcopy(model)
    tensors = dict(ref.named_parameters(remove_duplicate=False))
    tensors.update(dict(ref.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for gid, units in plan.items():
            for fqn, dim, idx in graph.group(gid).slices(units):
                tensors[fqn].index_fill_(dim, torch.as_tensor(idx, dtype=torch.long), 0.0)
    return ref


def check_consistency(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels, name
            assert m.weight.shape[1] * m.groups == m.in_channels, name
        if isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features), name
        if isinstance(m, (nn.BatchNorm2d,)):
            assert m.weight.shape[0] == m.num_features == m.running_mean.shape[0], name
        if isinstance(m, nn.GroupNorm):
            assert m.weight.shape[0] == m.num_channels and m.num_channels % m.num_groups == 0, name
        if isinstance(m, nn.LayerNorm):
            assert tuple(m.normalized_shape) == tuple(m.weight.shape), name


def draw_plan(data, groups) -> dict[int, list[int]]:
    chosen = data.draw(st.lists(st.sampled_from([g.id for g in groups]), min_size=1, max_size=len(groups),
                                unique=True), label="groups")
    plan = {}
    for gid in chosen:
        size = next(g.size for g in groups if g.id == gid)
        plan[gid] = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size - 1, unique=True),
                              label=f"units of group {gid}")
    return plan


def check_random_model(spec, seed, data) -> None:
    model = make(spec, seed)
    torch.manual_seed(seed + 1)
    x, x3 = torch.randn(2, 3, SIDE, SIDE, dtype=torch.float64), torch.randn(3, 3, SIDE, SIDE, dtype=torch.float64)
    before = snapshot(model)
    ref, ref3 = run(model, x), run(model, x3)

    graph = pk.analyze(model, x)
    assert_state_unchanged(model, before, "after pk.analyze")
    assert_same_outputs(ref, run(model, x), "after pk.analyze")
    prunable = [g for g in graph.prunable_groups if g.size > 1]
    assert prunable, f"no prunable group: {[(g.id, g.size, g.reason) for g in graph.groups]}"
    plan = draw_plan(data, prunable)

    # exact groups alone: the pruned copy equals the original with those units zeroed (tight, float64)
    exact = {g: u for g, u in plan.items() if graph.group(g).exact}
    if exact:
        try:
            trial = pruned_copy(model, graph, exact, verify=True)
        except pk.PruningError:
            if STRICT:
                raise
            event("exact groups alone: refused")
            trial = None
        assert_state_unchanged(model, before, "after pruning a copy")
        if trial is not None:
            zref = zeroed(model, graph, exact)
            for inp in (x, x3):
                want = run(zref, inp)
                got = run(trial, inp)
                scale = max([1.0] + [float(w.abs().max()) for w in want if w.is_floating_point() and w.numel()])
                assert_same_outputs(want, got, f"exact groups {sorted(exact)} vs the zeroed original",
                                    rtol=1e-9, atol=1e-9 * scale)
            event("exact groups alone: equal to the zeroed original")

    # the whole plan: prunes (verified) or is refused with the model restored
    try:
        pk.prune(model, graph, plan, verify=True)
    except pk.PruningError:
        if STRICT:
            raise
        assert_state_unchanged(model, before, "after a refused prune")
        assert_same_outputs(ref, run(model, x), "after a refused prune")
        event("whole plan: refused, model restored")
        return
    out, out3 = run(model, x), run(model, x3)
    assert [o.shape for o in out] == [r.shape for r in ref]
    assert [o.shape for o in out3] == [r.shape for r in ref3]
    check_consistency(model)
    event("whole plan: pruned")
    event(f"units in the plan: {', '.join(sorted({graph.group(g).unit for g in plan}))}")


SPECS = specs


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(spec=SPECS, seed=st.integers(0, 2 ** 16), data=st.data())
def test_random_architecture_prunes_exactly_or_is_refused(spec, seed, data):
    check_random_model(spec, seed, data)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(spec=SPECS, seed=st.integers(0, 2 ** 16), data=st.data())
def test_random_architecture_many(spec, seed, data):
    check_random_model(spec, seed, data)
