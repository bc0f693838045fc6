"""Measuring: pk.count against torch.utils.flop_counter, params, kmapp, the per-module table,
MACs / params as functions of kept units (exact and differentiable), and pk.latency."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import prunekit as pk
from prunekit.capture.tape import OpRecord, TRef
from prunekit.cost.flops import MACS, CompiledPoly, Poly, op_macs
from tests.zoo import tricky_models as T


_CPU_SDPA_KERNEL = "_scaled_dot_product_flash_attention_for_cpu"


def _analytic_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one attention call from its shapes, written out here (not prunekit's table): 2 x the MACs of
    q @ k^T and of scores @ v, over (batch, query heads); key/value may have fewer heads (GQA)."""
    *lead, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    assert key_shape[-1] == d_q and value_shape[-2] == s_k, (query_shape, key_shape, value_shape)
    batch_heads = 1
    for d in lead:
        batch_heads *= d
    return 2 * batch_heads * s_q * s_k * (d_q + d_v)


def _flop_counter_counts_cpu_sdpa() -> bool:
    """Whether the installed torch.utils.flop_counter counts a fused scaled_dot_product_attention on CPU.
    Version-dependent: torch 2.4 and 2.14 register formulas only for the CUDA kernels (flash, efficient, cudnn),
    so the CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` counts as 0 there."""
    q = torch.randn(1, 1, 2, 4)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        F.scaled_dot_product_attention(q, q, q)
    return fc.get_total_flops() > 0


_CUSTOM = {}
if not _flop_counter_counts_cpu_sdpa() and hasattr(torch.ops.aten, _CPU_SDPA_KERNEL):
    # This torch's flop_counter misses the CPU SDPA kernel: the reference adds the analytic attention FLOPs
    # for exactly the calls that reach that kernel (calls that take SDPA's math path are counted by
    # flop_counter as bmm already).  prunekit's count is still compared with an independent figure.
    _CUSTOM[getattr(torch.ops.aten, _CPU_SDPA_KERNEL)] = _analytic_sdpa_flops


def _sdpa_has_enable_gqa() -> bool:
    q = torch.randn(1, 2, 2, 4)
    try:
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
    except TypeError:  # torch < 2.5: no enable_gqa argument
        return False
    return True


def reference_flops(model, x, mha_fastpath: bool = False) -> int:
    """torch.utils.flop_counter's count (plus the analytic FLOPs of CPU SDPA kernel calls where this torch's
    flop_counter counts them as 0, see ``_CUSTOM``).  nn.MultiheadAttention's fused eval fast path
    (``_native_multi_head_attention``) is invisible to flop_counter; prunekit's capture disables the
    fast path, so the reference does too (unless ``mha_fastpath``)."""
    model.eval()
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(mha_fastpath)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=dict(_CUSTOM)) as fc:
            model(*x) if isinstance(x, tuple) else model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(old)
    return fc.get_total_flops()


# ---------------------------------------------------------------- models for the agreement cases
class GroupedDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.g = nn.Conv2d(12, 24, 3, padding=2, dilation=2, groups=4)
        self.dw = nn.Conv2d(24, 24, 5, stride=2, padding=2, groups=24)
        self.dwm = nn.Conv2d(24, 48, 3, groups=24)  # depth multiplier 2
        self.pw = nn.Conv2d(48, 8, 1)

    def forward(self, x):
        return self.pw(F.relu(self.dwm(F.relu(self.dw(F.relu(self.g(self.a(x))))))))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
        self.upg = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=2)
        self.up1d = nn.ConvTranspose1d(4, 5, 3, stride=3)

    def forward(self, x):
        y = self.upg(F.relu(self.up(self.down(x))))
        return self.up1d(y.flatten(2))


class SDPAGqa(nn.Module):
    """SDPA with a mask, a causal call and grouped-query attention (fewer key/value heads)."""

    def __init__(self, dim=16):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim)  # 2 kv heads of 4 vs 4 q heads of 4
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, 4).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, 8).transpose(1, 2).split(4, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        y = y + F.scaled_dot_product_attention(q, q, q, is_causal=True)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        y = y + F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class Linear3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 4, bias=False)

    def forward(self, x):  # (B, T, 6), and a non-contiguous (T, B, 10) view
        return self.fc2(F.relu(self.fc1(x)).transpose(0, 1))


class Products(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 7))
        self.bias = nn.Parameter(torch.randn(3, 4, 7))

    def forward(self, x):  # x: (3, 4, 5)
        a = torch.bmm(x, x.transpose(1, 2))  # (3, 4, 4)
        b = torch.matmul(x, self.w)  # (3, 4, 7)
        c = torch.baddbmm(self.bias, a, b)  # (3, 4, 7)
        d = torch.einsum("bij,bkj->bik", c, c)  # (3, 4, 4)
        e = x.unsqueeze(0).expand(2, 3, 4, 5) @ self.w  # 4-D matmul
        f = torch.addmm(self.w[0], x[0], self.w)  # (4, 7)
        return a.sum() + b.sum() + d.sum() + e.sum() + f.sum()


def _tv(name):
    import torchvision
    return lambda: getattr(torchvision.models, name)()


def _vit():
    import timm
    return timm.create_model("vit_tiny_patch16_224", img_size=64)


AGREE = {
    "resnet18": (_tv("resnet18"), lambda: torch.randn(1, 3, 96, 96)),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), lambda: torch.randn(2, 3, 64, 64)),
    "grouped_depthwise": (GroupedDepthwise, lambda: torch.randn(2, 3, 16, 16)),
    "conv_transpose": (Transposed, lambda: torch.randn(2, 3, 8, 8)),
    "vit_tiny": (_vit, lambda: torch.randn(1, 3, 64, 64)),
    "sdpa_gqa": (SDPAGqa, lambda: torch.randn(2, 6, 16)),
    "sdpa_tricky": (T.SDPANet, lambda: torch.randn(2, 4, 5)),
    "torch_mha": (T.TorchMHANet, lambda: torch.randn(2, 4, 5)),
    "matmul_attention": (T.MatmulAttentionNet, lambda: torch.randn(2, 4, 5)),
    "linear_3d": (Linear3d, lambda: torch.randn(2, 3, 6)),
    "products": (Products, lambda: torch.randn(3, 4, 5)),
}


@pytest.mark.parametrize("name", sorted(AGREE))
def test_flops_agree_with_flop_counter(name):
    if name == "sdpa_gqa" and not _sdpa_has_enable_gqa():
        pytest.skip(f"F.scaled_dot_product_attention has no enable_gqa in torch {torch.__version__} (added in 2.5)")
    torch.manual_seed(0)
    factory, inp = AGREE[name]
    model, x = factory(), inp()
    ref = reference_flops(model, x)
    stats = pk.count(model, x)
    assert ref > 0
    assert stats.flops == ref, f"{name}: prunekit {stats.flops} vs flop_counter {ref} ({stats.per_op})"
    assert stats.flops == 2 * stats.macs
    assert pk.count(model, x, device="real").flops == ref  # the meta capture counts what a real run counts


def test_differences_from_flop_counter_are_the_documented_ones():
    """mv, addmv, dot and addbmm are matrix products: counted here, not by flop_counter;
    flop_counter misses nn.MultiheadAttention's fused fast path, prunekit counts the attention."""
    mha, x = T.TorchMHANet(), torch.randn(2, 4, 5)
    assert reference_flops(mha, x, mha_fastpath=True) < reference_flops(mha, x) == pk.count(mha, x).flops
    class MatVec(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))

        def forward(self, v):
            return self.w @ v, torch.dot(v, v), torch.addmv(v[:4], self.w, v)
    v = torch.randn(6)
    assert reference_flops(MatVec(), v) == 0
    assert pk.count(MatVec(), v).per_op == {"mv": 24, "dot": 6, "addmv": 24}

    class AddBmm(nn.Module):
        def forward(self, x, y):
            return torch.addbmm(torch.zeros(3, 5), x, y)
    x, y = torch.randn(4, 3, 2), torch.randn(4, 2, 5)
    assert reference_flops(AddBmm(), (x, y)) == 0
    assert pk.count(AddBmm(), (x, y)).macs == 4 * 3 * 2 * 5


def test_table_covers_every_forward_op_flop_counter_counts():
    missing = []
    for op in flop_registry:
        name = getattr(op, "__name__", str(op))
        if "backward" in name or name.startswith("flex_attention"):  # backward-only / higher-order op
            continue
        if name not in MACS:
            missing.append(name)
    assert not missing, f"ops counted by torch.utils.flop_counter but missing from the MACS table: {missing}"


def test_kernel_attention_layout_formulas():
    """_flash/_efficient_attention_forward take (batch, seq, heads, dim): same MACs as sdpa on (b, h, s, d)."""
    b, h, lq, lk, e, ev = 2, 3, 5, 7, 4, 6
    shapes = {0: (b, lq, h, e), 1: (b, lk, h, e), 2: (b, lk, h, ev), 3: (b, lq, h, ev)}
    op = OpRecord(0, "aten._flash_attention_forward", "_flash_attention_forward", (TRef(0), TRef(1), TRef(2)), {},
                  [TRef(3)], "")
    shape = lambda r: shapes[r.id]  # noqa: E731
    size = lambda r, d: shapes[r.id][d]  # noqa: E731
    expected = b * h * lq * lk * (e + ev)
    assert op_macs(op, size, shape) == expected
    op.packet = "_efficient_attention_forward"
    assert op_macs(op, size, shape) == expected
    op.packet = "_scaled_dot_product_flash_attention_for_cpu"
    shapes.update({0: (b, h, lq, e), 1: (b, h, lk, e), 2: (b, h, lk, ev)})
    assert op_macs(op, size, shape) == expected


# ---------------------------------------------------------------- params, kmapp, table
def test_params_count_tied_weights_once():
    m = T.TiedEmbedding()
    x = torch.randint(0, 16, (2, 5))
    stats = pk.count(m, x)
    unique = sum(p.numel() for p in m.parameters())
    with_dups = sum(p.numel() for _, p in m.named_parameters(remove_duplicate=False))
    assert with_dups > unique
    assert stats.params == unique
    assert sum(r.params for r in stats.per_module) == unique
    assert stats.input_pixels is None and stats.normalized_flops is None  # token ids are not an image


def test_kmapp_is_flops_per_pixel_per_image():
    m = GroupedDepthwise()
    s1 = pk.count(m, torch.randn(1, 3, 16, 12))
    assert s1.input_pixels == 16 * 12 and s1.batch == 1
    assert s1.normalized_flops == pytest.approx(s1.flops / (16 * 12 * 1000))
    s2 = pk.count(m, torch.randn(3, 3, 16, 12))
    assert s2.flops == 3 * s1.flops
    assert s2.kmapp == pytest.approx(s1.kmapp)


def test_per_module_rows_sum_to_totals_and_table_renders():
    import torchvision
    m = torchvision.models.resnet18()
    x = torch.randn(1, 3, 64, 64)
    stats = pk.count(m, x)
    assert sum(r.macs for r in stats.per_module) == stats.macs
    assert sum(r.flops for r in stats.per_module) == stats.flops
    assert sum(r.params for r in stats.per_module) == stats.params == sum(p.numel() for p in m.parameters())
    rows = {r.module: r for r in stats.per_module}
    # conv1: 64 x 3 x 7 x 7 kernel on a 32 x 32 output
    assert rows["conv1"].type == "Conv2d" and rows["conv1"].macs == 64 * 32 * 32 * 3 * 7 * 7
    assert rows["conv1"].params == 64 * 3 * 7 * 7 and rows["bn1"].params == 2 * 64 and rows["bn1"].macs == 0
    assert rows["fc"].macs == 512 * 1000 and rows["fc"].ops >= 1
    assert "layer1" not in rows  # containers own nothing: no empty rows
    text = stats.table(top=5)
    assert "FLOPs (2xMACs)" in text and "conv1" in text and "... (" in text
    assert len(stats.table().splitlines()) > len(text.splitlines())
    d = json.loads(json.dumps(stats.to_dict()))
    assert d["flops"] == stats.flops and len(d["per_module"]) == len(stats.per_module)
    assert "MACs" in str(stats)


def test_count_reuses_a_graph_and_predicts_a_plan():
    torch.manual_seed(0)
    m = T.DenseConcat()
    x = torch.randn(2, 3, 8, 8)
    graph = pk.analyze(m, x)
    base = pk.count(m, x)
    assert pk.count(graph).to_dict() == base.to_dict()
    with pytest.raises(ValueError, match="count\\(graph\\)"):
        pk.count(graph, x)
    plan = {g.id: list(range(1 + g.id % 2)) for g in graph.prunable_groups}
    predicted = pk.count(graph, plan=plan)
    assert predicted.macs == graph.macs(plan) < base.macs
    pk.prune(m, graph, plan)
    real = pk.count(m, x)
    assert (real.macs, real.params) == (predicted.macs, predicted.params)


# ---------------------------------------------------------------- macs_kept / params_kept
def _kept_models():
    import timm
    import torchvision
    return {
        "resnet18": (torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)),
        "vit_tiny": (timm.create_model("vit_tiny_patch16_224", img_size=32), torch.randn(1, 3, 32, 32)),
        "matmul_attention": (T.MatmulAttentionNet(), torch.randn(2, 4, 5)),
        "sdpa_heads": (T.SDPANet(), torch.randn(2, 4, 5)),
        "torch_mha": (T.TorchMHANet(), torch.randn(2, 4, 5)),
        "dense_concat": (T.DenseConcat(), torch.randn(2, 3, 8, 8)),
        "depthwise_multiplier": (T.DepthwiseMultiplier(), torch.randn(2, 3, 8, 8)),
    }


@pytest.fixture(scope="module")
def kept_graphs():
    torch.manual_seed(0)
    return {name: (m, x, pk.analyze(m, x)) for name, (m, x) in _kept_models().items()}


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny", "matmul_attention", "sdpa_heads", "torch_mha",
                                  "dense_concat", "depthwise_multiplier"])
def test_macs_kept_equals_macs_of_plan(kept_graphs, name):
    m, x, graph = kept_graphs[name]
    assert graph.macs_kept() == graph.macs() == pk.count(m, x).macs
    assert graph.params_kept() == sum(p.numel() for p in m.parameters())
    assert any(g.unit == "head" for g in graph.groups) or name in ("resnet18", "dense_concat", "depthwise_multiplier")
    rng = random.Random(name)
    for _ in range(5):
        drops = {g.id: rng.randint(0, g.size - 1) for g in graph.groups if rng.random() < 0.7}
        kept = {gid: graph.group(gid).size - n for gid, n in drops.items()}
        got = graph.macs_kept(kept)
        assert isinstance(got, int) and got == graph.macs(drops)
        assert graph.flops_kept(kept) == graph.flops(drops)
        assert graph.params_kept(kept) == pk.count(graph, plan=drops).params


def test_params_kept_matches_a_really_pruned_model(kept_graphs):
    m, x, _ = kept_graphs["matmul_attention"]
    m = copy.deepcopy(m)
    graph = pk.analyze(m, x)
    plan = {g.id: [0] for g in graph.prunable_groups}
    kept = {gid: graph.group(gid).size - 1 for gid in plan}
    expect_macs, expect_params = graph.macs_kept(kept), graph.params_kept(kept)
    pk.prune(m, graph, plan)
    assert sum(p.numel() for p in m.parameters()) == expect_params
    assert pk.count(m, x).macs == expect_macs


def test_macs_kept_is_differentiable(kept_graphs):
    m, x, graph = kept_graphs["vit_tiny"]
    base = {g.id: float(g.size) for g in graph.groups}
    grads = 0
    for g in graph.prunable_groups[:6]:
        k = torch.tensor(g.size - 1.5, dtype=torch.float64, requires_grad=True)
        val = graph.macs_kept({**base, g.id: k})
        assert isinstance(val, torch.Tensor) and val.dtype == torch.float64
        (grad,) = torch.autograd.grad(val, k)
        # MACs are a polynomial of degree <= 2 in one group's kept count: central differences are exact
        h = 0.5
        fd = (graph.macs_kept({g.id: g.size - 1.5 + h}) - graph.macs_kept({g.id: g.size - 1.5 - h})) / (2 * h)
        assert torch.isfinite(grad) and grad.item() == pytest.approx(fd, rel=1e-9)
        assert val.item() == pytest.approx(graph.macs_kept({g.id: g.size - 1.5}), rel=1e-12)
        grads += grad.item() != 0
    assert grads > 0
    # a float32 vector of kept counts: one backward gives every group's gradient
    v = torch.tensor([float(g.size) for g in graph.groups], requires_grad=True)
    loss = graph.flops_kept({g.id: v[i] for i, g in enumerate(graph.groups)}) / graph.flops()
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and v.grad is not None and (v.grad > 0).any()
    assert torch.isfinite(v.grad).all()


def test_macs_kept_rejects_bad_input(kept_graphs):
    _, _, graph = kept_graphs["resnet18"]
    g = graph.prunable_groups[0]
    with pytest.raises(ValueError, match=f"group {g.id} has {g.size} units"):
        graph.macs_kept({g.id: g.size + 1})
    with pytest.raises(KeyError):
        graph.params_kept({10 ** 6: 1})


def test_compiled_poly():
    x, y = Poly.var(1), Poly.var(2)
    p = 3 * x * x * y + 2 * y + 7
    c = CompiledPoly(p, {1: 4, 2: 5})
    assert c({}) == 3 * 16 * 5 + 10 + 7
    assert c({1: 2}) == 3 * 4 * 5 + 10 + 7
    t = torch.tensor(2.0, requires_grad=True)
    val = c({1: t, 2: 1.0})
    val.backward()
    assert val.item() == 3 * 4 + 2 + 7 and t.grad.item() == 6 * 2
    assert isinstance(c({3: torch.tensor(1.0)}), torch.Tensor)  # a tensor input always gives a tensor


# ---------------------------------------------------------------- latency
def test_latency_measures_and_restores_state():
    m = T.PlainCNN()
    m.train()
    m.features[0].eval()  # a mixed state must come back exactly
    flags = [mod.training for mod in m.modules()]
    threads = torch.get_num_threads()
    seen = []

    def fwd(model, inp):
        seen.append((inp.shape[0], model.training, torch.is_grad_enabled(), torch.get_num_threads()))
        return model(inp)

    res = pk.latency(m, torch.randn(2, 3, 8, 8), batch_sizes=[1, 5], threads=1, warmup=1, repeats=3, forward_fn=fwd)
    assert [r.batch_size for r in res.results] == [1, 5]
    assert all(r.median_ms > 0 and r.p10_ms <= r.median_ms <= r.p90_ms and r.repeats == 3 for r in res.results)
    assert res[5].mean_ms > 0 and len(res[5].times_ms) == 3
    assert {s[0] for s in seen} == {1, 5} and len(seen) == 2 * (1 + 3)
    assert all(not tr and not grad and n == 1 for _, tr, grad, n in seen)
    assert [mod.training for mod in m.modules()] == flags
    assert torch.get_num_threads() == threads
    assert next(m.parameters()).device.type == "cpu"
    d = json.loads(json.dumps(res.to_dict()))
    assert d["results"][0]["batch_size"] == 1 and "median" in str(res)


def test_latency_restores_after_an_error_and_refuses_meta():
    m = T.PlainCNN().train()
    threads = torch.get_num_threads()

    def boom(model, inp):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        pk.latency(m, torch.randn(1, 3, 8, 8), threads=1, forward_fn=boom)
    assert m.training and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="meta"):
        pk.latency(T.PlainCNN().to("meta"), torch.randn(1, 3, 8, 8))


# ---------------------------------------------------------------- the version-dependent SDPA reference
def test_sdpa_reference_matches_flop_counter_on_the_math_path():
    """The analytic SDPA FLOPs the reference adds (on torches whose flop_counter counts the CPU kernel as 0)
    equal what flop_counter itself counts when SDPA runs its math path (explicit bmm ops)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    model, x = T.SDPANet().eval(), torch.randn(2, 4, 5)
    with sdpa_kernel([SDPBackend.MATH]):
        math_path = reference_flops(model, x)
    assert math_path > 0
    assert reference_flops(model, x) == math_path == pk.count(model, x).flops


def test_a_wrong_sdpa_count_still_fails_the_comparison(monkeypatch):
    """The reference is independent of prunekit's formula table: a wrong SDPA formula is caught."""
    torch.manual_seed(0)
    model, x = T.SDPANet(), torch.randn(2, 4, 5)
    ref = reference_flops(model, x)
    stats = pk.count(model, x)
    assert stats.flops == ref
    # the attention ops prunekit's capture recorded (the CPU kernel, or bmm where SDPA took its math path)
    attention = [op for op in stats.per_op if op != "addmm"]
    assert attention, stats.per_op
    for op in attention:
        monkeypatch.setitem(MACS, op, lambda rec, size, shape, _f=MACS[op]: _f(rec, size, shape) + 1)
    assert pk.count(model, x).flops != ref
