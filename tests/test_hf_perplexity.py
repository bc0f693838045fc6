"""pk.hf.perplexity equals a direct computation; padding is neither predicted nor counted."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prunekit as pk
from tests._deps import require_transformers

tf = require_transformers()


def _model():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=50)
    return tf.LlamaForCausalLM(cfg).eval()


def test_perplexity_equals_the_mean_next_token_loss():
    m = _model()
    ids = torch.randint(0, 50, (5, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m(input_ids=ids).logits[:, :-1]
        ref = math.exp(float(F.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))))
    assert pk.hf.perplexity(m, ids, batch_size=2) == pytest.approx(ref, rel=1e-5)
    assert pk.hf.perplexity(m, [ids[:2], ids[2:]]) == pytest.approx(ref, rel=1e-5)
    m.train()
    pk.hf.perplexity(m, ids)
    assert m.training


def test_padding_is_not_counted():
    m = _model()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    padded = ids.clone()
    padded[1, 5:] = 7  # whatever sits in the padding does not matter
    a = pk.hf.perplexity(m, [{"input_ids": ids, "attention_mask": mask}])
    b = pk.hf.perplexity(m, [{"input_ids": padded, "attention_mask": mask}])
    assert a == pytest.approx(b, rel=1e-6)
    # equals the two rows scored separately, the second only on its 5 real tokens
    with torch.no_grad():
        n0 = F.cross_entropy(m(input_ids=ids[:1]).logits[0, :-1], ids[0, 1:], reduction="sum")
        n1 = F.cross_entropy(m(input_ids=ids[1:, :5]).logits[0, :-1], ids[1, 1:5], reduction="sum")
    assert a == pytest.approx(math.exp(float(n0 + n1) / (7 + 4)), rel=1e-4)


def test_bad_input():
    m = _model()
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        pk.hf.perplexity(m, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        pk.hf.perplexity(m, [{"ids": torch.zeros(1, 3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="no token"):
        pk.hf.perplexity(m, torch.zeros(2, 1, dtype=torch.long))
