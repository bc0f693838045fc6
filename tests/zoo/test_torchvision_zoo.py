"""Every torchvision classification model: analyse, prune 30-50% of each prunable group, verify exactly.

CI runs a representative subset; ``pytest -m slow`` runs all of them.
"""
from __future__ import annotations

import pytest
import torch

tv = pytest.importorskip("torchvision")

from ._common import prune_and_check  # noqa: E402

ALL = sorted(tv.models.list_models(module=tv.models))
CI_SUBSET = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1",
             "densenet121", "efficientnet_b0", "regnet_x_400mf", "mnasnet0_5", "vit_b_16", "convnext_tiny",
             "swin_t", "googlenet", "alexnet"]
SLOW_ONLY = [n for n in ALL if n not in CI_SUBSET]


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
    return graph


@pytest.mark.parametrize("name", [n for n in CI_SUBSET if n in ALL])
def test_torchvision_subset(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_ONLY)
def test_torchvision_all(name):
    _check(name)
