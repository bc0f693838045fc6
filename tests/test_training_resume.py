"""TrainingPruner checkpoints resume like the other long runs: fingerprinted (model architecture and config), a
mismatch raises ResumeError before the model is touched."""
from __future__ import annotations

import pytest
import torch

import prunekit as pk
from prunekit.runs import ResumeError

from .test_training import BASE_CFG, tiny


def _started(tmp_path, cfg=BASE_CFG, width=8):
    model, x = tiny(width=width)
    tp = pk.TrainingPruner(model, dict(cfg), example_inputs=x)
    for epoch in range(3):
        tp.step(epoch)
    path = tmp_path / "mid.pt"
    tp.save_checkpoint(path)
    return tp, path, x


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_with_the_same_model_and_config(tmp_path):
    tp, path, x = _started(tmp_path)
    model2, _ = tiny(seed=3)
    tp2 = pk.TrainingPruner(model2, dict(BASE_CFG), example_inputs=x)
    tp2.load_checkpoint(path)
    assert tp2.last_epoch == tp.last_epoch == 2


def test_resume_with_another_config_is_refused(tmp_path):
    _, path, x = _started(tmp_path)
    model2, _ = tiny(seed=3)
    before = _weights(model2)
    tp2 = pk.TrainingPruner(model2, dict(BASE_CFG, target=0.7), example_inputs=x)
    with pytest.raises(ResumeError, match=r"other settings \(target: saved 0.5, now 0.7\)"):
        tp2.load_checkpoint(path)
    assert tp2.last_epoch is None and all(torch.equal(v, before[k]) for k, v in model2.state_dict().items())


def test_resume_with_another_model_is_refused(tmp_path):
    _, path, x = _started(tmp_path)
    model2, _ = tiny(width=12)
    tp2 = pk.TrainingPruner(model2, dict(BASE_CFG), example_inputs=x)
    with pytest.raises(ResumeError, match="different model.*saved \\[\\[8, 3, 3, 3\\]"):
        tp2.load_checkpoint(path)
