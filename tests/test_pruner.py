"""pk.Pruner and targets: target accuracy, constraints (round_to, max_ratio, ignore, per-module ratios), errors."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk

sys.path.insert(0, str(Path(__file__).parent / "zoo"))
from tricky_models import TRICKY  # noqa: E402


def resnet():
    import torchvision
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), torch.randn(1, 3, 32, 32)


def channel_widths(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_float_target_is_channel_ratio_and_local_ratio_is_per_group():
    model, x = resnet()
    p = pk.Pruner(model, x, "l2", 0.5)
    assert p.target == pk.ChannelRatio(0.5)
    before = channel_widths(copy.deepcopy(model))
    p.prune()
    after = channel_widths(model)
    changed = [n for n in before if before[n] != after[n]]
    assert changed
    for n in changed:
        assert after[n] == before[n] // 2, n
    assert model(x).shape == (1, 1000)


@pytest.mark.parametrize("glob", [False, True])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_flops_target_met_within_one_round_to_step(glob, ratio):
    model, x = resnet()
    p = pk.Pruner(model, x, "l2", pk.FlopsTarget(ratio), global_pruning=glob, round_to=8)
    base = pk.count(model, x).macs
    p.prune()
    macs = pk.count(model, x).macs
    assert macs <= base * ratio * 1.0001
    # one round_to step more on the largest group would exceed it: we are within one step of the target
    step_macs = max(p.graph.macs() - p.graph.macs({g.id: min(8, g.size - 1)}) for g in p.graph.prunable_groups)
    assert macs >= base * ratio - step_macs


def test_params_target():
    model, x = resnet()
    base = sum(t.numel() for t in model.parameters())
    pk.Pruner(model, x, "l1", pk.ParamsTarget(0.4), global_pruning=True).prune()
    n = sum(t.numel() for t in model.parameters())
    assert 0.38 * base <= n <= 0.4 * base


def test_round_to_and_never_zero_width():
    model, x = resnet()
    pk.Pruner(model, x, "l2", 0.9, round_to=8).prune()
    for n, w in channel_widths(model).items():
        assert w >= 8 and w % 8 == 0, (n, w)


def test_max_ratio_caps_each_group():
    model, x = resnet()
    before = channel_widths(copy.deepcopy(model))
    pk.Pruner(model, x, "l2", pk.FlopsTarget(0.2), global_pruning=True, max_ratio=0.6).prune()
    after = channel_widths(model)
    for n in before:
        assert after[n] >= before[n] * 0.4 - 1e-9, n


def test_ignore_by_pattern_and_object_and_per_module_ratio():
    model, x = resnet()
    before = channel_widths(copy.deepcopy(model))
    p = pk.Pruner(model, x, "l2", 0.5, ignore=["layer4.*", model.layer3[0].conv1],
                  ratios={"layer1.0.conv1": 0.25})
    p.prune()
    after = channel_widths(model)
    assert after["layer4.0.conv1"] == before["layer4.0.conv1"]
    assert after["layer4.1.conv1"] == before["layer4.1.conv1"]
    assert after["layer3.0.conv1"] == before["layer3.0.conv1"]
    assert after["layer2.0.conv1"] == before["layer2.0.conv1"] // 2
    assert after["layer1.0.conv1"] == before["layer1.0.conv1"] * 3 // 4


def test_unreachable_target_is_a_clear_error_and_model_untouched():
    model, x = resnet()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    p = pk.Pruner(model, x, "l2", pk.FlopsTarget(0.05), max_ratio=0.5)
    assert p.prunable_proportion < 0.95
    with pytest.raises(ValueError, match="not reachable"):
        p.prune()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_bad_ratio(bad):
    model, x = resnet()
    with pytest.raises(ValueError, match="ratio"):
        pk.Pruner(model, x, "l2", bad)


def test_missing_example_inputs_and_data_for_data_criteria():
    model, _ = resnet()
    with pytest.raises(ValueError, match="example_inputs"):
        pk.Pruner(model, None)
    with pytest.raises(ValueError, match="needs data"):
        pk.Pruner(model, torch.randn(1, 3, 32, 32), "taylor", 0.5)


def test_steps_towards_flops_target_are_relative_to_the_original():
    model, x = resnet()
    p = pk.Pruner(model, x, "l2", pk.FlopsTarget(0.4))
    for s in (0.2, 0.4, 0.6):
        p.step(s)
        assert p.graph.macs() <= p.base_macs * (1 - s) * 1.0001
    assert len(p.history) == 3


def test_lowest_scores_go():
    """With a criterion that scores unit i as i, units 0..n-1 are removed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(1, 3, 8, 8)

    class Index(pk.Criterion):
        name = "index"

        def scores(self, model, graph, groups=None, **kw):
            return {g.id: torch.arange(g.size, dtype=torch.float) for g in (groups or graph.prunable_groups)}

    w = model[0].weight.detach().clone()
    pk.Pruner(model, x, Index(), 0.5).prune()
    assert torch.equal(model[0].weight, w[4:])


@pytest.mark.parametrize("name", ["residual_add", "dense_concat", "depthwise", "matmul_attention", "sdpa_attention",
                                  "shuffle_view"])
def test_pruner_on_tricky_models(name):
    factory, inp = TRICKY[name]
    torch.manual_seed(0)
    model = factory().eval()
    x = inp(2)
    p = pk.Pruner(model, x, "l2", pk.FlopsTarget(0.7), global_pruning=True)
    p.prune()
    assert p.graph.macs() <= p.base_macs * 0.7 * 1.0001 or p.prunable_proportion < 0.3


@pytest.mark.parametrize("attention", ["head_dim", "heads"])
def test_channel_ratio_on_attention_does_not_compound(attention):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    heads_before = model.blocks[0].attn.num_heads
    pk.Pruner(model, x, "l2", 0.5, attention=attention).prune()
    attn = model.blocks[0].attn
    if attention == "heads":  # 3 heads x 64: half of 3 heads (rounded) go, head_dim untouched
        assert attn.num_heads == 1 and attn.head_dim == 64 and attn.qkv.out_features == 3 * 64
    else:  # half of the 192-wide attention, not a quarter
        assert attn.num_heads == heads_before and attn.head_dim == 32 and attn.qkv.out_features == 3 * 96
    assert model(x).shape == (1, 10)


def test_latency_target_measures_with_pk_latency():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    p = pk.Pruner(model, torch.randn(1, 3, 8, 8), "l2", pk.LatencyTarget(0.9, repeats=3))
    assert isinstance(p.base_latency, float) and p.base_latency > 0
