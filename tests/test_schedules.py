"""Schedules (formulas, validation, registry) and pk.prune_iteratively (targets, callbacks, lottery rewinding,
checkpoints and resume after a crash)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit as pk
from prunekit.plan.schedules import SCHEDULES, ResumeError, Schedule
from prunekit.surgery import slice_state_dict

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def tiny(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10)).eval()


def states_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def sgd_finetune(model, step):
    """Deterministic fine-tuning: a few SGD steps on data fixed by the step number."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


# ---------------------------------------------------------------- formulas
def test_linear_values():
    assert pk.Linear().sparsities(0.5, 5) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert pk.Linear(steps=2).sparsities(0.6) == pytest.approx([0.3, 0.6])


def test_agp_cubic_values_by_hand():
    agp = pk.AGP()
    # s_t = 0.8 + (0 - 0.8) * (1 - t/4)^3
    by_hand = [0.0, 0.8 - 0.8 * 27 / 64, 0.8 - 0.8 / 8, 0.8 - 0.8 / 64, 0.8]
    assert [agp.at(t, 0.8, 4) for t in range(5)] == pytest.approx(by_hand)
    assert agp.sparsities(0.8, 4) == pytest.approx(by_hand[1:])
    agp0 = pk.AGP(initial=0.1)
    assert agp0.at(0, 0.8, 4) == pytest.approx(0.1)
    assert agp0.sparsities(0.8, 4) == pytest.approx([0.8 - 0.7 * 27 / 64, 0.8 - 0.7 / 8, 0.8 - 0.7 / 64, 0.8])
    # cubic: the first step removes more than a linear schedule would, the last less
    lin = pk.Linear().sparsities(0.8, 4)
    assert agp.sparsities(0.8, 4)[0] > lin[0]
    assert agp.sparsities(0.8, 4)[-1] - agp.sparsities(0.8, 4)[-2] < lin[-1] - lin[-2]


@pytest.mark.parametrize("final,n", [(0.75, 2), (0.5, 3), (0.9, 10)])
def test_lottery_removes_a_constant_fraction_of_the_remainder(final, n):
    s = pk.LotteryTicket().sparsities(final, n)
    per_round = 1 - (1 - final) ** (1 / n)
    assert pk.LotteryTicket.per_round(final, n) == pytest.approx(per_round)
    prev = 0.0
    for cur in s:
        assert (cur - prev) / (1 - prev) == pytest.approx(per_round)
        prev = cur
    assert s == pytest.approx([1 - (1 - final) ** (k / n) for k in range(1, n + 1)])
    if (final, n) == (0.75, 2):
        assert s == pytest.approx([0.5, 0.75])


def test_geometric_increments_and_relation_to_other_schedules():
    s = pk.Geometric(factor=0.5).sparsities(0.7, 3)
    inc = [s[0], s[1] - s[0], s[2] - s[1]]
    assert inc == pytest.approx([0.4, 0.2, 0.1])  # 0.7 * 4/7, 2/7, 1/7
    assert pk.Geometric(factor=2.0).sparsities(0.7, 3) == pytest.approx([0.1, 0.3, 0.7])
    assert pk.Geometric(factor=1.0).sparsities(0.7, 7) == pytest.approx(pk.Linear().sparsities(0.7, 7))
    q = (1 - 0.8) ** (1 / 4)
    assert pk.Geometric(factor=q).sparsities(0.8, 4) == pytest.approx(pk.LotteryTicket().sparsities(0.8, 4))
    assert pk.Geometric(factor=0.5).sparsities(0.8, 4) != pytest.approx(pk.LotteryTicket().sparsities(0.8, 4))


def test_oneshot_is_one_step():
    assert pk.OneShot().sparsities(0.3) == [0.3]
    assert pk.OneShot().sparsities(0.3, 5) == [0.3]


ALL = [pk.OneShot(), pk.Linear(), pk.AGP(), pk.AGP(initial=0.05), pk.LotteryTicket(), pk.Geometric(factor=0.3),
       pk.Geometric(factor=3.0)]


@settings(max_examples=60, deadline=None)
@given(final=st.floats(0.0, 0.999), n=st.integers(1, 40), k=st.integers(0, len(ALL) - 1))
def test_every_schedule_is_monotone_and_ends_at_final(final, n, k):
    sched = ALL[k]
    if isinstance(sched, pk.AGP) and sched.initial > final:
        with pytest.raises(ValueError, match="initial"):
            sched.sparsities(final, n)
        return
    s = sched.sparsities(final, n)
    assert len(s) == (1 if isinstance(sched, pk.OneShot) else n)
    assert s[-1] == final
    assert all(0.0 <= a <= b <= final for a, b in zip([0.0] + s, s))


def test_registry_and_repr():
    assert set(SCHEDULES) == {"oneshot", "linear", "agp", "lottery", "geometric"}
    assert isinstance(pk.get_schedule("AGP", steps=3, initial=0.1), pk.AGP)
    assert pk.get_schedule("lottery-ticket", rewind=None) == pk.LotteryTicket(rewind=None)
    assert isinstance(pk.get_schedule("one_shot"), pk.OneShot)
    g = pk.Geometric(steps=4, factor=0.7)
    assert pk.get_schedule(g) is g
    assert pk.get_schedule(g.name, **g.params()) == g
    for cls in SCHEDULES.values():
        sched = cls()
        assert isinstance(sched, Schedule) and type(sched)(**sched.params()) == sched
    assert repr(g) == "Geometric(steps=4, factor=0.7)"


@pytest.mark.parametrize("call,match", [
    (lambda: pk.Linear().sparsities(0.5, 0), "positive integer"),
    (lambda: pk.Linear().sparsities(0.5, 2.0), "positive integer"),
    (lambda: pk.Linear().sparsities(0.5, True), "positive integer"),
    (lambda: pk.Linear().sparsities(0.5), "steps=5"),
    (lambda: pk.Linear(steps=-1), "positive integer"),
    (lambda: pk.Linear().sparsities(1.0, 3), r"\[0, 1\)"),
    (lambda: pk.AGP().sparsities(-0.1, 3), r"\[0, 1\)"),
    (lambda: pk.AGP().sparsities(float("nan"), 3), r"\[0, 1\)"),
    (lambda: pk.AGP().sparsities("half", 3), "must be a number"),
    (lambda: pk.AGP(initial=0.6).sparsities(0.5, 3), "initial sparsity 0.6 is larger"),
    (lambda: pk.AGP().at(5, 0.5, 4), r"t must be in \[0, 4\]"),
    (lambda: pk.OneShot().sparsities(0.5, 0), "positive integer"),
    (lambda: pk.LotteryTicket(rewind="weights"), "rewind must be"),
    (lambda: pk.LotteryTicket(rewind="early", rewind_step=0), "rewind_step must be a positive integer"),
    (lambda: pk.LotteryTicket(rewind="init", rewind_step=2), "only applies to rewind='early'"),
    (lambda: pk.Geometric(factor=0), "positive finite"),
    (lambda: pk.Geometric(factor=float("inf")), "positive finite"),
    (lambda: pk.Geometric(factor="x"), "positive number"),
    (lambda: pk.get_schedule("cosine"), "unknown schedule 'cosine'; choose one of"),
    (lambda: pk.get_schedule(pk.Linear(), steps=3), "either a name"),
])
def test_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_get_schedule_bad_kwargs_names_the_schedule():
    with pytest.raises(TypeError, match="get_schedule\\('agp'\\)"):
        pk.get_schedule("agp", factor=2)


# ---------------------------------------------------------------- prune_iteratively
@pytest.mark.parametrize("schedule", [pk.Linear(steps=3), pk.AGP(steps=3)])
def test_reaches_flops_target_within_one_step(schedule):
    model = tiny()
    base = pk.count(model, X).macs
    p = pk.Pruner(model, X, "l2", pk.FlopsTarget(0.5))
    out, hist = pk.prune_iteratively(p, schedule, progress=False)
    assert out is model
    macs = pk.count(model, X).macs
    assert macs <= base * 0.5 * 1.0001
    step_macs = max(p.graph.macs() - p.graph.macs({g.id: 1}) for g in p.graph.prunable_groups)
    assert macs >= base * 0.5 - step_macs
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert [h["sparsity"] for h in hist] == schedule.sparsities(0.5)
    assert hist[-1]["macs"] == macs and hist[-1]["params"] == sum(t.numel() for t in model.parameters())
    assert all(a["macs"] >= b["macs"] for a, b in zip(hist, hist[1:]))
    assert hist[0]["macs"] < base  # pruned gradually, not all at the end
    for h in hist:  # each step meets its own intermediate target
        assert h["macs_ratio"] <= 1 - h["sparsity"] + 1e-4
    assert len(p.history) == 3
    assert model(X).shape == (2, 10)


def test_finetune_eval_callback_history_and_progress_bar():
    model = tiny()
    p = pk.Pruner(model, X, "l1", 0.5)
    calls, seen = [], []

    def finetune(m, step):
        assert m is model
        calls.append(("finetune", step))

    def evaluate(m):
        calls.append(("eval", len(calls)))
        return {"acc": torch.tensor(0.5), "loss": 2}

    out, hist = pk.prune_iteratively(p, "linear", finetune, evaluate, steps=3, callback=seen.append, progress=True)
    assert [c[0] for c in calls] == ["finetune", "eval"] * 3
    assert [c[1] for c in calls if c[0] == "finetune"] == [1, 2, 3]
    assert seen == hist and len(hist) == 3
    for h in hist:
        assert h["metric"] == {"acc": 0.5, "loss": 2.0}
        assert h["seconds"] >= 0 and h["rewound"] is False and "checkpoint" not in h
    json.dumps(hist)  # JSON-able
    assert [m.out_channels for m in model if isinstance(m, nn.Conv2d)] == [8, 16, 16]


def test_callback_false_stops_and_bad_eval_result():
    p = pk.Pruner(tiny(), X, "l2", 0.5)
    _, hist = pk.prune_iteratively(p, pk.Linear(steps=4), callback=lambda e: e["step"] < 2, progress=False)
    assert [h["step"] for h in hist] == [1, 2]
    p = pk.Pruner(tiny(), X, "l2", 0.5)
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        pk.prune_iteratively(p, pk.Linear(steps=2), eval_fn=lambda m: "good", progress=False)
    with pytest.raises(TypeError, match="finetune_fn must be callable"):
        pk.prune_iteratively(p, pk.Linear(steps=2), finetune_fn=3, progress=False)


def test_oneshot_schedule_is_one_step():
    p = pk.Pruner(tiny(), X, "l2", 0.25)
    _, hist = pk.prune_iteratively(p, pk.OneShot(), steps=5, progress=False)
    assert [h["sparsity"] for h in hist] == [0.25]


def _perturb(m, step):
    with torch.no_grad():
        for t in m.parameters():
            t.add_(0.5 * step)


@pytest.mark.parametrize("rewind", ["init", None])
def test_lottery_rewinds_surviving_weights_to_init(rewind):
    model = tiny()
    init = copy.deepcopy(model.state_dict())
    p = pk.Pruner(model, X, "l2", 0.6)
    checked = []

    def finetune(m, step):
        expect = slice_state_dict(init, m._prunekit_record)
        checked.append(states_equal(m.state_dict(), expect))
        _perturb(m, step)

    _, hist = pk.prune_iteratively(p, pk.LotteryTicket(steps=3, rewind=rewind), finetune, progress=False)
    assert [h["rewound"] for h in hist] == [rewind == "init"] * 3
    if rewind == "init":
        assert checked == [True, True, True]
    else:  # without rewinding the perturbations accumulate: the check above is able to fail
        assert checked == [True, False, False]


def test_lottery_rewind_state_and_early_rewinding():
    model = tiny()
    init = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    p = pk.Pruner(model, X, "l2", 0.5)
    ok = []
    pk.prune_iteratively(p, pk.LotteryTicket(steps=2), lambda m, s: ok.append(
        states_equal(m.state_dict(), slice_state_dict(init, m._prunekit_record))), rewind_state=init, progress=False)
    assert ok == [True, True]

    model = tiny()
    p = pk.Pruner(model, X, "l2", 0.6)
    early = {}

    def finetune(m, step):
        if step > 1:  # rewound to the weights saved after step 1's fine-tuning, sliced by the later steps
            rec = m._prunekit_record
            ok.append(states_equal(m.state_dict(), slice_state_dict(early["state"], rec[early["n"]:])))
        _perturb(m, step)
        if step == 1:
            early.update(state=copy.deepcopy(m.state_dict()), n=len(m._prunekit_record))

    _, hist = pk.prune_iteratively(p, pk.LotteryTicket(steps=3, rewind="early"), finetune, progress=False)
    assert ok == [True, True, True, True]
    assert [h["rewound"] for h in hist] == [False, True, True]
    with pytest.raises(ValueError, match="needs more than 3 steps"):
        pk.prune_iteratively(pk.Pruner(tiny(), X, "l2", 0.5), pk.LotteryTicket(steps=3, rewind="early",
                                                                               rewind_step=3), progress=False)
    with pytest.raises(ValueError, match="rewind_state is only used"):
        pk.prune_iteratively(pk.Pruner(tiny(), X, "l2", 0.5), pk.Linear(steps=2), rewind_state=init, progress=False)


# ---------------------------------------------------------------- checkpoints and resume
def rng_finetune(model, step):
    """Fine-tuning that draws from torch's global generator (made repeatable by seed=...)."""
    with torch.no_grad():
        for t in model.parameters():
            t.add_(0.01 * torch.randn_like(t))


RESUME_CASES = {
    "agp-sgd": dict(schedule=pk.AGP(steps=4), finetune=sgd_finetune, crash_at=2, seed=None, target=pk.FlopsTarget(0.4)),
    "lottery-init": dict(schedule=pk.LotteryTicket(steps=4), finetune=sgd_finetune, crash_at=2, seed=None,
                         target=0.5),
    "lottery-early-seeded": dict(schedule=pk.LotteryTicket(steps=4, rewind="early"), finetune=rng_finetune,
                                 crash_at=3, seed=7, target=0.5),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_after_crash_gives_the_uninterrupted_result(tmp_path, case):
    c = RESUME_CASES[case]
    ref_model = tiny()
    ref_p = pk.Pruner(ref_model, X, "l2", c["target"])
    _, ref_hist = pk.prune_iteratively(ref_p, c["schedule"], c["finetune"], seed=c["seed"], progress=False)

    crashed_model = tiny()
    crashed_calls = []

    def crashing(m, step):
        crashed_calls.append(step)
        if step == c["crash_at"]:
            raise RuntimeError("simulated crash")
        c["finetune"](m, step)

    torch.manual_seed(999)  # the resumed run must not depend on the global RNG state it starts with
    with pytest.raises(RuntimeError, match="simulated crash"):
        pk.prune_iteratively(pk.Pruner(crashed_model, X, "l2", c["target"]), c["schedule"], crashing,
                             workdir=tmp_path, seed=c["seed"], progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["done"] == c["crash_at"] - 1
    assert sorted(f.name for f in tmp_path.glob("step_*")) == [f"step_{k}.safetensors" for k in range(1, c["crash_at"])]

    fresh = tiny()
    p = pk.Pruner(fresh, X, "l2", c["target"])
    calls = []
    out, hist = pk.prune_iteratively(p, c["schedule"], lambda m, s: (calls.append(s), c["finetune"](m, s)),
                                     workdir=tmp_path, seed=c["seed"], progress=False)
    assert out is fresh
    assert calls == list(range(c["crash_at"], 5))
    assert states_equal(fresh.state_dict(), ref_model.state_dict())
    assert fresh._prunekit_record == ref_model._prunekit_record
    drop = ("seconds", "checkpoint")
    assert [{k: v for k, v in h.items() if k not in drop} for h in hist] == \
           [{k: v for k, v in h.items() if k not in drop} for h in ref_hist]
    assert len(p.history) == 4 and p.graph.macs() == ref_p.graph.macs()
    # the rebuilt model is a normal pk checkpoint
    loaded = pk.load(tmp_path / "step_4.safetensors", tiny)
    assert states_equal(loaded.state_dict(), ref_model.state_dict())


def test_finished_run_returns_at_once_and_resume_false_starts_over(tmp_path):
    p = pk.Pruner(tiny(), X, "l2", 0.5)
    model, hist = pk.prune_iteratively(p, pk.Linear(steps=2), sgd_finetune, eval_fn=lambda m: 1.0,
                                       workdir=tmp_path, progress=False)
    fresh = tiny()
    called = []
    out, hist2 = pk.prune_iteratively(pk.Pruner(fresh, X, "l2", 0.5), pk.Linear(steps=2),
                                      lambda m, s: called.append(s), eval_fn=lambda m: called.append("eval"),
                                      workdir=tmp_path, progress=False)
    assert called == [] and hist2 == hist
    assert states_equal(out.state_dict(), model.state_dict())
    out, hist3 = pk.prune_iteratively(pk.Pruner(tiny(), X, "l2", 0.5), pk.Linear(steps=2),
                                      lambda m, s: called.append(s), workdir=tmp_path, resume=False, progress=False)
    assert called == [1, 2] and [h["metric"] for h in hist3] == [None, None]


def test_resume_refuses_other_model_settings_or_pruned_model(tmp_path):
    sched = pk.Linear(steps=3)

    def crash(m, s):
        if s == 2:
            raise RuntimeError("boom")

    crashed = tiny()
    with pytest.raises(RuntimeError, match="boom"):
        pk.prune_iteratively(pk.Pruner(crashed, X, "l2", 0.5), sched, crash, workdir=tmp_path, progress=False)
    with pytest.raises(ResumeError, match="not the model this run was started with.*0.weight: saved"):
        pk.prune_iteratively(pk.Pruner(tiny(width=8), X, "l2", 0.5), sched, workdir=tmp_path, progress=False)
    with pytest.raises(ResumeError, match="already pruned .*new Pruner"):  # the crashed run's own model
        pk.prune_iteratively(pk.Pruner(crashed, X, "l2", 0.5), sched, workdir=tmp_path, progress=False)
    with pytest.raises(ResumeError, match="other settings.*schedule"):
        pk.prune_iteratively(pk.Pruner(tiny(), X, "l2", 0.5), pk.AGP(steps=3), workdir=tmp_path, progress=False)
    with pytest.raises(ResumeError, match="other settings.*target"):
        pk.prune_iteratively(pk.Pruner(tiny(), X, "l2", 0.3), sched, workdir=tmp_path, progress=False)
    # nothing was changed by the refusals: the right model still resumes
    fresh = tiny()
    _, hist = pk.prune_iteratively(pk.Pruner(fresh, X, "l2", 0.5), sched, workdir=tmp_path, progress=False)
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert [m.out_channels for m in fresh if isinstance(m, nn.Conv2d)] == [8, 16, 16]


def test_resume_checks_fingerprint_before_touching_the_model(tmp_path):
    pk.prune_iteratively(pk.Pruner(tiny(), X, "l2", 0.5), pk.Linear(steps=2), workdir=tmp_path, progress=False)
    other = tiny(width=8)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ResumeError):
        pk.prune_iteratively(pk.Pruner(other, X, "l2", 0.5), pk.Linear(steps=2), workdir=tmp_path, progress=False)
    assert states_equal(other.state_dict(), before) and not getattr(other, "_prunekit_record", None)
    assert math.isclose(json.loads((tmp_path / "state.json").read_text())["config"]["target"]["sparsity"], 0.5)


def test_resume_keeps_the_original_latency_baseline(tmp_path):
    def pruner(model):  # a deterministic stand-in for measured latency: the parameter count
        p = pk.Pruner(model, X, "l2", pk.LatencyTarget(0.5, method="search"))  # the knapsack's latency model is measured
        p._measure = lambda m: float(sum(t.numel() for t in m.parameters()))
        return p

    ref = tiny()
    base = float(sum(t.numel() for t in ref.parameters()))
    pk.prune_iteratively(pruner(ref), pk.Linear(steps=3), sgd_finetune, progress=False)

    def crash(m, s):
        if s == 2:
            raise RuntimeError("boom")
        sgd_finetune(m, s)

    with pytest.raises(RuntimeError, match="boom"):
        pk.prune_iteratively(pruner(tiny()), pk.Linear(steps=3), crash, workdir=tmp_path, progress=False)
    p = pruner(tiny())
    pk.prune_iteratively(p, pk.Linear(steps=3), sgd_finetune, workdir=tmp_path, progress=False)
    assert p.base_latency == base  # measured on the original model, not on the restored pruned one
    assert states_equal(p.model.state_dict(), ref.state_dict())
