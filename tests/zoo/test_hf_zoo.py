"""Hugging Face transformers zoo: every architecture of issue 13 built from a small config (2 layers, random
weights, no download), analysed with and without ``attention_mask``.

* which kinds of units are prunable is asserted per architecture (a test fails when kv heads, query heads,
  MLP neurons, hidden width or experts become pinned again), and is the same with and without the mask;
* a random 30% plan over every prunable group prunes and verifies;
* a uniform prune -> ``pk.hf.save_pretrained`` -> plain ``from_pretrained`` gives identical logits and
  ``generate()`` tokens; a per-layer prune -> ``pk.hf.from_pretrained`` gives identical logits.
"""
from __future__ import annotations

import random

import pytest
import torch

import prunekit as pk
from tests._deps import require_transformers

tf = require_transformers()

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2)


def _cfg(name: str):
    c = SMALL
    return {
        "llama": lambda: tf.LlamaConfig(**c),
        "mistral": lambda: tf.MistralConfig(**c, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**c),
        "qwen3": lambda: tf.Qwen3Config(**c, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**c, head_dim=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**c, head_dim=16, sliding_window=8),
        "phi3": lambda: tf.Phi3Config(**c, pad_token_id=0),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
        "bert": lambda: tf.BertConfig(**{k: v for k, v in c.items() if k != "num_key_value_heads"}),
        "t5": lambda: tf.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128),
        "mixtral": lambda: tf.MixtralConfig(**c, num_local_experts=4, **MOE),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**c, num_experts=4, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=64, **MOE),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**c, num_experts=4, moe_intermediate_size=32, head_dim=16, **MOE),
    }[name]()


def build(name: str, seed: int = 0):
    cfg = _cfg(name)
    torch.manual_seed(seed)
    if name == "bert":
        model = tf.BertForMaskedLM(cfg)
    elif name == "t5":
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def inputs(name: str, mask: bool, seq: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (1, seq), generator=g)
    x = {"input_ids": ids}
    if mask:
        x["attention_mask"] = torch.ones_like(ids)
    if name == "t5":
        x["decoder_input_ids"] = ids[:, :4].clone()
    return x


def kinds(graph) -> set[str]:
    """Kinds of prunable units, named by the modules they touch (independent of unit spellings)."""
    out = set()
    for g in graph.prunable_groups:
        mods = set(g.modules)
        leaf = {m.rsplit(".", 1)[-1] for m in mods}
        if any(m.endswith(("embed_tokens", "wte", "word_embeddings", "shared")) for m in mods):
            out.add("hidden")
        elif g.unit == "expert" or any(m.endswith(".gate") or m.endswith("router") for m in mods) and \
                any("experts" in m for m in mods):
            out.add("experts")
        elif g.unit == "head" and leaf & {"k_proj", "k", "key"}:
            out.add("kv_heads")
        elif g.unit in ("head", "query_head", "q_head") or (leaf & {"q_proj", "o_proj"} and "k_proj" not in leaf
                                                          and g.unit != "head_dim"):
            out.add("q_heads")
        elif leaf & {"down_proj", "fc2", "c_proj", "wo", "output", "dense_4h_to_h"} or "experts" in "".join(mods):
            out.add("mlp")
    return out


DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"]
EXPECT = {**{n: {"hidden", "kv_heads", "q_heads", "mlp"} for n in DECODERS},
          "bert": {"hidden", "q_heads", "mlp"}, "t5": {"hidden", "q_heads", "mlp"},
          "mixtral": {"hidden", "kv_heads", "q_heads", "mlp", "experts"},
          "qwen2_moe": {"hidden", "kv_heads", "q_heads", "mlp", "experts"},
          "qwen3_moe": {"hidden", "kv_heads", "q_heads", "mlp", "experts"}}


@pytest.mark.parametrize("name", list(EXPECT))
def test_prunable_units_with_and_without_attention_mask(name):
    model = build(name)
    found = {}
    for mask in (False, True):
        graph = pk.analyze(model, inputs(name, mask))
        found[mask] = kinds(graph)
        missing = EXPECT[name] - found[mask]
        assert not missing, (f"{name} ({'with' if mask else 'without'} attention_mask): {sorted(missing)} pinned;\n"
                             + graph.summary())
    assert found[False] == found[True]


@pytest.mark.parametrize("name", list(EXPECT))
def test_random_plan_prunes_and_verifies(name):
    model = build(name)
    x = inputs(name, True)
    graph = pk.analyze(model, x)
    rng = random.Random(13)
    plan = {g.id: sorted(rng.sample(range(g.size), max(1, round(0.3 * g.size)))) for g in graph.prunable_groups
            if g.size > 1}
    before = sum(p.numel() for p in model.parameters())
    pk.prune(model, graph, plan)  # verified; raises and rolls back on a mismatch
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        model(**x)


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2", "mixtral"])
def test_uniform_prune_reloads_with_plain_from_pretrained(name, tmp_path):
    model = build(name)
    x = inputs(name, True)
    pk.Pruner(model, x, criterion="l2", target=pk.ParamsTarget(0.7), uniform=True).prune()
    ref = _logits(model, x)
    pk.hf.save_pretrained(model, tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, x), ref, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(x["input_ids"], **kw), model.generate(x["input_ids"], **kw))


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_per_layer_prune_reloads_with_prunekit(name, tmp_path):
    model = build(name)
    x = inputs(name, True)
    graph = pk.analyze(model, x)
    rng = random.Random(5)
    plan = {g.id: sorted(rng.sample(range(g.size), rng.randint(1, g.size // 2))) for g in graph.prunable_groups
            if g.size > 2}
    pk.prune(model, graph, plan)
    ref = _logits(model, x)
    pk.hf.save_pretrained(model, tmp_path)
    loaded = pk.hf.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, x), ref, rtol=1e-5, atol=1e-5)
