"""One vocabulary for the algorithms: every algorithm takes ``target=pk.FlopsTarget(...)`` and reaches it;
the old spellings (``budget=``, ``target_flops_ratio``, a bare float, ``block_size``, ``mac_target``, the
``*Pruning`` class names) warn with a DeprecationWarning naming the new one and give the same result;
results are named tuples that unpack as before; one resumable Workdir."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.runs import ResumeError, Workdir, model_info


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


class Net(nn.Module):
    def __init__(self, w: int = 8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w)
        self.c2, self.b2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w)
        self.c3, self.b3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        for c, b in ((self.c1, self.b1), (self.c2, self.b2), (self.c3, self.b3)):
            x = F.relu(b(c(x)))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def make(seed: int = 0, w: int = 8) -> Net:
    torch.manual_seed(seed)
    return Net(w)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def no_deprecation(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        return fn(*a, **kw)


# ---------------------------------------------------------------- every algorithm reaches a FlopsTarget
def test_pruner_reaches_flops_target():
    model = make()
    base = pk.count(model, X).macs
    no_deprecation(pk.Pruner, model, X, "l2", target=pk.FlopsTarget(0.5)).prune()
    assert pk.count(model, X).macs / base <= 0.5 + 1e-9


def test_adaptive_pruner_target_and_deprecated_budget_give_the_same_model():
    m_new, m_old, m_pos = make(), make(), make()
    base = pk.count(m_new, X).macs
    no_deprecation(pk.AdaptivePruner, m_new, X, target=pk.FlopsTarget(0.6), delta_crop=0.15).run()
    assert pk.count(m_new, X).macs / base <= 0.6 + 1e-9
    with pytest.warns(DeprecationWarning, match="budget=.*target=pk.FlopsTarget"):
        ap = pk.AdaptivePruner(m_old, X, budget=("flops", 0.6), delta_crop=0.15)
    ap.run()
    with pytest.warns(DeprecationWarning, match="target=pk.FlopsTarget"):
        ap2 = pk.AdaptivePruner(m_pos, X, ("flops", 0.6), delta_crop=0.15)  # the old positional tuple
    ap2.run()
    assert same_weights(m_new, m_old) and same_weights(m_new, m_pos)
    assert ap.target == pk.FlopsTarget(0.6) and ap2.target == pk.FlopsTarget(0.6)


def test_adaptive_pruner_refuses_targets_it_cannot_search():
    with pytest.raises(TypeError, match="FlopsTarget"):
        pk.AdaptivePruner(make(), X, target=pk.ChannelRatio(0.5))
    with pytest.raises(TypeError, match="only"):
        pk.AdaptivePruner(make(), X, target=pk.FlopsTarget(0.5), budget=("flops", 0.5))


def test_adaptive_pruner_latency_target_carries_its_measuring_settings():
    ap = pk.AdaptivePruner(make(), X, target=pk.LatencyTarget(0.8, threads=1, repeats=3),
                           measure_fn=lambda module, inputs: 1.0)
    assert (ap.threads, ap.latency_repeats) == (1, 3)


def _learned_train(lp, model, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(64, 3, 12, 12, generator=g)
    ys = torch.randint(0, 10, (64,), generator=g)
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 3e-3},
                            {"params": list(lp.parameters()), "lr": 0.1}])
    model.train()
    for step in range(steps):
        idx = torch.randint(0, 64, (16,), generator=g)
        out = model(xs[idx])
        losses = lp.losses(step)
        loss = F.cross_entropy(out, ys[idx]) + losses.flops_loss + losses.entropy_loss + losses.distillation_loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_learned_pruner_reaches_flops_target_and_the_old_spellings_match():
    target, steps = 0.5, 150
    runs = {}
    for how in ("new", "float", "keyword", "old class"):
        model = make()
        if how == "new":
            lp = no_deprecation(pk.LearnedPruner, model, X, target=pk.FlopsTarget(target), num_steps=steps)
        elif how == "float":
            with pytest.warns(DeprecationWarning, match="target=pk.FlopsTarget"):
                lp = pk.LearnedPruner(model, X, target, steps)  # the old positional form
        elif how == "keyword":
            with pytest.warns(DeprecationWarning, match="target_flops_ratio.*target=pk.FlopsTarget"):
                lp = pk.LearnedPruner(model, X, target_flops_ratio=target, num_steps=steps)
        else:
            with pytest.warns(DeprecationWarning, match="LearnedPruning.*LearnedPruner"):
                lp = pk.LearnedPruning(model, X, pk.FlopsTarget(target), steps)
            assert isinstance(lp, pk.LearnedPruner)
        lp.prepare()
        _learned_train(lp, model, steps)
        lp.finalize()
        runs[how] = (model, lp.reached)
    model, reached = runs["new"]
    assert abs(reached - target) < 0.1 * target
    for how, (m, r) in runs.items():
        assert r == reached and same_weights(m, model), how


def test_learned_losses_are_a_named_tuple_that_unpacks_like_before():
    model = make()
    lp = pk.LearnedPruner(model, X, pk.FlopsTarget(0.5), 10)
    lp.prepare()
    model.train()
    model(X)
    res = lp.losses(3)
    assert isinstance(res, pk.algorithms.GateLosses) and isinstance(res, tuple) and len(res) == 4
    p, f, e, d = res
    assert (p, f, e, d) == (res.proportion, res.flops_loss, res.entropy_loss, res.distillation_loss)
    # the seed code's name gives the same losses on an identical pruner in the same state (a second forward
    # of the same pruner would not: the gates are projected towards the schedule before every forward)
    twin_model = make()  # the same seed: the same weights
    twin = pk.LearnedPruner(twin_model, X, pk.FlopsTarget(0.5), 10)
    twin.prepare()
    twin_model.train()
    twin_model(X)
    again = twin.compute_current_proportion_and_pruning_losses(3)
    assert torch.equal(again.proportion, p) and torch.equal(again.flops_loss, f)


def test_learned_gate_size_and_round_to():
    with pytest.warns(DeprecationWarning, match="block_size.*gate_size"):
        old = pk.LearnedPruner(make(), X, pk.FlopsTarget(0.5), 10, block_size=4)
    new = no_deprecation(pk.LearnedPruner, make(), X, pk.FlopsTarget(0.5), 10, gate_size=4)
    old.prepare()
    new.prepare()
    assert {g: t.logit.numel() for g, t in old.gates.items()} == {g: t.logit.numel() for g, t in new.gates.items()}
    assert old.gate_size == old.block_size == 4
    # round_to: every kept width is a multiple of it, whatever the gates decide
    model = make(w=12)
    lp = pk.LearnedPruner(model, X, pk.FlopsTarget(0.5), 10, round_to=8)
    lp.prepare()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in lp.gates.values():
            gate.logit.copy_(torch.randn(gate.logit.shape, generator=g))
    lp.finalize()
    for conv in (model.c1, model.c2, model.c3):
        assert conv.out_channels % 8 == 0 or conv.out_channels in (12, 24), conv


def test_learned_pruner_refuses_targets_it_cannot_train_for():
    with pytest.raises(TypeError, match="ParamsTarget.*FlopsTarget"):
        pk.LearnedPruner(make(), X, pk.ParamsTarget(0.5), 10)
    with pytest.raises(ValueError, match="fraction of MACs to KEEP"):
        pk.LearnedPruner(make(), X, pk.FlopsTarget(1.0), 10)


def _train_schedule(tp, model, epochs=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tp.attach_optimizer(opt)
    g = torch.Generator().manual_seed(3)
    for epoch in range(epochs):
        model.train()
        x, y = torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        tp.regularize()
        opt.step()
        tp.step(epoch)


def test_training_pruner_target_and_old_config_keys_give_the_same_model():
    cfg = {"start_epoch": 0, "end_epoch": 2}
    m_new, m_cfg, m_old = make(), make(), make()
    tp = no_deprecation(pk.TrainingPruner, m_new, dict(cfg), X, target=pk.FlopsTarget(0.6), round_to=2,
                        max_ratio=0.9)
    base = tp.base_macs
    _train_schedule(tp, m_new)
    assert tp.pruned and pk.count(m_new, X).macs / base <= 0.6 + 0.02
    assert all(c.out_channels % 2 == 0 for c in (m_new.c1, m_new.c2, m_new.c3))
    tp2 = no_deprecation(pk.TrainingPruner, m_cfg, dict(cfg, target=0.6, round_to=2, max_ratio=0.9), X)
    _train_schedule(tp2, m_cfg)
    with pytest.warns(DeprecationWarning) as caught:
        tp3 = pk.TrainingPruner(m_old, dict(cfg, mac_target=0.6, block_size=2, max_pruning_rate=0.9), X)
    assert sorted(str(w.message) for w in caught) == [f"pruning config key {old!r} is deprecated; use {new!r}" for old, new
                                                      in (("block_size", "round_to"), ("mac_target", "target"),
                                                          ("max_pruning_rate", "max_ratio"))]
    _train_schedule(tp3, m_old)
    assert same_weights(m_new, m_cfg) and same_weights(m_new, m_old)
    with pytest.warns(DeprecationWarning, match="'block_size'.*'round_to'"):
        assert tp3.config["block_size"] == 2  # reading the old key still works
    with pytest.raises(ValueError, match="both 'mac_target' and 'target'"):
        pk.TrainingPruner(make(), dict(cfg, mac_target=0.6, target=0.6), X)
    with pytest.raises(TypeError, match="TrainingPruner does not support ParamsTarget"):
        pk.TrainingPruner(make(), dict(cfg), X, target=pk.ParamsTarget(0.6))


def test_slice_pruner_name_and_ignore():
    model = make()
    sp = no_deprecation(pk.SlicePruner, model, layers=["c*"], ignore=["c3"])
    assert list(sp.layers) == ["c1", "c2"]
    with pytest.warns(DeprecationWarning, match="SlicePruning.*SlicePruner"):
        old = pk.SlicePruning(make(), layers=["c*"])
    assert isinstance(old, pk.SlicePruner) and isinstance(old, pk.SlicePruning)
    no_deprecation(isinstance, sp, pk.SlicePruning)  # isinstance checks do not warn


def test_prune_iteratively_returns_a_named_result_that_unpacks(tmp_path):
    model = make()
    res = pk.prune_iteratively(pk.Pruner(model, X, "l2", pk.FlopsTarget(0.6)), pk.Linear(steps=2), progress=False)
    out, history = res
    assert out is res.model is model and history == res.history and len(history) == 2
    assert history[-1]["macs_ratio"] <= 0.6 + 1e-9


# ---------------------------------------------------------------- the one workdir
def test_workdir_state_checks_and_commit(tmp_path):
    wd = Workdir(tmp_path / "run", "prunekit.test", what="a test")
    assert not wd.has_state()
    model = make()
    state = wd.new_state(model=model_info(model, shapes=True), done=0)
    wd.write_state(state)
    assert wd.read_state()["done"] == 0 and not list(wd.path.glob(".*tmp*"))
    first = wd.save_checkpoint(model, "step_1.safetensors")
    wd.commit(dict(state, done=1, checkpoint=first), checkpoint=first)
    pk.Pruner(model, X, "l2", 0.5).prune()
    second = wd.save_checkpoint(model, "step_2.safetensors")
    wd.commit(dict(state, done=2, checkpoint=second), checkpoint=second, previous=first)
    assert not (wd.path / first).exists() and (wd.path / second).exists()
    fresh = make()
    wd.check_model(wd.read_state()["model"], fresh, "not the model", "rebuild it")
    wd.restore(fresh, second)
    assert same_weights(fresh, model)
    with pytest.raises(ResumeError, match=r"not the model \(b1.bias: saved \[\[8\]"):
        wd.check_model(wd.read_state()["model"], make(w=4), "not the model", "rebuild it")
    with pytest.raises(ResumeError, match="other settings.*a: saved 1, now 2"):
        wd.check_config({"a": 1}, {"a": 2}, "pass the same")
    other = Workdir(tmp_path / "run", "prunekit.other", what="another")
    with pytest.raises(ResumeError, match="not another state"):
        other.read_state()
    (wd.path / "state.json").write_text("{broken")
    with pytest.raises(ResumeError, match="not valid JSON"):
        wd.read_state()
    newer = json.dumps(dict(state, format_version=99))
    (wd.path / "state.json").write_text(newer)
    with pytest.raises(ResumeError, match="newer prunekit"):
        wd.read_state()


def test_the_algorithms_share_one_resume_error_and_one_masks_attribute():
    from prunekit.algorithms.adaptive import WorkdirError
    from prunekit.cli.common import human as cli_human
    from prunekit.cost.count import human
    from prunekit.io import checkpoint
    from prunekit.plan.schedules import ResumeError as IterativeResumeError
    from prunekit.surgery import MASKS_ATTR
    assert IterativeResumeError is ResumeError and issubclass(WorkdirError, ResumeError)
    model = make()
    graph = pk.analyze(model, X)
    pk.mask(model, graph, {graph.prunable_groups[0].id: [0]})
    assert checkpoint._MASKS_ATTR == MASKS_ATTR and hasattr(model, MASKS_ATTR)
    assert cli_human is human and human(1234567) == "1.23 M" and human(1234567, sep="") == "1.23M"
