"""LLM calibration criteria (activation / wanda_sp / flap / taylor on token batches) and FLAP bias compensation.

Every score is compared with a direct computation from activations the test records itself (forward hooks that
keep the whole inputs, padding removed by hand); tiny random Llama configs, no download.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import prunekit as pk
from prunekit.algorithms.compensation import bias_compensation
from prunekit.plan.importance import collect_input_stats, get_criterion
from prunekit.surgery import PruningError, replay_record
from tests._deps import require_transformers

warnings.filterwarnings("ignore", message=".*attention_mask.*")

V, S = 96, 8


def llama(layers=2, seed=0, **kw):
    tf = require_transformers()
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=V, attn_implementation="eager")
    cfg.update(kw)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()


def token_data(n_batches=3, seed=1):
    """Batches of 2 sequences; the second is right-padded after 5 tokens (pad ids are random garbage)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, V, (2, S), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.tensor([[1] * S, [1] * 5 + [0] * (S - 5)])})
    return out


def example():
    return {"input_ids": torch.arange(S).reshape(1, S) % V}


def record_inputs(model, names, data):
    """{module name: all non-padding input rows [tokens, channels]} -- the direct computation's activations."""
    acts = {n: [] for n in names}
    cur = {}

    def hook(name, mod, args):
        x = args[0]
        acts[name].append(x[cur["mask"] != 0].reshape(-1, x.shape[-1]).double())

    hs = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(n, m, a)) for n in names]
    with torch.no_grad():
        for b in data:
            cur["mask"] = b["attention_mask"]
            model(**b)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in acts.items()}


def groups_by_kind(graph):
    mlp = [g for g in graph.prunable_groups if g.unit == "channel" and any("down_proj" in m for m in g.modules)
           and not any("norm" in m for m in g.modules)]
    kv = [g for g in graph.prunable_groups if g.unit == "head" and
          any(m.fqn.endswith("k_proj.weight") for m in g.members)]
    hidden = [g for g in graph.prunable_groups if any(m.fqn == "model.norm.weight" for m in g.members)]
    return mlp, kv, hidden


def consumers(model, g):
    """(module name, member, weight) of the members that are a Linear's input channels."""
    out = []
    for m in g.members:
        name = m.fqn.rpartition(".")[0]
        mod = model.get_submodule(name)
        if isinstance(mod, torch.nn.Linear) and m.fqn.endswith(".weight") and m.dim == 1:
            out.append((name, m, mod.weight.detach().double()))
    return out


def per_unit(m, vec):
    """Sum a per-input-channel vector over each unit's channels, via the member's factor layout."""
    units = torch.arange(m.sizes[m.pos])
    return torch.stack([vec[m.indices(torch.tensor([u]))].sum() for u in units])


def direct(model, graph, data, name):
    """Scores by hand for every group (before flap's standardisation)."""
    groups = list(graph.prunable_groups)
    names = sorted({n for g in groups for n, _m, _w in consumers(model, g)})
    X = record_inputs(model, names, data)
    out = {}
    for g in groups:
        vecs = []
        for n, m, w in consumers(model, g):
            x = X[n]
            if name == "activation":
                vecs.append(per_unit(m, x.pow(2).mean(0)).sqrt())
            elif name == "wanda_sp":
                vecs.append(per_unit(m, w.abs().sum(0) * x.pow(2).sum(0).sqrt()))
            else:  # flap
                vecs.append(per_unit(m, x.var(0, unbiased=False) * w.pow(2).sum(0)))
        st = torch.stack(vecs)
        out[g.id] = st.mean(0) if name == "activation" else st.sum(0)
    return out


# ---------------------------------------------------------------------------- scores = direct computation
@pytest.mark.parametrize("name", ["activation", "wanda_sp", "flap"])
def test_scores_equal_a_direct_computation(name):
    model = llama()
    graph = pk.analyze(model, example())
    mlp, kv, hidden = groups_by_kind(graph)
    assert len(mlp) == 2 and len(kv) == 2 and len(hidden) == 1  # MLP neurons, kv heads, hidden width all scored
    data = token_data()
    got = get_criterion(name).scores(model, graph, data=data)
    want = direct(model, graph, data, name)
    if name == "flap":  # standardised per kind: one mean/std over the same structure of every layer
        from prunekit.plan.importance.calibration import group_kind
        kinds = {}
        for g in graph.prunable_groups:  # incl. the query slots within kv groups
            kinds.setdefault(group_kind(model, g), []).append(g)
        for ours in (mlp, kv, hidden):  # the kinds named by hand are each exactly one kind of the criterion
            assert sorted(g.id for g in ours) == sorted(g.id for g in kinds[group_kind(model, ours[0])])
        for kind in kinds.values():
            allv = torch.cat([want[g.id] for g in kind])
            for g in kind:
                want[g.id] = (want[g.id] - allv.mean()) / allv.std(unbiased=False)
    assert set(got) == set(want)
    for gid in want:
        torch.testing.assert_close(got[gid].double(), want[gid], rtol=1e-4, atol=1e-5)
    if name == "flap":  # kinds are standardised together, not each group alone
        assert abs(float(got[mlp[0].id].mean())) > 1e-3


def test_activation_mean_abs_and_head_units():
    model = llama(layers=1)
    graph = pk.analyze(model, example())
    _mlp, (kv,), _h = groups_by_kind(graph)
    data = token_data(2)
    got = get_criterion("activation", agg="mean_abs").scores(model, graph, [kv], data=data)[kv.id]
    x = record_inputs(model, ["model.layers.0.self_attn.o_proj"], data)["model.layers.0.self_attn.o_proj"]
    hd = 32 // 4  # a kv head owns its 2 query heads' head_dim channels of o_proj's input
    want = torch.stack([x[:, k * 2 * hd:(k + 1) * 2 * hd].abs().mean(0).sum() for k in range(2)])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["activation", "wanda_sp", "flap", "taylor"])
def test_padding_tokens_are_excluded(name):
    """A right-padded batch scores exactly like the same sequences without their padding."""
    model = llama(layers=1)
    graph = pk.analyze(model, example())
    padded = token_data(1)
    ids, mask = padded[0]["input_ids"], padded[0]["attention_mask"]
    unpadded = [{"input_ids": ids[:1], "attention_mask": mask[:1]},
                {"input_ids": ids[1:, :5], "attention_mask": mask[1:, :5]}]
    a = get_criterion(name).scores(model, graph, data=padded)
    garbage = [{"input_ids": ids.masked_fill(mask == 0, 3), "attention_mask": mask}]  # other pad ids: same scores
    c = get_criterion(name).scores(model, graph, data=garbage)
    if name != "taylor":  # statistics are sums over tokens: two batches == one padded batch
        b = get_criterion(name).scores(model, graph, data=unpadded)
        for gid in a:
            torch.testing.assert_close(a[gid], b[gid], rtol=1e-4, atol=1e-6)
    for gid in a:
        torch.testing.assert_close(a[gid], c[gid], rtol=1e-4, atol=1e-6)
    if name != "taylor":  # counting the padding would change them
        nomask = [{"input_ids": ids}]
        d = get_criterion(name).scores(model, graph, data=nomask)
        assert any(not torch.allclose(a[g], d[g], rtol=1e-4, atol=1e-6) for g in a)


def test_statistics_memory_is_bounded():
    model = llama(layers=1)
    graph = pk.analyze(model, example())
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    few = collect_input_stats(model, names, token_data(2))
    many = collect_input_stats(model, names, token_data(9))
    assert few.batches == 2 and many.batches == 9
    assert few.nbytes() == many.nbytes() > 0  # statistics only: no activation is kept
    assert many["model.layers.0.mlp.down_proj"].n == 9 * (S + 5)  # non-padding tokens
    crit = get_criterion("flap")
    crit.scores(model, graph, data=token_data(9))
    assert crit.last_stats.nbytes() == 4 * 8 * sum(s.channels for s in crit.last_stats.values())  # 4 float64 sums
    # running variance merged over batches equals the variance of all tokens
    x = record_inputs(model, names[:1], token_data(9))[names[0]]
    torch.testing.assert_close(many[names[0]].var, x.var(0, unbiased=False))
    torch.testing.assert_close(many[names[0]].mean, x.mean(0))


def test_taylor_on_token_batches_uses_the_causal_lm_loss():
    model = llama(layers=1)
    graph = pk.analyze(model, example())
    mlp, kv, hidden = groups_by_kind(graph)
    data = token_data(1)
    got = get_criterion("taylor").scores(model, graph, data=data)
    m = copy.deepcopy(model)
    b = data[0]
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    for g in mlp + kv + hidden:
        vecs = []
        for mem in g.members:
            p = m.get_parameter(mem.fqn)
            wg = (p * p.grad).detach()
            vecs.append(torch.stack([wg.index_select(mem.dim, mem.indices(torch.tensor([u]))).sum()
                                     for u in range(g.size)]).abs())
        torch.testing.assert_close(got[g.id], torch.stack(vecs).mean(0), rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------------------- bias compensation
def _plan(graph, mlp, kv):
    return {mlp[0].id: [0, 3, 7, 8, 20], mlp[-1].id: [1, 2, 40], kv[0].id: [1]}


def test_bias_compensation_equals_mean_replacement():
    """Compensated pruned model == the original with the removed channels of each closing layer's input replaced
    by their calibration mean (so on an input at the mean, each pruned layer gives the unpruned output)."""
    model = llama()
    ref = copy.deepcopy(model)
    graph = pk.analyze(model, example())
    mlp, kv, _hidden = groups_by_kind(graph)
    data = token_data()
    plan = _plan(graph, mlp, kv)
    names = sorted(["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"])
    stats = collect_input_stats(model, names, data)
    removed = {}
    for gid in plan:
        for fqn, dim, idx in graph.group(gid).slices(plan[gid]):
            if fqn.endswith(("down_proj.weight", "o_proj.weight")) and dim == 1:
                removed[fqn.rpartition(".")[0]] = idx
    assert sorted(removed) == names
    originals = {n: copy.deepcopy(model.get_submodule(n)) for n in names}
    comp = bias_compensation(model, graph, plan, stats)
    assert sorted(comp.compensated) == names
    pk.prune(model, graph, plan, biases=comp.biases, config=comp.config)
    # per layer: pruned layer on the kept part of the mean input == unpruned layer on the mean input
    for n in names:
        mean = stats[n].mean.float()
        keep = torch.ones(mean.numel(), dtype=torch.bool)
        keep[removed[n]] = False
        with torch.no_grad():
            want = originals[n](mean)
            got = model.get_submodule(n)(mean[keep])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            uncomp = F.linear(mean[keep], model.get_submodule(n).weight)  # the bias does the work
            assert (uncomp - want).abs().max() > 100 * (got - want).abs().max()
    # whole model: the original with removed inputs replaced by their means
    hs = []
    for n in names:
        idx, mean = removed[n], stats[n].mean.float()

        def pre(mod, args, idx=idx, mean=mean):
            x = args[0].clone()
            x[..., idx] = mean[idx]
            return (x,)
        hs.append(ref.get_submodule(n).register_forward_pre_hook(pre))
    b = data[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, ref(**b).logits, rtol=1e-4, atol=1e-5)
    for h in hs:
        h.remove()
    # transformers: the flags that give a rebuilt model these biases are set
    assert model.config.mlp_bias is True and model.config.attention_bias is True
    for layer in model.model.layers:
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.self_attn.q_proj, layer.self_attn.v_proj):
            assert lin.bias is not None and lin.bias.shape == (lin.weight.shape[0],)


def test_bias_compensated_model_rebuilds_from_config_and_record():
    tf = require_transformers()
    model = llama()
    graph = pk.analyze(model, example())
    mlp, _kv, _hidden = groups_by_kind(graph)
    plan = {g.id: [0, 5, 9] for g in mlp}  # the same width in every layer: expressible in one config
    stats = collect_input_stats(model, ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], token_data())
    comp = bias_compensation(model, graph, plan, stats)
    pk.prune(model, graph, plan, biases=comp.biases, config=comp.config)
    b = token_data(1)[0]
    with torch.no_grad():
        want = model(**b).logits
    cfg = copy.deepcopy(model.config)
    cfg.intermediate_size = 45  # (config sync of widths is pk.hf's job; the bias flag is ours)
    rebuilt = tf.LlamaForCausalLM(cfg).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    # the pruning record rebuilds the new biases on a fresh original model (pk.load's path)
    fresh = llama(seed=5)
    replay_record(fresh, model._prunekit_record)
    assert fresh.config.mlp_bias is True
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**b).logits, want)
        torch.testing.assert_close(fresh(**b).logits, want)


def test_bias_compensation_skips_normalised_widths_and_bad_biases_roll_back():
    model = llama(layers=1)
    graph = pk.analyze(model, example())
    _mlp, _kv, (hidden,) = groups_by_kind(graph)
    stats = collect_input_stats(model, ["model.layers.0.self_attn.q_proj"], token_data(1))
    comp = bias_compensation(model, graph, {hidden.id: [0, 1]}, stats)
    assert not comp.compensated and "model.layers.0.self_attn.q_proj" in comp.skipped  # under RMSNorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="bias compensation"):
        pk.prune(model, graph, {hidden.id: [0, 1]}, biases={"model.layers.0.mlp.down_proj": torch.zeros(3)})
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert model.model.layers[0].mlp.down_proj.bias is None and model.config.mlp_bias is False


# ---------------------------------------------------------------------------- Pruner
@pytest.mark.parametrize("name", ["activation", "wanda_sp", "flap", "taylor"])
@pytest.mark.parametrize("bc", [False, True])
def test_pruner_on_llama(name, bc):
    model = llama()
    ref = copy.deepcopy(model)
    data = token_data()
    p = pk.Pruner(model, example(), name, pk.ParamsTarget(0.7), data=data, global_pruning=True,
                  bias_compensation=bc)
    kinds = groups_by_kind(p.graph)
    assert all(kinds)
    p.prune()
    # the target is met by the plan; biases created by compensation (and their zero siblings) come on top
    added = sum(model._prunekit_record[-1].get("biases", {}).get("modules", {}).values())  # all new in Llama
    assert p.graph.params_kept({}) - added <= 0.7 * p.base_params * 1.01
    b = data[0]
    with torch.no_grad():
        out = model(**b).logits
    assert out.shape == ref(**b).logits.shape and torch.isfinite(out).all()
    assert model.model.norm.weight.numel() < 32  # hidden width pruned
    assert sum(layer.mlp.down_proj.in_features for layer in model.model.layers) < 96
    h = p.history[-1]
    if bc:
        assert h["bias_compensated"] and all(n.endswith(("down_proj", "o_proj")) for n in h["bias_compensated"])
        assert any(l.mlp.down_proj.bias is not None for l in model.model.layers)
        assert not h["bias_unsaveable"]
    else:
        assert "bias_compensated" not in h and model.model.layers[0].mlp.down_proj.bias is None


def test_flap_global_ranking_gives_adaptive_widths():
    """A layer whose MLP activations fluctuate more keeps more neurons under flap's one global ranking; the
    per-group rescaling used for other criteria would even the widths out."""
    model = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(6.0)
    data = token_data()
    flap = pk.Pruner(copy.deepcopy(model), example(), "flap", pk.ParamsTarget(0.6), data=data, global_pruning=True)
    flap.prune()
    w = [layer.mlp.down_proj.in_features for layer in flap.model.model.layers]
    assert w[1] > w[0], w
    # one global threshold on the standardised scores: every removed unit scores below every kept one (groups
    # not held at their one-unit minimum)
    p = pk.Pruner(copy.deepcopy(model), example(), "flap", pk.ParamsTarget(0.6), data=data, global_pruning=True)
    scores, plan = p.scores(), p.plan()
    removed = torch.cat([scores[g][plan[g]] for g in plan])
    kept = torch.cat([scores[g][[u for u in range(len(scores[g])) if u not in plan.get(g, [])]] for g in scores
                      if len(scores[g]) - len(plan.get(g, [])) > 1])
    assert removed.numel() and removed.max() <= kept.min()
    local = pk.Pruner(copy.deepcopy(model), example(), "flap", pk.ParamsTarget(0.6), data=data)
    local.prune()
    wl = [layer.mlp.down_proj.in_features for layer in local.model.model.layers]
    assert wl[0] == wl[1] and wl != w


def test_calibration_criteria_need_data():
    model = llama(layers=1)
    graph = pk.analyze(model, example())
    for name in ("activation", "wanda_sp", "flap"):
        with pytest.raises(ValueError, match=f"criterion '{name}' needs data=... calibration batches"):
            get_criterion(name).scores(model, graph)
        with pytest.raises(ValueError, match="needs data"):
            pk.Pruner(model, example(), name, 0.5)
    with pytest.raises(ValueError, match="bias_compensation=True needs calibration data"):
        pk.Pruner(model, example(), "l2", 0.5, bias_compensation=True)
    assert get_criterion("minitron").name == "activation" and get_criterion("wanda").name == "wanda_sp"
