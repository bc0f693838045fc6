"""Grouped-query attention heads (issue 13, item 1): whole kv heads and query-head slots within kv groups are
prunable in decoder-only LLMs, with the same groups whether the model is called with or without
``attention_mask`` and with eager or SDPA attention (transformers' ``repeat_kv`` expand, SDPA's ``enable_gqa``
and the flash-for-CPU kernel given fewer kv heads); head_dim under RoPE stays pinned and says why.

Also unit tests of the rules on small hand-written modules (``F.scaled_dot_product_attention(...,
enable_gqa=True)``, a ``repeat_kv`` expand)."""
from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from tests._deps import require_transformers

VOCAB = 128


# ---------------------------------------------------------------- transformers models
def _config(tf, arch: str, heads: int = 4, kv: int = 2, head_dim: int | None = None, layers: int = 2):
    c = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=heads,
             num_key_value_heads=kv, vocab_size=VOCAB)
    if head_dim is not None:
        c["head_dim"] = head_dim
    if arch == "llama":
        return tf.LlamaConfig(**c)
    if arch == "mistral":
        return tf.MistralConfig(**c)
    if arch == "qwen2":
        return tf.Qwen2Config(**c)
    if arch == "qwen3":  # q_norm / k_norm (RMSNorm over head_dim)
        return tf.Qwen3Config(**{"head_dim": 16, **c})
    if arch == "gemma2":  # attention-logit softcapping (eager only in transformers)
        return tf.Gemma2Config(**{"head_dim": 16, **c})
    if arch == "gemma3":  # sliding-window layers, q_norm / k_norm
        return tf.Gemma3TextConfig(**{"head_dim": 16, **c}, sliding_window=4)
    raise ValueError(arch)


def _build(arch: str, impl: str, **kw):
    tf = require_transformers()
    cfg = _config(tf, arch, **kw)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = tf.AutoModelForCausalLM.from_config(cfg)
        except ValueError as e:  # e.g. Gemma2 has no SDPA path in this transformers
            pytest.skip(f"{arch} cannot be built with attn_implementation={impl!r}: {e}"[:200])
    return model.eval()


def _inputs(mask: bool, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, seq), generator=g)
    x = {"input_ids": ids}
    if mask:
        x["attention_mask"] = torch.ones_like(ids)
    return x


def _attn_groups(graph, layer: int = 0):
    """(kv-head groups, query-slot groups) of one layer's self-attention."""
    pre = f"model.layers.{layer}.self_attn."
    kv, slots = [], []
    for g in graph.groups:
        if g.unit != "head":
            continue
        fq = {m.fqn for m in g.members}
        if pre + "k_proj.weight" in fq:
            kv.append(g)
        elif pre + "q_proj.weight" in fq and pre + "o_proj.weight" in fq:
            slots.append(g)
    return kv, slots


def _signature(graph):
    """Everything about the groups that must not depend on the call style."""
    return [(g.unit, g.size, g.prunable, g.exact, tuple(sorted({m.fqn for m in g.members}))) for g in graph.groups]


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]
STYLES = [("eager", False), ("eager", True), ("sdpa", False), ("sdpa", True)]


def _masked_vs_pruned(model, graph, x, plan):
    """Logits of the model with the plan's units zeroed, and after pruning them (in place)."""
    pk.mask(model, graph, plan)
    with torch.no_grad():
        masked = model(**x).logits
    pk.unmask(model)
    pk.prune(model, graph, plan)
    with torch.no_grad():
        pruned = model(**x).logits
    return masked, pruned


def _random_plan(graph, groups, ratio: float, seed: int):
    rnd = random.Random(seed)
    return {g.id: sorted(rnd.sample(range(g.size), max(1, int(g.size * ratio)))) for g in groups
            if g.prunable and g.size > 1}


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_heads_and_query_slots_prunable_in_every_call_style(arch):
    sigs = {}
    for impl, mask in STYLES:
        model = _build(arch, impl)
        x = _inputs(mask)
        g = pk.analyze(model, x)
        n_rep = model.model.layers[0].self_attn.num_key_value_groups
        assert n_rep == 2
        for layer in range(2):
            kv, slots = _attn_groups(g, layer)
            assert len(kv) == 1 and kv[0].size == 2 and kv[0].prunable, (impl, mask, kv)
            assert len(slots) == 1 and slots[0].size == n_rep and slots[0].prunable, (impl, mask, slots)
            assert kv[0].exact and slots[0].exact, (impl, mask, kv[0].inexact_reasons, slots[0].inexact_reasons)
            pre = f"model.layers.{layer}.self_attn."
            assert {m.fqn for m in slots[0].members} == {pre + "q_proj.weight", pre + "o_proj.weight"} | (
                {pre + "q_proj.bias"} if arch == "qwen2" else set())
        # head_dim under RoPE: pinned, and the reason says RoPE and why a reload matters
        hd = [gr for gr in g.groups if gr.unit != "head" and any(
            m.fqn == f"model.layers.0.self_attn.{p}_proj.weight" and m.dim == 0 for m in gr.members for p in "qkv")]
        assert hd and all(not gr.prunable and "RoPE" in gr.reason and "reloaded config" in gr.reason for gr in hd)
        # rotary_emb's unused cached copy is in no group
        assert not any(m.fqn.endswith("original_inv_freq") for gr in g.groups for m in gr.members)
        # window and layer index are never rewritten by a plan
        assert not any(b.attr in ("layer_idx", "sliding_window") for b in g.bindings)
        sigs[(impl, mask)] = _signature(g)
    first = next(iter(sigs.values()))
    for k, s in sigs.items():
        assert s == first, f"{arch}: groups differ for {k}"


def test_sdpa_gqa_kernel_is_on_the_tape():
    """With attention_mask, transformers' SDPA path hands the kernel fewer kv heads than query heads (the case
    the SDPA rule used to pin as 'grouped-query heads')."""
    model = _build("llama", "sdpa")
    x = _inputs(True)
    g = pk.analyze(model, x)
    gqa = [op for op in g.tape.ops if "scaled_dot_product" in op.packet and not op.packet.startswith("prunekit")
           and g.analyzer.shape(op.args[0])[1] != g.analyzer.shape(op.args[1])[1]]
    if not gqa:
        pytest.skip("this torch/transformers pair repeats kv heads before SDPA (no GQA kernel call)")
    kv, slots = _attn_groups(g)
    assert kv[0].prunable and slots[0].prunable


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl,mask", [("eager", True), ("sdpa", False), ("sdpa", True)])
def test_random_plan_prunes_and_equals_masked(arch, impl, mask):
    model = _build(arch, impl)
    x = _inputs(mask)
    g = pk.analyze(model, x)
    attn = [gr for layer in range(2) for gs in _attn_groups(g, layer) for gr in gs]
    exact = [gr for gr in g.groups if gr.prunable and gr.exact]
    assert set(gr.id for gr in attn) <= set(gr.id for gr in exact)
    plan = _random_plan(g, exact, 0.3, seed=hash((arch, impl, mask)) % 1000)
    masked, pruned = _masked_vs_pruned(model, g, x, plan)
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)
    a = model.model.layers[0].self_attn
    _, slots = _attn_groups(g, 0)
    assert a.num_key_value_groups == 2 - len(plan[slots[0].id])
    assert a.q_proj.out_features == a.k_proj.out_features * a.num_key_value_groups


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_random_30pct_plan_of_every_prunable_group_verifies(arch):
    model = _build(arch, "sdpa")
    x = _inputs(True)
    g = pk.analyze(model, x)
    plan = _random_plan(g, g.groups, 0.3, seed=7)
    kv, slots = _attn_groups(g)
    assert kv[0].id in plan and slots[0].id in plan
    pk.prune(model, g, plan)  # verifies (raises and restores on failure)
    with torch.no_grad():
        assert model(**x).logits.shape == (2, 8, VOCAB)
    # a pruned model still generates with its KV cache (the forward uses the new n_rep)
    with torch.no_grad():
        out = model.generate(x["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("heads,head_dim", [(4, None), (8, 8)])  # (8, 8): as many heads as head_dim
def test_mha_kv_heads_equal_query_heads(impl, heads, head_dim):
    model = _build("llama", impl, heads=heads, kv=heads, head_dim=head_dim)
    x = _inputs(True)
    g = pk.analyze(model, x)
    kv, slots = _attn_groups(g)
    assert len(kv) == 1 and kv[0].size == heads and kv[0].prunable and kv[0].exact and not slots
    masked, pruned = _masked_vs_pruned(model, g, x, {kv[0].id: [1, 2]})
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)
    a = model.model.layers[0].self_attn
    assert a.head_dim == 64 // heads  # head_dim (pinned under RoPE) does not follow the heads
    assert a.q_proj.out_features == (heads - 2) * a.head_dim == a.k_proj.out_features


@pytest.mark.parametrize("impl,mask", STYLES)
def test_mqa_one_kv_head(impl, mask):
    model = _build("llama", impl, heads=4, kv=1)
    x = _inputs(mask)
    g = pk.analyze(model, x)
    kv, slots = _attn_groups(g)
    assert not kv  # one kv head: nothing to choose
    assert len(slots) == 1 and slots[0].size == 4 and slots[0].prunable and slots[0].exact
    masked, pruned = _masked_vs_pruned(model, g, x, {slots[0].id: [0, 3]})
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)
    a = model.model.layers[0].self_attn
    assert a.num_key_value_groups == 2 and a.q_proj.out_features == 32 and a.k_proj.out_features == 16


def test_heads_equal_head_dim_and_layer_idx_equal_kv_heads():
    """8 query heads of head_dim 8 (``head_dim`` == number of heads), 4 per kv group, 3 layers (layer 2's
    ``layer_idx`` == 2 kv heads): the size attributes bind to the right spaces, so heads stay prunable."""
    model = _build("llama", "eager", heads=8, kv=2, head_dim=8, layers=3)
    x = _inputs(False)
    g = pk.analyze(model, x)
    for layer in range(3):
        kv, slots = _attn_groups(g, layer)
        assert kv[0].size == 2 and kv[0].prunable and slots[0].size == 4 and slots[0].prunable, layer
    hd = {(b.module, b.attr): b for b in g.bindings}
    assert ("model.layers.2.self_attn", "layer_idx") not in hd
    plan = {}
    for layer in range(3):
        kv, slots = _attn_groups(g, layer)
        plan[kv[0].id] = [layer % 2]
        plan[slots[0].id] = [1, 2]
    masked, pruned = _masked_vs_pruned(model, g, x, plan)
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)
    for layer in range(3):
        a = model.model.layers[layer].self_attn
        assert (a.head_dim, a.num_key_value_groups, a.layer_idx) == (8, 2, layer)
        assert a.q_proj.out_features == 16 and a.k_proj.out_features == 8


# ---------------------------------------------------------------- hand-written modules
needs_gqa_sdpa = pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 5),
    reason="F.scaled_dot_product_attention(enable_gqa=True) needs torch >= 2.5")


class _GQA(nn.Module):
    """Grouped-query self-attention of width 32: 4 query heads of head_dim 4 over 2 kv heads."""

    def __init__(self, dim=32, heads=4, kv=2, head_dim=4, style="sdpa", rep_name="num_key_value_groups"):
        super().__init__()
        self.head_dim, self.style = head_dim, style
        setattr(self, rep_name, heads // kv)
        self.rep_name = rep_name
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv * head_dim)
        self.v = nn.Linear(dim, kv * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        if self.style == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:  # transformers' repeat_kv, then eager attention
            n_rep = getattr(self, self.rep_name)
            kb, kvh, sl, hd = k.shape
            k = k[:, :, None].expand(kb, kvh, n_rep, sl, hd).reshape(kb, kvh * n_rep, sl, hd)
            v = v[:, :, None].expand(kb, kvh, n_rep, sl, hd).reshape(kb, kvh * n_rep, sl, hd)
            y = torch.softmax(q @ k.transpose(2, 3) * 0.5, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def _head_groups(g):
    kv = [gr for gr in g.groups if gr.unit == "head" and "k.weight" in {m.fqn for m in gr.members}]
    slots = [gr for gr in g.groups if gr.unit == "head" and {m.fqn for m in gr.members} >= {"q.weight", "o.weight"}
             and "k.weight" not in {m.fqn for m in gr.members}]
    return kv, slots


def _check_layout(kv, slot, heads=4, n_kv=2, head_dim=4):
    """Query head h reads kv head h // n_rep: kv head k owns q heads k*n_rep..k*n_rep+n_rep-1, slot r owns q
    heads k*n_rep + r of every k."""
    n_rep = heads // n_kv
    rows = lambda hs: sorted(i for h in hs for i in range(h * head_dim, (h + 1) * head_dim))  # noqa: E731
    q_of = lambda gr, u: [idx.tolist() for f, d, idx in gr.slices([u]) if f == "q.weight"][0]  # noqa: E731
    for k in range(n_kv):
        assert q_of(kv, k) == rows(range(k * n_rep, (k + 1) * n_rep))
    for r in range(n_rep):
        assert q_of(slot, r) == rows(k * n_rep + r for k in range(n_kv))


def _prune_vs_mask(m, x, g, plan):
    ref = copy.deepcopy(m)
    g2 = pk.analyze(ref, x)
    pk.mask(ref, g2, plan)
    with torch.no_grad():
        want = ref(x)
    pk.prune(m, g, plan)
    with torch.no_grad():
        got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_gqa_sdpa
def test_sdpa_enable_gqa_rule():
    torch.manual_seed(0)
    m, x = _GQA(style="sdpa").eval(), torch.randn(2, 5, 32)
    g = pk.analyze(m, x)
    kv, slots = _head_groups(g)
    assert len(kv) == 1 and kv[0].size == 2 and kv[0].prunable and kv[0].exact
    assert len(slots) == 1 and slots[0].size == 2 and slots[0].prunable and slots[0].exact
    _check_layout(kv[0], slots[0])
    _prune_vs_mask(m, x, g, {kv[0].id: [0], slots[0].id: [1]})
    assert m.q.out_features == 4 and m.k.out_features == 4 and m.o.in_features == 4


@needs_gqa_sdpa
def test_sdpa_enable_gqa_mqa():
    torch.manual_seed(0)
    m, x = _GQA(heads=4, kv=1, style="sdpa").eval(), torch.randn(2, 5, 32)
    g = pk.analyze(m, x)
    kv, slots = _head_groups(g)
    assert not kv and len(slots) == 1 and slots[0].size == 4 and slots[0].prunable
    _prune_vs_mask(m, x, g, {slots[0].id: [0, 2, 3]})
    assert m.q.out_features == 4 and m.k.out_features == 4


def test_repeat_kv_expand_follows_rep_attribute():
    torch.manual_seed(0)
    m, x = _GQA(heads=6, kv=2, style="eager").eval(), torch.randn(2, 5, 32)
    g = pk.analyze(m, x)
    kv, slots = _head_groups(g)
    assert kv[0].size == 2 and kv[0].prunable and slots[0].size == 3 and slots[0].prunable and slots[0].exact
    _check_layout(kv[0], slots[0], heads=6)
    _prune_vs_mask(m, x, g, {slots[0].id: [0, 2]})
    assert m.num_key_value_groups == 1 and m.q.out_features == 8


def test_expand_without_rep_attribute_stays_pinned():
    """A broadcast whose size no known attribute holds cannot follow pruning: never guessed."""
    torch.manual_seed(0)
    m, x = _GQA(heads=6, style="eager", rep_name="copies").eval(), torch.randn(2, 5, 32)
    g = pk.analyze(m, x)
    kv, slots = _head_groups(g)
    assert kv[0].prunable
    assert len(slots) == 1 and not slots[0].prunable and "broadcast dim of expand" in slots[0].reason
