"""pk.DepthPruner: candidate blocks, block-influence / perplexity scores, removal with config and cache
indices following, save/load replay, rollback, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.algorithms.depth import find_blocks
from prunekit.surgery import slice_state_dict


class Block(nn.Module):
    def __init__(self, d, scale=1.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.scale = scale

    def forward(self, x):
        return x + self.scale * self.fc2(F.gelu(self.fc1(x)))


class Tower(nn.Module):
    """stem -> 5 residual blocks (the 2nd nearly an identity) -> head; a Down block changes the width."""

    def __init__(self, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(8, d)
        self.blocks = nn.ModuleList([Block(d, s) for s in (1.0, 0.01, 1.0, 0.5, 1.0)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def _x(n=6, seed=0):
    return torch.randn(n, 5, 8, generator=torch.Generator().manual_seed(seed))


def test_candidates_are_shape_preserving_repeated_blocks():
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())

        def forward(self, x):
            return self.body(x)
    m = Stage()
    found = find_blocks(m, torch.randn(1, 3, 8, 8))
    assert found == [("body", 1), ("body", 2)]  # conv 3->8 changes the shape; ReLU has no parameters
    assert find_blocks(Tower(), _x()) == [("blocks", i) for i in range(5)]


def test_block_influence_equals_a_direct_computation():
    m = Tower().eval()
    data = [_x(seed=1), _x(seed=2)]
    scores = pk.DepthPruner(m, data[0], data=data, n_blocks=1, progress=False).scores()
    for i, blk in enumerate(m.blocks):
        num, cnt = 0.0, 0
        for x in data:
            h = m.stem(x)
            for b in m.blocks[:i]:
                h = b(h)
            with torch.no_grad():
                cos = F.cosine_similarity(h, blk(h), dim=-1)
            num += float((1 - cos).sum())
            cnt += cos.numel()
        assert scores[f"blocks.{i}"] == pytest.approx(num / cnt, rel=1e-5)
    assert min(scores, key=scores.get) == "blocks.1"  # the near-identity block


def test_block_influence_skips_padding_tokens():
    tf = pytest.importorskip("transformers")
    from tests._deps import require_transformers
    require_transformers()
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 6))
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pad = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 3 + [0] * 3])}
    s_full = pk.DepthPruner(m, full, data=[full], n_blocks=1, progress=False).scores()
    s_pad = pk.DepthPruner(m, pad, data=[pad], n_blocks=1, progress=False).scores()
    assert s_full != s_pad


def test_perplexity_criterion_is_the_loss_increase():
    m = Tower().eval()
    x, y = _x(seed=3), torch.randn(6, 5, 4)
    loss = lambda model, batch: F.mse_loss(model(batch), y)  # noqa: E731
    scores = pk.DepthPruner(m, x, data=[x], n_blocks=1, criterion="perplexity", loss_fn=loss,
                            progress=False).scores()
    with torch.no_grad():
        base = float(loss(m, x))
        for i in range(5):
            ref = copy.deepcopy(m)
            del ref.blocks[i]
            assert scores[f"blocks.{i}"] == pytest.approx(float(loss(ref, x)) - base, rel=1e-5, abs=1e-7)


def test_n_blocks_removes_the_least_important_and_keeps_one_per_container():
    m = Tower().eval()
    x = _x()
    dp = pk.DepthPruner(m, x, n_blocks=2, progress=False)
    scores = dp.scores()
    res = dp.prune()
    assert res.removed == sorted(scores, key=scores.get)[:2]
    assert len(m.blocks) == 3 and res.blocks_after == 3 and res.params_after < res.params_before
    m(x)
    with pytest.raises(ValueError, match="each container keeps a block"):
        pk.DepthPruner(Tower(), x, n_blocks=5)


def test_params_target():
    m = Tower().eval()
    n0 = sum(p.numel() for p in m.parameters())
    res = pk.DepthPruner(m, _x(), target=pk.ParamsTarget(0.7), progress=False).prune()
    n1 = sum(p.numel() for p in m.parameters())
    assert n1 <= 0.7 * n0 and res.params_after == n1
    assert len(res.removed) == 2  # one block is ~19% of the params: two are needed, not three


def test_failed_check_restores_the_model():
    class Bad(nn.Module):  # blocks= names a block whose removal changes the output shape
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3))

        def forward(self, x):
            return self.seq(x)
    m = Bad()
    ref = copy.deepcopy(m.state_dict())
    dp = pk.DepthPruner(m, torch.randn(2, 4), n_blocks=1, blocks=["seq.2"], progress=False)
    with pytest.raises(pk.PruningError):
        dp.prune()
    assert len(m.seq) == 3 and all(torch.equal(ref[k], v) for k, v in m.state_dict().items())


def test_save_load_replays_depth_and_width(tmp_path):
    m = Tower().eval()
    x = _x()
    pk.DepthPruner(m, x, n_blocks=2, progress=False).prune()
    pk.Pruner(m, x, "l2", target=pk.ChannelRatio(0.5)).prune()
    y = m(x)
    pk.save(m, tmp_path / "m.safetensors")
    loaded = pk.load(tmp_path / "m.safetensors", Tower).eval()
    torch.testing.assert_close(loaded(x), y)


def test_slice_state_dict_renumbers_blocks():
    m = Tower().eval()
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    pk.DepthPruner(m, _x(), n_blocks=1, blocks=["blocks.1"], progress=False).prune()
    mapped = slice_state_dict(orig, m._prunekit_record)
    assert set(mapped) == set(m.state_dict())
    torch.testing.assert_close(mapped["blocks.1.fc1.weight"], orig["blocks.2.fc1.weight"])


@pytest.mark.parametrize("kw,match", [
    ({}, "exactly one of n_blocks"),
    ({"n_blocks": 1, "target": pk.ParamsTarget(0.5)}, "exactly one of n_blocks"),
    ({"n_blocks": 0}, "positive int"),
    ({"target": pk.ChannelRatio(0.5)}, "ParamsTarget or pk.FlopsTarget"),
    ({"n_blocks": 1, "criterion": "magic"}, "unknown criterion"),
    ({"n_blocks": 1, "blocks": ["nope"]}, "not a module"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        pk.DepthPruner(Tower(), _x(), **kw)


def test_llm_layers_removed_generate_with_cache_and_reload(tmp_path):
    from tests._deps import require_transformers
    tf = require_transformers()
    cfg = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=4)
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    types = list(m.config.layer_types)
    ids = torch.randint(0, 64, (1, 7))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    res = pk.DepthPruner(m, x, data=[x], n_blocks=2, progress=False).prune()
    gone = sorted(int(n.rsplit(".", 1)[1]) for n in res.removed)
    assert m.config.num_hidden_layers == 3 and len(m.model.layers) == 3
    assert m.config.layer_types == [t for i, t in enumerate(types) if i not in gone]
    assert [layer.self_attn.layer_idx for layer in m.model.layers] == [0, 1, 2]
    kw = dict(max_new_tokens=5, do_sample=False)
    tokens = m.generate(ids, **kw)  # KV cache indexed by the renumbered layer_idx
    with torch.no_grad():
        # the cached generation equals greedy decoding without a cache
        seq = ids
        for _ in range(5):
            seq = torch.cat([seq, m(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(tokens, seq)
    m.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, m(**x).logits)
    assert torch.equal(again.generate(ids, **kw), tokens)
