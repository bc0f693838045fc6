"""prunekit's own DeprecationWarnings are errors in the test suite (pyproject ``filterwarnings``), so a test that
uses an old spelling fails unless it expects the warning; the old spellings without a test elsewhere are here."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.algorithms.training import load_config


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def test_an_old_spelling_outside_pytest_warns_fails_the_test():
    with pytest.raises(DeprecationWarning, match="SlicePruning is deprecated; use prunekit.SlicePruner"):
        pk.SlicePruning(net())
    with pytest.raises(DeprecationWarning, match="target_flops_ratio"):
        pk.LearnedPruner(net(), torch.randn(1, 3, 8, 8), target_flops_ratio=0.5, num_steps=10)


def test_other_deprecation_warnings_are_left_alone():
    with pytest.warns(DeprecationWarning, match="some other library"):
        warnings.warn("some other library's function is deprecated", DeprecationWarning)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        warnings.warn("old_thing is deprecated, use new_thing", DeprecationWarning)  # not prunekit's wording
    assert len(seen) == 1


def test_config_key_max_pruning_rate_is_max_ratio():
    with pytest.warns(DeprecationWarning, match="'max_pruning_rate' is deprecated; use 'max_ratio'"):
        cfg = load_config({"target": 0.5, "max_pruning_rate": 0.3})
    assert cfg["max_ratio"] == 0.3
    with pytest.warns(DeprecationWarning, match="'mac_target' is deprecated; use 'target'"):
        assert cfg["mac_target"] == 0.5  # reading the old key of a loaded config
