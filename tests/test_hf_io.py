"""prunekit.hf: the config follows the pruned modules; pk.hf.save_pretrained / from_pretrained; uniform pruning.

Small random-weight configs only (2-3 layers, hidden 64, vocab 128); nothing is downloaded.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import prunekit as pk

tf = pytest.importorskip("transformers")
if not tf.utils.is_torch_available():  # transformers 5 disables its PyTorch models on torch < 2.6
    pytest.skip("this transformers cannot use this torch", allow_module_level=True)

BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig", "phi3": "Phi3Config"}


def build(arch: str, layers: int = 2, **over) -> nn.Module:
    kw = {**BASE, "num_hidden_layers": layers, **over}
    if arch in ("qwen3", "gemma2", "gemma3"):
        kw.setdefault("head_dim", 16)  # their defaults are 128/256
    if arch == "phi3":
        kw.update(pad_token_id=None, bos_token_id=1, eos_token_id=2)  # defaults point outside a 128 vocab
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(getattr(tf, CONFIGS[arch])(**kw)).eval()


IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))


def x():
    return {"input_ids": IDS}


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def tokens(m):
    with torch.no_grad():
        return m.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist()


def groups(g, unit, part):
    return [gr for gr in g.prunable_groups if gr.unit == unit and any(part in mm for mm in gr.modules)
            and "model.embed_tokens" not in gr.modules]


def hidden_group(g):
    return next(gr for gr in g.prunable_groups if "model.embed_tokens" in gr.modules)


def test_config_follows_the_modules_after_every_prune():
    m = build("llama")
    g = pk.analyze(m, x())
    plan = {gr.id: list(range(16)) for gr in groups(g, "channel", "mlp.down_proj")}
    plan.update({gr.id: [1] for gr in groups(g, "head", "self_attn.k_proj")})  # one kv head (+ its queries) per layer
    plan[hidden_group(g).id] = list(range(8))
    assert len(plan) == 5
    pk.prune(m, g, plan)
    c = m.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (56, 112, 2, 1, 16)
    assert pk.hf.sync_config(m).changed == {}  # the post-prune hook already did it
    # a second prune (on the re-analysed model) keeps following
    g2 = pk.analyze(m, x())
    pk.prune(m, g2, {gr.id: [0, 1, 2, 3, 4, 5, 6, 7] for gr in groups(g2, "channel", "mlp.down_proj")})
    assert m.config.intermediate_size == 104


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "gemma2", "phi3"])
def test_uniform_prune_save_pretrained_plain_reload(arch, tmp_path):
    m = build(arch)
    p = pk.Pruner(m, x(), "l2", pk.ParamsTarget(0.6), uniform=True, global_pruning=True, round_to=8)
    p.prune()
    sync = pk.hf.sync_config(m)
    assert sync.uniform and sync.values["intermediate_size"] < 128, sync
    assert sync.values["intermediate_size"] % 8 == 0
    ref, ref_tokens = logits(m), tokens(m)
    out = pk.hf.save_pretrained(m, tmp_path / "out")
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names and "prunekit.json" not in names
    m2 = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(m2) is type(m)
    assert m2.config.intermediate_size == m.config.intermediate_size
    assert m2.config.hidden_size == m.config.hidden_size
    torch.testing.assert_close(logits(m2), ref, rtol=1e-5, atol=1e-5)
    assert tokens(m2) == ref_tokens
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=0)  # saving left the user's model as it was


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_embed_scale_kept_through_plain_reload(arch, tmp_path):
    m = build(arch)
    assert m.config.tie_word_embeddings
    g = pk.analyze(m, x())
    pk.prune(m, g, {hidden_group(g).id: list(range(0, 16, 2))})  # hidden 64 -> 56
    scale = m.model.embed_tokens.embed_scale.item()
    assert m.config.hidden_size == 56 and scale == pytest.approx(8.0)  # the buffer keeps sqrt(64)
    ref = logits(m)
    pk.hf.save_pretrained(m, tmp_path / "out")
    assert m.model.embed_tokens.embed_scale.item() == scale  # folded only into the saved copy
    m2 = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert m2.model.embed_tokens.embed_scale.item() == pytest.approx(math.sqrt(56))
    torch.testing.assert_close(logits(m2), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(m), ref, rtol=0, atol=0)


def test_per_layer_widths_reload_with_pk_hf_from_pretrained(tmp_path):
    m = build("llama", layers=3)
    g = pk.analyze(m, x())
    mlps = sorted(groups(g, "channel", "mlp.down_proj"), key=lambda gr: gr.modules[0])
    plan = {gr.id: list(range(8 * (k + 1))) for k, gr in enumerate(mlps)}
    pk.prune(m, g, plan)
    sync = pk.hf.sync_config(m)
    assert sync.per_layer == {"intermediate_size": [120, 112, 104]}
    ref = logits(m)
    out = pk.hf.save_pretrained(m, tmp_path / "out")
    assert (out / "prunekit.json").is_file()
    with pytest.raises(Exception, match="mismatch|size"):  # plain transformers refuses, it does not mis-load
        tf.AutoModelForCausalLM.from_pretrained(out)
    m2 = pk.hf.from_pretrained(out)
    assert [lay.mlp.down_proj.in_features for lay in m2.model.layers] == [120, 112, 104]
    torch.testing.assert_close(logits(m2), ref, rtol=0, atol=0)
    # prune the reloaded model further: the record keeps growing from the same original config
    g2 = pk.analyze(m2, x())
    pk.prune(m2, g2, {hidden_group(g2).id: [0, 1, 2, 3]})
    ref2 = logits(m2)
    m3 = pk.hf.from_pretrained(pk.hf.save_pretrained(m2, tmp_path / "out2"))
    assert m3.config.hidden_size == 60
    torch.testing.assert_close(logits(m3), ref2, rtol=0, atol=0)


def test_odd_hidden_width(tmp_path):
    # Llama's config rejects hidden 61 with 4 heads ("not a multiple"): the record path loads it
    m = build("llama")
    g = pk.analyze(m, x())
    pk.prune(m, g, {hidden_group(g).id: [5, 17, 40]})
    assert m.config.hidden_size == 61 and m.config.head_dim == 16
    ref = logits(m)
    out = pk.hf.save_pretrained(m, tmp_path / "llama")
    assert (out / "prunekit.json").is_file()
    assert "rejects" in " ".join(json.loads((out / "prunekit.json").read_text())["why"])
    torch.testing.assert_close(logits(pk.hf.from_pretrained(out)), ref, rtol=0, atol=0)
    # Qwen2's config accepts it once head_dim is explicit (61 // 4 would be 15): plain transformers loads it
    q = build("qwen2")
    g = pk.analyze(q, x())
    pk.prune(q, g, {hidden_group(g).id: [5, 17, 40]})
    assert q.config.hidden_size == 61 and q.config.head_dim == 16
    ref = logits(q)
    out = pk.hf.save_pretrained(q, tmp_path / "qwen2")
    assert not (out / "prunekit.json").exists()
    torch.testing.assert_close(logits(tf.AutoModelForCausalLM.from_pretrained(out)), ref, rtol=0, atol=0)


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        pk.hf.save_pretrained(nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        pk.hf.sync_config(nn.Linear(2, 2))
    m = build("llama")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(pk.hf.HFSaveError, match="not empty.*overwrite=True"):
        pk.hf.save_pretrained(m, busy)
    assert pk.hf.save_pretrained(m, busy, overwrite=True) == busy
    with pytest.raises(pk.hf.HFSaveError, match="no config.json"):
        pk.hf.from_pretrained(tmp_path / "missing")
    # a per-layer directory, then broken in three ways
    g = pk.analyze(m, x())
    pk.prune(m, g, {hidden_group(g).id: [1, 2, 3]})
    out = pk.hf.save_pretrained(m, tmp_path / "rec")
    rec = (out / "prunekit.json").read_text()
    (out / "prunekit.json").write_text(rec[: len(rec) // 2])
    with pytest.raises(pk.hf.HFSaveError, match="prunekit.json is not a prunekit record"):
        pk.hf.from_pretrained(out)
    (out / "prunekit.json").write_text(rec)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(pk.PruningError, match="different model or config"):
        pk.hf.from_pretrained(out)
    (out / "config.json").write_text(json.dumps(cfg))
    w = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(w[: len(w) // 2])
    with pytest.raises(pk.hf.HFSaveError, match="corrupt"):
        pk.hf.from_pretrained(out)


def test_uniform_global_flops_target_gives_every_block_the_same_widths():
    m = build("qwen2", layers=3)
    p = pk.Pruner(m, x(), "l2", pk.FlopsTarget(0.5), uniform=True, global_pruning=True, round_to=8)
    p.prune()
    widths = {(lay.mlp.down_proj.in_features, lay.self_attn.k_proj.out_features, lay.self_attn.q_proj.out_features)
              for lay in m.model.layers}
    assert len(widths) == 1 and next(iter(widths))[0] % 8 == 0
    assert p.graph.macs() <= 0.5 * p.base_macs
    assert pk.hf.sync_config(m).uniform


def test_round_to_applies_to_heads_and_summary_reports_heads_apart():
    # kv heads of 16 x 2 query heads: with round_to=32 a kv head alone (16 wide in k_proj) cannot go
    m = build("llama")
    p = pk.Pruner(m, x(), "l2", pk.ChannelRatio(0.5), round_to=32)
    p.prune()
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            assert mod.in_features % 32 == 0 and mod.out_features % 32 == 0, (name, mod)
    m = build("llama")
    p = pk.Pruner(m, x(), "l2", pk.ChannelRatio(0.5), round_to=8)
    plan = p.plan()
    before = p.summary(plan)
    p.prune()
    s = p.summary()
    kv = sum(lay.self_attn.k_proj.out_features // 16 for lay in m.model.layers)
    assert s["heads"] == pytest.approx(kv / 4) and s["heads"] < 1
    mlp = sum(lay.mlp.down_proj.in_features for lay in m.model.layers)
    chans = (mlp + m.config.hidden_size) / (2 * 128 + 64)
    assert s["channels"] == pytest.approx(chans) and s["channels"] < 1
    assert before["heads"] == s["heads"] and before["channels"] == s["channels"]
    assert s["params"] == pytest.approx(p.graph.params_kept({}) / p.base_params)


def test_cli_params_target_uniform_save_pretrained(tmp_path, capsys):
    from prunekit.cli import main
    cfg = tf.LlamaConfig(**BASE, num_hidden_layers=2, architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(tmp_path / "cfg")
    out = tmp_path / "out"
    rc = main(["prune", f"hf:{tmp_path / 'cfg'}", "--params-target", "0.6", "--uniform", "--round-to", "8",
               "--save-pretrained", str(out), "--json", "-q"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    hf = report["hf"]
    assert hf["plain_from_pretrained"] is True and hf["per_layer"] == {}
    assert hf["config"]["intermediate_size"] < 128 and "intermediate_size" in hf["changed"]
    assert report["after"]["params"] <= 0.6 * report["before"]["params"]
    assert set(report["kept_units"]) >= {"heads", "channels"}
    m2 = tf.AutoModelForCausalLM.from_pretrained(out)
    assert m2.config.intermediate_size == hf["config"]["intermediate_size"]
    assert m2.config.hidden_size == hf["config"]["hidden_size"]
    # the text report lists the new config values
    rc = main(["prune", f"hf:{tmp_path / 'cfg'}", "--params-target", "0.6", "--uniform", "--round-to", "8",
               "-q"])
    text = capsys.readouterr().out
    assert rc == 0 and f"intermediate_size {hf['config']['intermediate_size']} (was 128)" in text
    assert "Kept: heads" in text


@pytest.mark.parametrize("arch,big,small", [
    ("MixtralConfig", dict(num_local_experts=4, intermediate_size=128),
     dict(num_local_experts=3, intermediate_size=96)),
    ("Qwen2MoeConfig", dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48),
     dict(num_experts=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)),
])
def test_sync_config_reads_moe_widths_from_the_modules(arch, big, small):
    # modules of the smaller MoE under the bigger one's config: every value comes from the module shapes
    kw = dict(BASE, num_hidden_layers=2, num_experts_per_tok=2)
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(getattr(tf, arch)(**{**kw, **small}))
    m.config = getattr(tf, arch)(**{**kw, **big})
    sync = pk.hf.sync_config(m)
    assert {k: getattr(m.config, k) for k in small} == small
    assert set(sync.changed) == set(small) and sync.uniform
