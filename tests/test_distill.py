"""pk.distill: KL distillation from the unpruned model, hidden-state loss, resume, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.algorithms.distillation import distill_loss


def _mlp(seed=0, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 5))


def _batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g) for _ in range(n)]


def _kl(student, teacher, batches, t=2.0):
    with torch.no_grad():
        return sum(float(distill_loss(student(b), teacher(b), t)) for b in batches) / len(batches)


def _pruned_pair():
    teacher = _mlp().eval()
    student = copy.deepcopy(teacher)
    x = torch.randn(2, 8)
    pk.Pruner(student, x, "l2", target=pk.ChannelRatio(0.5)).prune()
    return student, teacher


def test_distill_loss_is_the_tempered_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    T = 3.0
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True) * T * T
    torch.testing.assert_close(distill_loss(s, t, T), ref)
    assert float(distill_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_ignores_padding_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    s2 = s.clone()
    s2[0, 3:] = 100.0  # padding positions: whatever the student says there does not count
    torch.testing.assert_close(distill_loss(s, t, 1.0, mask), distill_loss(s2, t, 1.0, mask))
    assert not torch.allclose(distill_loss(s, t, 1.0), distill_loss(s2, t, 1.0))


def test_distill_reduces_the_kl_of_a_pruned_model():
    student, teacher = _pruned_pair()
    data = _batches()
    before = _kl(student, teacher, data)
    res = pk.distill(student, teacher, data, steps=60, lr=1e-2, progress=False)
    after = _kl(student, teacher, data)
    assert after < 0.5 * before, (before, after)
    assert res.steps == 60 and res.history[-1]["step"] == 60
    assert res.history[-1]["kl"] < res.history[0]["kl"]
    s, h = res  # unpacks like prune_iteratively's result
    assert s is student and h == res.history


def test_teacher_is_never_changed_and_modes_are_restored():
    student, teacher = _pruned_pair()
    ref = {k: v.clone() for k, v in teacher.state_dict().items()}
    student.eval()
    teacher.train()
    pk.distill(student, teacher, _batches(2), steps=3, progress=False)
    assert all(torch.equal(ref[k], v) for k, v in teacher.state_dict().items())
    assert not student.training and teacher.training


def test_hidden_state_loss_with_a_projection_where_widths_differ():
    teacher = _mlp(hidden=32).eval()
    student = _mlp(seed=3, hidden=12)  # narrower: the hidden term needs a learned projection 12 -> 32
    data = _batches(4)
    res = pk.distill(student, teacher, data, steps=40, lr=1e-2, kl_weight=0.0, hidden_weight=1.0,
                     hidden_layers=[("3", "3")], progress=False)
    assert res.history[-1]["hidden"] < res.history[0]["hidden"]
    assert res.history[0]["kl"] == 0.0 or res.history[0]["kl"] > 0  # reported, weight 0


def test_eval_fn_every_k_steps_and_callback_stops():
    student, teacher = _pruned_pair()
    seen = []
    res = pk.distill(student, teacher, _batches(3), steps=10, log_every=2, eval_every=4,
                     eval_fn=lambda m: _kl(m, teacher, _batches(2)), callback=lambda e: seen.append(e["step"]) or
                     e["step"] < 6, progress=False)
    assert [e["step"] for e in res.history] == [2, 4, 6]
    assert "metric" in res.history[1] and "metric" not in res.history[0]
    assert seen == [2, 4, 6] and res.steps == 6


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = _batches(5)

    def run(workdir, steps, stop_at=None):
        student, teacher = _pruned_pair()
        calls = []
        student.register_forward_hook(lambda *a: calls.append(1))
        cb = (lambda e: e["step"] < stop_at) if stop_at else None
        res = pk.distill(student, teacher, data, steps=steps, lr=1e-2, log_every=3, checkpoint_every=3,
                         workdir=workdir, callback=cb, progress=False, seed=0)
        return student, len(calls), res

    whole, _, _ = run(None, 12)
    _, n1, _ = run(tmp_path / "kd", 12, stop_at=6)  # stops after step 6 (a crash after the checkpoint)
    resumed, n2, res = run(tmp_path / "kd", 12)
    assert (n1, n2) == (6, 6)  # the resumed run only did the remaining steps
    assert [e["step"] for e in res.history] == [3, 6, 9, 12]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_resume_refuses_other_settings(tmp_path):
    student, teacher = _pruned_pair()
    pk.distill(student, teacher, _batches(2), steps=4, workdir=tmp_path, progress=False)
    student, teacher = _pruned_pair()
    with pytest.raises(pk.algorithms.distillation.ResumeError, match="temperature|config|settings"):
        pk.distill(student, teacher, _batches(2), steps=4, temperature=5.0, workdir=tmp_path, progress=False)


@pytest.mark.parametrize("kw,match", [
    ({"steps": 0}, "steps must be a positive int"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"kl_weight": 0.0}, "not all 0"),
    ({"hidden_layers": ["3"], "hidden_weight": 1.0}, "pairs"),
])
def test_bad_arguments(kw, match):
    student, teacher = _pruned_pair()
    args = {"steps": 2, **kw}
    with pytest.raises(ValueError, match=match):
        pk.distill(student, teacher, _batches(1), progress=False, **args)


def test_bad_data_and_models():
    student, teacher = _pruned_pair()
    with pytest.raises(ValueError, match="same module"):
        pk.distill(teacher, teacher, _batches(1), steps=1)
    with pytest.raises(TypeError, match="iterator"):
        pk.distill(student, teacher, iter(_batches(1)), steps=1, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        pk.distill(student, teacher, [], steps=1, progress=False)
    other = nn.Sequential(nn.Linear(8, 3))  # 3 classes vs the teacher's 5
    with pytest.raises(ValueError, match="differ in shape"):
        pk.distill(other, teacher, _batches(1), steps=1, progress=False)


def test_distill_a_pruned_language_model_with_attention_mask():
    from tests._deps import require_transformers
    tf = require_transformers()
    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    teacher = tf.LlamaForCausalLM(cfg).eval()
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (2, 6), generator=g),
             "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])} for _ in range(3)]
    x = {"input_ids": data[0]["input_ids"]}
    graph = pk.analyze(student, x)
    mlp = [g for g in graph.prunable_groups if any(m.endswith("down_proj") for m in g.modules)]
    pk.prune(student, graph, {g.id: list(range(g.size // 2)) for g in mlp})

    def kl(m):
        with torch.no_grad():
            return sum(float(distill_loss(m(**b).logits, teacher(**b).logits, 1.0,
                                          b["attention_mask"].bool())) for b in data) / len(data)
    before = kl(student)
    res = pk.distill(student, teacher, data, steps=25, lr=5e-3, temperature=1.0, hidden_weight=0.5, progress=False)
    assert kl(student) < before
    assert math.isfinite(res.history[-1]["hidden"]) and res.history[-1]["hidden"] > 0
