"""Mixture-of-experts models of transformers 5.x (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) from small random
configs, with both experts implementations (the default ``grouped_mm``, which runs ``aten._grouped_mm``, and
``eager``, which loops over the hit experts with ``index_add_``): hidden width, expert FFN neurons and whole
experts are prunable, a random plan prunes and verifies, and removing an expert is the same as routing no
token to it (its router logit at -inf in the original).  Plus the routing op rules on plain torch models."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.plan.importance import get_criterion
from tests._deps import require_transformers
from tests.zoo._common import random_plan

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
IMPLS = ("grouped_mm", "eager")
E, TOP_K = 4, 2


def build(arch: str, impl: str, seed: int = 0) -> nn.Module:
    tf = require_transformers()
    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  num_experts_per_tok=TOP_K, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=96, num_local_experts=E)
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=48, num_experts=E,
                                shared_expert_intermediate_size=80, decoder_sparse_step=1)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=48, num_experts=E, head_dim=16)
    else:
        cfg = tf.OlmoeConfig(**common, intermediate_size=48, num_experts=E)
    model = tf.AutoModelForCausalLM.from_config(cfg, experts_implementation=impl).eval()
    assert model.config._experts_implementation == impl
    return model


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (2, 12), generator=g)}


_CACHE: dict = {}


def analysed(arch: str, impl: str):
    """(model, graph) analysed once per test session; tests prune copies (pk.surgery.pruned_copy)."""
    key = (arch, impl)
    if key not in _CACHE:
        m = build(arch, impl)
        _CACHE[key] = (m, pk.analyze(m, inputs()))
    return _CACHE[key]


def moe_blocks(model):
    return [layer.mlp for layer in model.model.layers]


def by_unit(graph, unit):
    return [g for g in graph.groups if g.unit == unit]


def ffn_groups(graph, block_name):
    """The expert FFN neuron group of one block (a channel group over its stacked expert weights)."""
    return [g for g in graph.groups if g.unit == "channel" and g.modules == [f"{block_name}.experts"]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_prunable_units(arch, impl):
    model, g = analysed(arch, impl)
    assert not g.unsupported_ops, g.unsupported_ops
    experts = by_unit(g, "expert")
    assert len(experts) == 2, g.summary()
    for k, grp in enumerate(experts):
        blk = f"model.layers.{k}.mlp"
        assert grp.prunable, grp.reason
        assert grp.size == E and grp.min_keep == TOP_K
        assert not grp.exact and any("routing" in r for r in grp.inexact_reasons)
        owned = {(m.fqn, m.dim) for m in grp.members}
        assert owned == {(f"{blk}.gate.weight", 0), (f"{blk}.experts.gate_up_proj", 0),
                         (f"{blk}.experts.down_proj", 0)}
        ffn = ffn_groups(g, blk)
        assert len(ffn) == 1 and ffn[0].prunable and ffn[0].exact, g.summary()
        inter = model.model.layers[k].mlp.experts.intermediate_dim
        assert ffn[0].size == inter  # one neuron group shared by every expert of the block
        # the kernel needs 16-byte strides: fp32 widths in multiples of 4 on the grouped_mm path
        assert ffn[0].multiple_of == (4 if impl == "grouped_mm" else 1)
    hidden = next(grp for grp in g.groups if "model.embed_tokens" in grp.modules and grp.size == 64)
    assert hidden.prunable, hidden.reason
    if arch == "qwen2_moe":
        shared = [grp for grp in g.groups if "model.layers.0.mlp.shared_expert.down_proj" in grp.modules
                  and grp.size == 80]
        assert shared and shared[0].prunable and shared[0].exact


@pytest.mark.parametrize("arch", ARCHS)
def test_both_experts_implementations_give_the_same_groups_and_macs(arch):
    _, ga = analysed(arch, "grouped_mm")
    _, gb = analysed(arch, "eager")
    def sig(g):
        return [(x.unit, x.size, x.prunable, x.exact, x.min_keep, sorted((m.fqn, m.dim) for m in x.members))
                for x in g.groups]
    assert sig(ga) == sig(gb)
    assert ga.macs() == gb.macs() > 0
    experts = [x.id for x in by_unit(ga, "expert")]
    # removing an expert saves only its router row (each token still runs top_k experts); neurons save more
    tokens = inputs()["input_ids"].numel()
    assert ga.macs() - ga.macs({i: 1 for i in experts}) == len(experts) * tokens * 64
    ffn = ffn_groups(ga, "model.layers.0.mlp")[0]
    assert ga.macs({ffn.id: 8}) < ga.macs()
    assert ga.macs({ffn.id: 8}) == gb.macs({ffn.id: 8})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_random_plan_prunes_and_verifies(arch, impl):
    model, g = analysed(arch, impl)
    plan = random_plan(g, seed=1, lo=0.25, hi=0.5)
    kinds = {g.group(i).unit for i in plan}
    assert "expert" in kinds and "channel" in kinds
    pruned = pk.surgery.pruned_copy(model, g, plan)  # verifies; raises on failure
    for k, blk in enumerate(moe_blocks(pruned)):
        n = blk.experts.gate_up_proj.shape[0]
        assert blk.gate.weight.shape[0] == blk.experts.down_proj.shape[0] == n
        assert blk.gate.num_experts == blk.experts.num_experts == n
        lost = len(plan.get(by_unit(g, "expert")[k].id, []))
        assert n == E - lost
        if impl == "grouped_mm":  # aligned for the kernel
            assert blk.experts.gate_up_proj.shape[2] % 4 == 0 and blk.experts.down_proj.shape[2] % 4 == 0
    out = pruned(**inputs(seed=5)).logits  # another input: the pruned model is usable, not only on the example
    assert out.shape == (2, 12, 128) and torch.isfinite(out).all()


def _router_minus_inf(model, drop: dict[int, list[int]]):
    """A context in which the routers of ``model``'s layers give -inf logits to the experts in ``drop``
    ({layer: [experts]}): those experts receive no token."""
    import contextlib
    import torch.nn.functional as F
    weights = {id(model.model.layers[k].mlp.gate.weight): idx for k, idx in drop.items()}
    orig = F.linear

    def linear(x, w, b=None):
        out = orig(x, w, b)
        idx = weights.get(id(w))
        if idx is not None:
            out = out.clone()
            out[..., idx] = float("-inf")
        return out

    @contextlib.contextmanager
    def ctx():
        F.linear = linear
        try:
            yield
        finally:
            F.linear = orig
    return ctx()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_removing_experts_equals_routing_no_token_to_them(arch, impl):
    model, g = analysed(arch, impl)
    experts = by_unit(g, "expert")
    drop = {0: [1], 1: [0, 3]}
    pruned = pk.surgery.pruned_copy(model, g, {experts[k].id: idx for k, idx in drop.items()})
    x = inputs(seed=3)
    with torch.no_grad():
        with _router_minus_inf(model, drop):
            ref = model(**x).logits
        got = pruned(**x).logits
        plain = model(**x).logits
    assert not torch.allclose(ref, plain, atol=1e-4), "the dropped experts were never used: the test proves nothing"
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert [b.experts.num_experts for b in moe_blocks(pruned)] == [3, 2]


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_neurons_are_exact(impl):
    model, g = analysed("mixtral", impl)
    plan = {ffn_groups(g, f"model.layers.{k}.mlp")[0].id: list(range(4 * k, 4 * k + 16)) for k in range(2)}
    pruned = pk.surgery.pruned_copy(model, g, plan, verify=False)
    masked = copy.deepcopy(model)
    pk.mask(masked, _graph_for(masked, g), plan)
    x = inputs(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x).logits, masked(**x).logits, rtol=1e-4, atol=1e-5)
    assert pruned.model.layers[0].mlp.experts.down_proj.shape == (E, 64, 96 - 16)


def _graph_for(model, g):
    """``g`` pointed at a structurally identical copy (pk.mask checks the graph's model)."""
    g2 = copy.copy(g)
    g2.model_ref, g2.stale = model, False
    return g2


def test_plans_below_top_k_or_unaligned_are_refused_and_the_model_is_untouched():
    model, g = analysed("mixtral", "grouped_mm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = by_unit(g, "expert")[0]
    with pytest.raises(pk.PruningError, match="at least 2"):
        pk.surgery.pruned_copy(model, g, {ex.id: [0, 1, 2]})
    ffn = ffn_groups(g, "model.layers.0.mlp")[0]
    with pytest.raises(pk.PruningError, match="multiple of 4"):
        pk.surgery.pruned_copy(model, g, {ffn.id: [0, 1, 2]})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_eager_path_accepts_unaligned_neurons():
    model, g = analysed("mixtral", "eager")
    ffn = ffn_groups(g, "model.layers.0.mlp")[0]
    pruned = pk.surgery.pruned_copy(model, g, {ffn.id: [0, 1, 2]})
    assert pruned.model.layers[0].mlp.experts.gate_up_proj.shape == (E, 2 * 93, 64)


def test_criteria_score_experts_and_the_pruner_removes_them():
    model, g = analysed("qwen2_moe", "grouped_mm")
    experts = by_unit(g, "expert")
    for name in ("l1", "l2", "fpgm"):
        scores = get_criterion(name).scores(model, g, experts)
        for grp in experts:
            s = scores[grp.id]
            assert s.shape == (E,) and torch.isfinite(s).all() and s.std() > 0
    m = copy.deepcopy(model)
    p = pk.Pruner(m, inputs(), "l2", target=pk.ParamsTarget(0.5), ratios={"*.mlp.experts": 0.5, "*.mlp.gate": 0.5})
    p.prune()
    for blk in moe_blocks(m):
        assert blk.experts.num_experts == blk.gate.num_experts == blk.experts.gate_up_proj.shape[0] == 2
        assert blk.experts.gate_up_proj.shape[2] % 4 == 0
    assert torch.isfinite(m(**inputs(seed=7)).logits).all()


def test_transformers_fallback_grouped_mm_op(monkeypatch):
    require_transformers()
    import transformers.integrations.moe as moe
    monkeypatch.setattr(moe, "_can_use_grouped_mm", lambda *a, **k: False)
    model = build("mixtral", "grouped_mm")
    g = pk.analyze(model, inputs())
    assert any(op.name.startswith("transformers.grouped_mm_fallback") for op in g.tape.ops)
    assert not g.unsupported_ops
    assert all(x.prunable for x in by_unit(g, "expert"))
    ffn = ffn_groups(g, "model.layers.0.mlp")[0]
    assert ffn.prunable and ffn.multiple_of == 1  # the fallback loops over torch.mm: no alignment
    _, ref = analysed("mixtral", "grouped_mm")
    assert g.macs() == ref.macs()
    pk.prune(model, g, random_plan(g, seed=2))


# ---------------------------------------------------------------- the rules on plain torch models
class ScatterAdd(nn.Module):
    """Rows of ``x @ w.T`` added back into a zero tensor at given positions (the eager expert loop's tail)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.inp(x)
        out = torch.zeros_like(x)
        idx = torch.tensor([0, 2, 3])
        out.index_add_(0, idx, self.down(torch.relu(self.up(x[idx]))))
        out = out + x
        return self.head(out)


def test_index_add_keeps_channels_prunable():
    m = ScatterAdd().eval()
    x = torch.randn(5, 16)
    g = pk.analyze(m, x)
    assert not g.unsupported_ops
    width = next(grp for grp in g.groups if "up" in grp.modules and grp.size == 16)  # x's width, through index_add_
    assert width.prunable and width.exact, width.reason
    ref_out = m(x)
    pk.prune(m, g, {width.id: [1, 5, 7]})
    assert m.up.in_features == 13 and m(x).shape == ref_out.shape


class GroupedMM(nn.Module):
    """``torch._grouped_mm`` over fixed groups of rows (not a registered MoE block: the groups stay pinned)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.w = nn.Parameter(torch.randn(3, 32, 20) * 0.1)
        self.out = nn.Linear(20, 4)

    def forward(self, x):
        offs = torch.tensor([2, 5, 6], dtype=torch.int32)
        return self.out(torch._grouped_mm(self.inp(x), self.w, offs=offs))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_mm_rule_on_a_plain_model():
    m = GroupedMM().eval()
    x = torch.randn(6, 8)
    g = pk.analyze(m, x)
    assert not g.unsupported_ops
    k = next(grp for grp in g.groups if "inp" in grp.modules and grp.size == 32)
    n = next(grp for grp in g.groups if "out" in grp.modules and grp.size == 20)
    groups = next(grp for grp in g.groups if grp.size == 3)
    assert k.prunable and k.exact and k.multiple_of == 4, (k, k.reason)
    assert n.prunable and n.exact and n.multiple_of == 4, (n, n.reason)  # a row-major weight: N aligned too
    assert not groups.prunable and "offs" in groups.reason
    assert g.macs() == 6 * 8 * 32 + 6 * 32 * 20 + 6 * 20 * 4
    rng = random.Random(0)
    pk.prune(m, g, {k.id: rng.sample(range(32), 8), n.id: rng.sample(range(20), 4)})
    assert m.w.shape == (3, 24, 16) and m.inp.out_features == 24


def test_bf16_model_analysed_on_meta():
    # a checkpoint's dtype, analysed without weight memory: the kernel's alignment is 8 bf16 values
    model = build("mixtral", "grouped_mm").to(torch.bfloat16)
    g = pk.analyze(model, inputs(), device="meta")
    assert g.tape.device == "meta" and g.validation_backend == "meta"
    assert [x.prunable for x in by_unit(g, "expert")] == [True, True]
    ffn = ffn_groups(g, "model.layers.0.mlp")[0]
    assert ffn.prunable and ffn.multiple_of == 8
    pk.prune(model, g, random_plan(g, seed=4))
    assert model.model.layers[0].mlp.experts.down_proj.shape[2] % 8 == 0
