"""pk.AdaptivePruner: NetAdapt-style search (budgets, best-candidate choice, resume, parallel, latency table)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prunekit as pk
from prunekit.algorithms.adaptive import LatencyTable, WorkdirError


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


def _block(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """4 conv+BN layers in two stages; the last width (30) is not a multiple of 4 on purpose."""

    def __init__(self, widths=(16, 24, 32, 30)):
        super().__init__()
        w = widths
        self.stage1 = nn.Sequential(_block(3, w[0]), _block(w[0], w[1], 2))
        self.stage2 = nn.Sequential(_block(w[1], w[2]), _block(w[2], w[3], 2))
        self.fc = nn.Linear(w[3], 10)

    def forward(self, x):
        return self.fc(self.stage2(self.stage1(x)).mean((2, 3)))


def make(widths=(16, 24, 32, 30)):
    torch.manual_seed(0)
    return SmallCNN(widths)


X_EXAMPLE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
_g = torch.Generator().manual_seed(2)
X_TRAIN = torch.randn(16, 3, 16, 16, generator=_g)
Y_TRAIN = torch.randint(0, 10, (16,), generator=_g)


# module level, so they can be sent to worker processes
def finetune(model, iteration, candidate):
    """A few SGD steps on a batch drawn from the candidate's seeded generator."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        noise = 0.1 * torch.randn_like(X_TRAIN)
        opt.zero_grad()
        F.cross_entropy(model(X_TRAIN + noise), Y_TRAIN).backward()
        opt.step()


def evaluate(model):
    model.eval()
    with torch.no_grad():
        return -float(F.cross_entropy(model(X_TRAIN), Y_TRAIN))


def finetune_crash_at_2(model, iteration, candidate):
    if iteration == 2:
        raise RuntimeError("simulated crash")
    finetune(model, iteration, candidate)


def finetune_must_not_run(model, iteration, candidate):
    raise AssertionError("finetune_fn was called on a finished run")


def final_must_not_run(model):
    raise AssertionError("final_finetune_fn was called on a finished run")


def constant_eval(model):
    return 1.0


FINAL_CALLS: list[int] = []


def final_finetune(model):
    FINAL_CALLS.append(sum(p.numel() for p in model.parameters()))
    finetune(model, -1, None)


MEASURED: list[str] = []


def fake_ms(module, inputs):
    """A deterministic 'latency': 0.01 ms per output channel of every conv/BN/linear (additive per group)."""
    MEASURED.append(type(module).__name__)
    return 0.01 * sum(float(m.weight.shape[0]) for m in module.modules()
                      if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)))


def run(tmp_path=None, name="wd", model=None, **kw):
    model = make() if model is None else model
    kw.setdefault("target", pk.FlopsTarget(0.5))
    kw.setdefault("finetune_fn", finetune)
    kw.setdefault("eval_fn", evaluate)
    kw.setdefault("delta_crop", 0.15)
    wd = None if tmp_path is None else tmp_path / name
    ap = pk.AdaptivePruner(model, X_EXAMPLE, workdir=wd, **kw)
    return ap, ap.run()


def read_log(wd):
    return [json.loads(line) for line in (wd / "log.jsonl").read_text().splitlines()]


def conv_widths(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ---------------------------------------------------------------- budget and choice
def test_flops_budget_met_and_every_choice_is_the_best_candidate(tmp_path):
    base = pk.count(make(), X_EXAMPLE).macs
    ap, model = run(tmp_path)
    macs = pk.count(model, X_EXAMPLE).macs
    assert model is ap.model and model(X_EXAMPLE).shape == (2, 10)
    assert macs <= 0.5 * base
    # the last cut was the smallest that met its budget: one unit less on any group would not have
    graph = pk.analyze(model, X_EXAMPLE)
    step_macs = max(graph.macs() - graph.macs_kept({g.id: g.size - 1}) for g in graph.prunable_groups)
    assert macs >= 0.5 * base - 3 * step_macs  # not wildly overshot
    entries = read_log(tmp_path / "wd")
    assert len(entries) == ap.iteration >= 2
    for k, e in enumerate(entries, 1):
        assert e["iteration"] == k
        scored = [c for c in e["candidates"] if c["metric"] is not None]
        best = max(c["metric"] for c in scored)
        assert e["metric"] == best
        assert e["chosen"] == min(c["index"] for c in scored if c["metric"] == best)  # ties -> lowest index
        assert e["macs"] <= e["budget"] * (1 + 1e-9)  # every iteration met its own budget
    assert entries[0]["budget_ratio"] == pytest.approx(0.85)
    assert all(a["budget"] > b["budget"] for a, b in zip(entries, entries[1:]))
    md = (tmp_path / "wd" / "log.md").read_text()
    assert md.count("\n| ") == len(entries) + 1 and "done:" in md
    state = json.loads((tmp_path / "wd" / "state.json").read_text())
    assert state["done"] and state["iteration"] == len(entries)
    rec = json.loads((tmp_path / "wd" / "record.json").read_text())
    assert len(rec) == len(model._prunekit_record)


def test_proposals_are_the_smallest_cut_of_the_lowest_ranked_units(tmp_path):
    """With round_to=1 each candidate cuts exactly enough units: one unit fewer misses the budget."""
    model = make()
    ap = pk.AdaptivePruner(model, X_EXAMPLE, pk.FlopsTarget(0.8), finetune, evaluate, delta_crop=0.1)
    graph = ap._pruner.graph
    ap.base = graph.macs()
    goal = 0.9 * ap.base
    cands = ap._candidates(graph, goal)
    assert [n for n, _ in cands] == ["stage1.0.0", "stage1.1.0", "stage2.0.0", "stage2.1.0"]
    met = 0
    for _, kept in cands:
        if kept is None:
            continue
        met += 1
        (gid, k), = kept.items()
        assert graph.macs_kept({gid: k}) <= goal < graph.macs_kept({gid: k + 1})
    assert met >= 2


def test_ties_go_to_the_lowest_candidate_index():
    ap, _ = run(eval_fn=constant_eval, target=pk.FlopsTarget(0.6))
    for e in ap.history:
        assert e["chosen"] == min(c["index"] for c in e["candidates"] if c["metric"] is not None)
        assert e["metric"] == 1.0


# ---------------------------------------------------------------- resume
def test_resume_after_a_crash_gives_the_same_model_as_an_uninterrupted_run(tmp_path):
    ap_ref, ref = run(tmp_path, "ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, "crash", finetune_fn=finetune_crash_at_2)
    state = json.loads((tmp_path / "crash" / "state.json").read_text())
    assert state["iteration"] == 1 and not state["done"]
    assert len(read_log(tmp_path / "crash")) == 1
    ap, resumed = run(tmp_path, "crash")  # a freshly built original model
    assert [e["chosen_name"] for e in ap.history] == [e["chosen_name"] for e in ap_ref.history]
    a, b = ref.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(read_log(tmp_path / "crash")) == len(ap_ref.history)


def test_finished_run_returns_at_once_without_finetuning(tmp_path):
    FINAL_CALLS.clear()
    _, ref = run(tmp_path, final_finetune_fn=final_finetune)
    assert FINAL_CALLS == [sum(p.numel() for p in ref.parameters())]  # once, on the pruned model
    ap, again = run(tmp_path, finetune_fn=finetune_must_not_run, final_finetune_fn=final_must_not_run)
    assert ap.done and conv_widths(again) == conv_widths(ref)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_other_model_or_settings_in_the_workdir_are_refused(tmp_path):
    run(tmp_path)
    with pytest.raises(WorkdirError, match="started from a different model"):
        run(tmp_path, model=make((16, 24, 32, 32)))
    with pytest.raises(WorkdirError, match="other settings.*budget"):
        run(tmp_path, target=pk.FlopsTarget(0.6))
    pruned = make()
    pk.Pruner(pruned, X_EXAMPLE, "l2", 0.25).prune()
    with pytest.raises(WorkdirError, match="unpruned"):
        run(tmp_path, "other", model=pruned)


# ---------------------------------------------------------------- parallel
def test_parallel_workers_choose_the_same_candidates_as_serial(tmp_path):
    ap1, serial = run(target=pk.FlopsTarget(0.6))
    ap2, parallel = run(target=pk.FlopsTarget(0.6), workers=2)
    assert [e["chosen_name"] for e in ap1.history] == [e["chosen_name"] for e in ap2.history]
    for e1, e2 in zip(ap1.history, ap2.history):
        m1 = [c["metric"] for c in e1["candidates"]]
        m2 = [c["metric"] for c in e2["candidates"]]
        assert [m is None for m in m1] == [m is None for m in m2]
        assert [m for m in m1 if m is not None] == pytest.approx([m for m in m2 if m is not None], rel=1e-6)
    assert conv_widths(serial) == conv_widths(parallel)


def test_workers_need_picklable_functions():
    with pytest.raises(TypeError, match="module-level"):
        pk.AdaptivePruner(make(), X_EXAMPLE, pk.FlopsTarget(0.5), lambda m, i, c: None, evaluate, workers=2)


# ---------------------------------------------------------------- latency
def test_latency_table_interpolates_and_keeps_savings_monotone():
    t = LatencyTable(100.0, {"a": {"size": 8, "fractions": [1.0, 0.5], "ms": [10.0, 6.0]},
                             "b": {"size": 4, "fractions": [1.0, 0.5], "ms": [5.0, 7.0]}}, {})
    assert t.saving("a", 8) == 0.0
    assert t.saving("a", 6) == pytest.approx(2.0)  # between grid points
    assert t.saving("a", 2) == pytest.approx(6.0)  # extrapolated below the grid
    assert t.saving("b", 2) == 0.0  # a slower narrow layer (noise) never counts as a loss
    assert t.predict({"a": 4, "b": 4, "unknown": 1}) == pytest.approx(96.0)


def test_latency_budget_uses_the_cached_table_and_logs_measured_latency(tmp_path):
    MEASURED.clear()
    ap, model = run(tmp_path, target=pk.LatencyTarget(0.7), measure_fn=fake_ms, delta_crop=0.1)
    assert "Conv2d" in MEASURED and "BatchNorm2d" in MEASURED  # per-layer timings
    base = fake_ms(make(), X_EXAMPLE)
    assert ap.table.baseline_ms == pytest.approx(base)
    assert fake_ms(model, X_EXAMPLE) <= 0.7 * base + 1e-9
    for e in read_log(tmp_path / "wd"):
        assert e["latency_predicted"] <= e["budget"] + 1e-9
        assert e["latency_measured"] == pytest.approx(e["latency_predicted"])  # the fake cost is additive
        assert all(c.get("latency_predicted") is not None for c in e["candidates"] if c["metric"] is not None)
    cache = json.loads((tmp_path / "wd" / "latency_table.json").read_text())
    assert len(cache["tables"]) == 1
    # the cached table is reused: only whole-model cross-checks are measured now
    MEASURED.clear()
    ap2, _ = run(latency_table=tmp_path / "wd" / "latency_table.json", target=pk.LatencyTarget(0.7),
                 measure_fn=fake_ms, delta_crop=0.1)
    assert set(MEASURED) == {"SmallCNN"} and len(MEASURED) == len(ap2.history)


# ---------------------------------------------------------------- constraints and granularity
def test_round_to_is_respected_by_every_cut_and_the_final_pass(tmp_path):
    ap, model = run(tmp_path, round_to=4, target=pk.FlopsTarget(0.6))
    widths = conv_widths(model)
    assert all(w % 4 == 0 for w in widths.values()), widths  # 30 was rounded down at the end
    for e in ap.history:
        for c in e["candidates"]:
            assert c["kept"] is None or all(k % 4 == 0 for k in c["kept"])
    assert pk.count(model, X_EXAMPLE).macs <= 0.6 * pk.count(make(), X_EXAMPLE).macs
    _, unrounded = run(round_to=4, target=pk.FlopsTarget(0.6), final_round=False)
    assert conv_widths(unrounded)["stage2.1.0"] == 30  # never a good candidate: only the final pass rounds it


def test_ignored_layers_keep_their_channels():
    ap, model = run(ignore=["stage2.0.*"], target=pk.FlopsTarget(0.6))
    assert conv_widths(model)["stage2.0.0"] == 32
    assert all("stage2.0" not in c["name"] for e in ap.history for c in e["candidates"])
    with pytest.raises(ValueError, match="not reachable"):
        run(ignore=["stage1.*", "stage2.0.*"], target=pk.FlopsTarget(0.2))


def test_block_granularity_prunes_whole_stages_with_the_default_eval():
    base = pk.count(make(), X_EXAMPLE).macs
    ap, model = run(granularity="block", eval_fn=None, finetune_fn=None, target=pk.ParamsTarget(0.6))
    assert {c["name"] for e in ap.history for c in e["candidates"]} == {"stage1", "stage2"}
    assert sum(p.numel() for p in model.parameters()) <= 0.6 * sum(p.numel() for p in make().parameters())
    assert pk.count(model, X_EXAMPLE).macs < base
    assert all(e["metric"] <= 0.0 for e in ap.history)  # minus the output error against the original


def test_bad_arguments_are_explained():
    with pytest.warns(DeprecationWarning, match="target"), pytest.raises(ValueError, match="budget must be"):
        pk.AdaptivePruner(make(), X_EXAMPLE, ("macs", 0.5))  # the old (kind, ratio) spelling, with a wrong kind
    with pytest.raises(ValueError, match="delta_crop"):
        pk.AdaptivePruner(make(), X_EXAMPLE, pk.FlopsTarget(0.5), delta_crop=0)
    with pytest.raises(ValueError, match="granularity"):
        pk.AdaptivePruner(make(), X_EXAMPLE, pk.FlopsTarget(0.5), granularity="layer")
