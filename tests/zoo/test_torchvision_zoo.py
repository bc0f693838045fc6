"""Every torchvision classification model: analyse, prune 30-50% of each prunable group, verify exactly.

CI runs a representative subset; ``pytest -m slow`` runs all of them.
"""
from __future__ import annotations

import pytest
import torch

tv = pytest.importorskip("torchvision")

from ._common import assert_share_floor, prune_and_check  # noqa: E402

ALL = sorted(tv.models.list_models(module=tv.models))
CI_SUBSET = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
             "densenet121", "efficientnet_b0", "regnet_x_400mf", "mnasnet0_5", "vit_b_16", "convnext_tiny",
             "swin_t", "googlenet", "alexnet"]
SLOW_ONLY = [n for n in ALL if n not in CI_SUBSET]


# graph.prunable_proportion (share of the model's FLOPs in prunable groups) of every torchvision model, measured
# on the current code (torch 2.14.1; analysis only, the input of _input_for).  A model may not fall below its
# figure by more than MARGIN, so a model whose groups all get pinned fails (the groups check alone passes then).
PRUNABLE_FLOPS = {
    "alexnet": 0.9984, "convnext_base": 0.9994, "convnext_large": 0.9996, "convnext_small": 0.9991,
    "convnext_tiny": 0.9983, "densenet121": 0.9992, "densenet161": 0.9997, "densenet169": 0.9993,
    "densenet201": 0.9994, "efficientnet_b0": 0.9984, "efficientnet_b1": 0.9986, "efficientnet_b2": 0.9988,
    "efficientnet_b3": 0.9992, "efficientnet_b4": 0.9994, "efficientnet_b5": 0.9995, "efficientnet_b6": 0.9997,
    "efficientnet_b7": 0.9997, "efficientnet_v2_l": 0.9999, "efficientnet_v2_m": 0.9998,
    "efficientnet_v2_s": 0.9997, "googlenet": 0.9987, "inception_v3": 0.9998, "maxvit_t": 0.7602,
    "mnasnet0_5": 0.9936, "mnasnet0_75": 0.9969, "mnasnet1_0": 0.9979, "mnasnet1_3": 0.9987, "mobilenet_v2": 0.998,
    "mobilenet_v3_large": 0.9971, "mobilenet_v3_small": 0.9925, "regnet_x_16gf": 1.0, "regnet_x_1_6gf": 0.9997,
    "regnet_x_32gf": 1.0, "regnet_x_3_2gf": 0.9998, "regnet_x_400mf": 0.999, "regnet_x_800mf": 0.9995,
    "regnet_x_8gf": 0.9999, "regnet_y_128gf": 1.0, "regnet_y_16gf": 1.0, "regnet_y_1_6gf": 0.9997,
    "regnet_y_32gf": 1.0, "regnet_y_3_2gf": 0.9998, "regnet_y_400mf": 0.9989, "regnet_y_800mf": 0.9995,
    "regnet_y_8gf": 0.9999, "resnet101": 0.9997, "resnet152": 0.9998, "resnet18": 0.9989, "resnet34": 0.9994,
    "resnet50": 0.9995, "resnext101_32x8d": 0.9999, "resnext101_64x4d": 0.9999, "resnext50_32x4d": 0.9995,
    "shufflenet_v2_x0_5": 0.9552, "shufflenet_v2_x1_0": 0.9523, "shufflenet_v2_x1_5": 0.9512,
    "shufflenet_v2_x2_0": 0.9548, "squeezenet1_0": 0.9973, "squeezenet1_1": 0.9978, "swin_b": 0.6389,
    "swin_s": 0.6343, "swin_t": 0.6172, "swin_v2_b": 0.5812, "swin_v2_s": 0.5758, "swin_v2_t": 0.565,
    "vgg11": 0.9998, "vgg11_bn": 0.9998, "vgg13": 0.9998, "vgg13_bn": 0.9998, "vgg16": 0.9999, "vgg16_bn": 0.9999,
    "vgg19": 0.9999, "vgg19_bn": 0.9999, "vit_b_16": 0.9999, "vit_b_32": 1.0, "vit_h_14": 1.0, "vit_l_16": 1.0,
    "vit_l_32": 1.0, "wide_resnet101_2": 0.9999, "wide_resnet50_2": 0.9998,
}


def _input_for(name: str) -> torch.Tensor:
    size = 299 if name.startswith("inception") else 224
    return torch.randn(1, 3, size, size)


def _build(name: str):
    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return tv.models.get_model(name, weights=None, **kw)


def _check(name: str):
    model = _build(name)
    x = _input_for(name)
    graph, plan = prune_and_check(model, x, factory=lambda: _build(name))
    assert graph.prunable_groups, f"{name}: no prunable group"
    assert name in PRUNABLE_FLOPS, f"{name}: no recorded prunable-FLOPs figure"
    assert_share_floor(name, graph, PRUNABLE_FLOPS)
    return graph


def test_every_model_has_a_measured_share():
    assert set(ALL) <= set(PRUNABLE_FLOPS), sorted(set(ALL) - set(PRUNABLE_FLOPS))


@pytest.mark.parametrize("name", [n for n in CI_SUBSET if n in ALL])
def test_torchvision_subset(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_ONLY)
def test_torchvision_all(name):
    _check(name)
