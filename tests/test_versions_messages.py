"""Messages a new user reads (output reasons, --help, the root module's name, unknown models, target ranges,
unreachable targets) and plans with non-integer or duplicate unit indices."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.algorithms.targets import ChannelRatio, FlopsTarget, LatencyTarget, ParamsTarget
from tests.zoo import tricky_models as T


class RootScale(nn.Module):
    """A parameter owned by the root module (name "") next to the model output, and one in a hidden stream."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.hidden_gain = nn.Parameter(torch.rand(6) + 0.5)
        self.out = nn.Linear(6, 5)
        self.scale = nn.Parameter(torch.rand(5) + 0.5)

    def forward(self, x):
        return self.out(torch.relu(self.fc(x)) * self.hidden_gain) * self.scale


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.a(h), {"logits": self.b(h)}


# ---------------------------------------------------------------- (a) output reasons
def test_single_output_reason_reads_well():
    graph = pk.analyze(RootScale(), torch.randn(2, 4))
    reasons = {g.reason for g in graph.groups if not g.prunable}
    assert "model output keeps its shape (pass prune_outputs=True to allow)" in reasons
    assert not any("output output" in r for r in reasons)
    assert "output output" not in graph.summary()
    g2 = pk.analyze(RootScale(), torch.randn(2, 4), prune_outputs=True)
    assert not any("output output" in r for g in g2.groups for r in [g.reason, *g.inexact_reasons])


def test_nested_outputs_are_named_by_path():
    graph = pk.analyze(TwoHeads(), torch.randn(2, 4))
    reasons = {g.reason for g in graph.groups if not g.prunable}
    assert any(r.startswith("model output [0] keeps its shape") for r in reasons), reasons
    assert any(r.startswith("model output [1]['logits'] keeps its shape") for r in reasons), reasons


# ---------------------------------------------------------------- (b) --help is plain text
def test_help_has_no_rest_markup():
    from prunekit.cli.main import build_parser
    parser, subs = build_parser()
    texts = [parser.format_help(), *(s.format_help() for s in subs.values())]
    assert len(texts) >= 4
    for text in texts:
        assert "``" not in text, text
    assert "The prunekit command" in texts[0]


# ---------------------------------------------------------------- (c) the root module's name
def test_root_module_is_named_in_tables():
    from prunekit.cli.main import _pinned, _pinned_text
    model = RootScale()
    graph = pk.analyze(model, torch.randn(2, 4))
    rooted = [g for g in graph.groups if "" in g.modules]
    assert rooted and any(g.prunable for g in rooted) and any(not g.prunable for g in rooted)
    for g in rooted:
        assert "" in g.modules  # the data keeps the real name (model.get_submodule(""))
    rows = [ln for ln in graph.summary().splitlines() if re.match(r"^\d+ ", ln)]
    assert any("<root>" in r for r in rows)
    assert not any(re.search(r"\s, |, ,|, $", r) for r in rows), rows  # no empty name in a module list
    for g in rooted:
        if g.prunable:
            d = g.describe()
            assert "<root>" in d and ", ," not in d and not re.search(r"(source|dependents) ,", d), d
            assert any("<root>" in line for line in graph.log_groups())
    text = "\n".join(_pinned_text(_pinned(graph)))
    assert "<root>" in text and "[, " not in text and ", ]" not in text and ", ," not in text, text


def test_root_module_in_summary_of_free_params():
    graph = pk.analyze(T.FreeParams(), torch.randn(2, 3, 8, 8))
    rows = [ln for ln in graph.summary().splitlines() if re.match(r"^\d+ ", ln)]
    assert any("<root>" in r for r in rows)
    assert not any(re.search(r"\s, |, ,|, $", r) for r in rows), rows


# ---------------------------------------------------------------- (d) unknown model names
@pytest.mark.parametrize("source", ["timm", "torchvision"])
def test_unknown_model_suggests_close_names_and_a_pattern_that_matches(source):
    pytest.importorskip(source)
    from prunekit.cli.common import CLIError
    from prunekit.cli.models import list_models, load_model
    with pytest.raises(CLIError) as ei:
        load_model(f"{source}:resnet5000", None)
    msg = str(ei.value)
    assert "resnet5000*" not in msg
    assert f"{source}:resnet50" in msg, msg
    pat = re.search(r"list-models '([^']+)'", msg)
    assert pat, msg
    assert sum(len(v) for v in list_models(pat.group(1)).values()) > 0


def test_unknown_model_without_close_names_suggests_no_empty_pattern():
    pytest.importorskip("timm")
    from prunekit.cli.common import CLIError
    from prunekit.cli.models import list_models, load_model
    with pytest.raises(CLIError) as ei:
        load_model("timm:qqzzxxyy", None)
    msg = str(ei.value)
    for pat in re.findall(r"list-models '([^']+)'", msg):
        assert sum(len(v) for v in list_models(pat).values()) > 0, msg


# ---------------------------------------------------------------- (e) one message per target range
@pytest.mark.parametrize("cls", [FlopsTarget, ParamsTarget, LatencyTarget])
@pytest.mark.parametrize("bad", [1.5, 0.0, -0.2, float("nan"), "x", True])
def test_keep_targets_one_message(cls, bad):
    with pytest.raises(ValueError) as ei:
        cls(bad)
    msg = str(ei.value)
    assert msg.startswith(f"{cls.__name__}: ratio (the fraction of the ")
    assert f"KEPT) must be in (0, 1], got {bad!r}" in msg, msg


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), None])
def test_channel_ratio_one_message(bad):
    with pytest.raises(ValueError, match=re.escape(f"ChannelRatio: ratio (the fraction of units removed) must be in "
                                                   f"[0, 1), got {bad!r}")):
        ChannelRatio(bad)


def test_valid_targets_still_accepted():
    assert FlopsTarget(1).ratio == 1.0 and ParamsTarget(0.25).ratio == 0.25 and ChannelRatio(0).ratio == 0.0
    assert FlopsTarget(np.float64(0.5)).sparsity == pytest.approx(0.5)


# ---------------------------------------------------------------- (f) unreachable targets state the floor
def _floor(msg: str) -> float:
    m = re.search(r"the smallest reachable is \w+\(([\d.]+)\)", msg)
    assert m, msg
    return float(m.group(1))


@pytest.mark.parametrize("kw", [dict(max_ratio=0.5), dict(round_to=4), dict(global_pruning=True, max_ratio=0.3)])
@pytest.mark.parametrize("cls", [FlopsTarget, ParamsTarget])
def test_unreachable_target_states_the_smallest_reachable(kw, cls):
    torch.manual_seed(0)
    model, x = T.PlainCNN(), torch.randn(1, 3, 8, 8)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="is not reachable") as ei:
        pk.Pruner(model, x, "l2", cls(0.01), **kw).prune()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    floor = _floor(str(ei.value))
    assert 0.01 < floor < 1
    assert f"ratio >= {floor:.4g}" in str(ei.value)
    assert pk.Pruner(model, x, "l2", cls(floor), **kw).plan()  # the stated floor is reachable
    with pytest.raises(ValueError, match="is not reachable"):  # and it is the floor
        pk.Pruner(model, x, "l2", cls(floor - 0.002), **kw).plan()


# ---------------------------------------------------------------- 4. plans with non-integer or duplicate units
@pytest.fixture()
def cnn():
    torch.manual_seed(0)
    model, x = T.PlainCNN().eval(), torch.randn(1, 3, 8, 8)
    return model, x, pk.analyze(model, x)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, state):
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(sd[k].shape == state[k].shape and torch.equal(sd[k], state[k])
                                             for k in state)


@pytest.mark.parametrize("apply", ["prune", "mask"])
@pytest.mark.parametrize("units, match", [
    ([0.5, 1.0], r"unit indices must be integers, got 0\.5"),
    ([1, 2.0], r"unit indices must be integers, got 2\.0"),
    ([True, 2], r"unit indices must be integers, got True"),
    ([np.True_], r"unit indices must be integers"),
    (torch.tensor([0.0, 1.0]), r"unit indices must be integers, got a torch\.float32 tensor"),
    (torch.tensor([True, False]), r"unit indices must be integers, got a torch\.bool tensor"),
    ([torch.tensor(1.5)], r"unit indices must be integers"),
    ([1, 1], r"unit 1 listed more than once"),
    ([3, 0, 3, 0, 2], r"unit 0, 3 listed more than once"),
    (torch.tensor([2, 2]), r"unit 2 listed more than once"),
])
def test_plan_units_must_be_distinct_integers(cnn, apply, units, match):
    model, x, graph = cnn
    g = graph.prunable_groups[0]
    before = _state(model)
    with pytest.raises(ValueError, match=f"group {g.id}: {match}"):
        getattr(pk, apply)(model, graph, {g.id: units})
    assert _same(model, before)
    assert not getattr(model, "_prunekit_record", None) and not getattr(model, "_prunekit_masks", None)


def test_integer_units_of_any_kind_are_accepted(cnn):
    model, x, graph = cnn
    g0, g1 = graph.prunable_groups[:2]
    plan = {g0.id: torch.tensor([0, 2]), g1.id: [np.int64(1), torch.tensor(3)]}
    expect = graph.macs({g0.id: [0, 2], g1.id: [1, 3]})
    pk.prune(model, graph, plan)
    assert pk.count(model, x).macs == expect


def test_group_slices_use_the_same_check(cnn):
    _, _, graph = cnn
    g = graph.prunable_groups[0]
    with pytest.raises(ValueError, match="must be integers"):
        g.slices([0.5])
    with pytest.raises(ValueError, match="more than once"):
        g.slices([1, 1])
    with pytest.raises(TypeError, match="iterable of ints"):
        g.slices(3)


def test_hf_model_with_a_transformers_that_cannot_use_this_torch(monkeypatch):
    """transformers 5 on torch < 2.6 imports but disables its PyTorch models: the CLI says so."""
    transformers = pytest.importorskip("transformers")
    from prunekit.cli import models
    from prunekit.cli.common import CLIError
    from prunekit.cli.models import load_model
    # patch prunekit's probe, not transformers (whose lazy imports would cache a torch-less module)
    monkeypatch.setattr(models, "_transformers_uses_torch", lambda: False)
    with pytest.raises(CLIError, match=rf"transformers {re.escape(transformers.__version__)} cannot use torch"):
        load_model("hf:llama", None)
