"""Hugging Face transformers zoo: every architecture of issue 13 built from a small config (2 layers, random
weights, no download), analysed with and without ``attention_mask``.

* which kinds of units are prunable is asserted per architecture (a test fails when kv heads, query heads,
  MLP neurons, hidden width or experts become pinned again), and is the same with and without the mask;
* a random 30% plan over every prunable group prunes and verifies;
* a uniform prune -> ``pk.hf.save_pretrained`` -> plain ``from_pretrained`` gives identical logits and
  ``generate()`` tokens; a per-layer prune -> ``pk.hf.from_pretrained`` gives identical logits.
"""
from __future__ import annotations

import pytest
import torch

import prunekit as pk
from tests._deps import require_transformers
from tests.zoo._common import random_plan

tf = require_transformers()

# 8 query heads over 2 kv heads: kv-head groups (2 units) and query-slot groups (4 units) differ in size
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
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
        "phi3": lambda: tf.Phi3Config(**c, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0),
        "bert": lambda: tf.BertConfig(**{**{k: v for k, v in c.items() if k != "num_key_value_heads"},
                                         "num_attention_heads": 4}),
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


def _heads(cfg) -> tuple[int, int]:
    n = next(getattr(cfg, k) for k in ("num_attention_heads", "n_head", "num_heads") if getattr(cfg, k, None))
    return n, getattr(cfg, "num_key_value_heads", None) or n


def kinds(graph, cfg) -> set[str]:
    """Kinds of prunable units, named by the modules they touch and their sizes (not by unit spellings):
    ``hidden`` (touches the token embedding), ``experts``, attention ``heads`` (multi-head attention) or
    ``kv_heads`` / ``q_heads`` (query slots within kv groups) for grouped-query attention, and ``mlp``."""
    n_heads, n_kv = _heads(cfg)
    out = set()
    for g in graph.prunable_groups:
        mods = set(g.modules)
        if any(m.endswith(("embed_tokens", "wte", "word_embeddings", "shared")) for m in mods):
            out.add("hidden")
        elif g.unit == "expert":
            out.add("experts")
        elif g.unit == "head":
            if n_kv == n_heads and g.size == n_heads:
                out.add("heads")
            elif g.size == n_kv:
                out.add("kv_heads")
            elif g.size == n_heads // n_kv:
                out.add("q_heads")
        elif g.unit == "channel" and any(k in m for m in mods for k in ("mlp", "intermediate", "DenseReluDense",
                                                                         "experts", "shared_expert")):
            out.add("mlp")
    return out


GQA = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
EXPECT = {**{n: {"hidden", "kv_heads", "q_heads", "mlp"} for n in GQA},
          **{n: {"hidden", "heads", "mlp"} for n in ("gpt2", "bert", "t5")},
          **{n: {"hidden", "kv_heads", "q_heads", "mlp", "experts"} for n in ("mixtral", "qwen2_moe", "qwen3_moe")}}


@pytest.mark.parametrize("name", list(EXPECT))
def test_prunable_units_with_and_without_attention_mask(name):
    model = build(name)
    found = {}
    for mask in (False, True):
        graph = pk.analyze(model, inputs(name, mask))
        found[mask] = kinds(graph, model.config)
        missing = EXPECT[name] - found[mask]
        assert not missing, (f"{name} ({'with' if mask else 'without'} attention_mask): {sorted(missing)} pinned;\n"
                             + graph.summary())
    assert found[False] == found[True]


@pytest.mark.parametrize("name", list(EXPECT))
def test_random_plan_prunes_and_verifies(name):
    model = build(name)
    x = inputs(name, True)
    graph = pk.analyze(model, x)
    plan = random_plan(graph, seed=13, lo=0.3, hi=0.3)  # keeps kernel alignment (grouped_mm) and router top-k
    before = sum(p.numel() for p in model.parameters())
    pk.prune(model, graph, plan)  # verified; raises and rolls back on a mismatch
    assert sum(p.numel() for p in model.parameters()) < before
    with torch.no_grad():
        model(**x)


def _logits(model, x):
    with torch.no_grad():
        return model(**x).logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe"])
def test_uniform_prune_reloads_with_plain_from_pretrained(name, tmp_path):
    model = build(name)
    x = inputs(name, True)
    # round_to=8: widths GPU kernels like, and a hidden width the configs accept (a multiple of the head count)
    pk.Pruner(model, x, criterion="l2", target=pk.ParamsTarget(0.7), uniform=True, round_to=8).prune()
    ref = _logits(model, x)
    pk.hf.save_pretrained(model, tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, x), ref, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(x["input_ids"], **kw), model.generate(x["input_ids"], **kw))


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "mixtral", "qwen2_moe"])
def test_per_layer_prune_reloads_with_prunekit(name, tmp_path):
    """Different widths per layer (and stacked MoE expert tensors, which transformers' save converts to a
    checkpoint layout unless told not to) reload through the record."""
    model = build(name)
    x = inputs(name, True)
    graph = pk.analyze(model, x)
    pk.prune(model, graph, random_plan(graph, seed=5, lo=0.1, hi=0.5))
    ref = _logits(model, x)
    pk.hf.save_pretrained(model, tmp_path)
    loaded = pk.hf.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, x), ref, rtol=1e-5, atol=1e-5)


def test_gpt2_widths_its_config_cannot_express_reload_with_prunekit(tmp_path, caplog):
    """GPT-2's config has no head_dim: its attention width is n_embd, so hidden and heads pruned apart are not
    config-expressible.  save_pretrained says so (and writes the record); pk.hf.from_pretrained reloads it."""
    model = build("gpt2")
    x = inputs("gpt2", True)
    pk.Pruner(model, x, criterion="l2", target=pk.ParamsTarget(0.7), uniform=True, round_to=8).prune()
    ref = _logits(model, x)
    assert model.transformer.h[0].attn.c_attn.nf // 3 != model.config.n_embd
    with caplog.at_level("WARNING"):
        pk.hf.save_pretrained(model, tmp_path)
    assert (tmp_path / "prunekit.json").is_file() and "from_pretrained" in caplog.text
    with pytest.raises(Exception):  # plain transformers refuses (size mismatch) instead of loading garbage
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(pk.hf.from_pretrained(tmp_path).eval(), x), ref, rtol=1e-5, atol=1e-5)
