"""benchmarks/detection_quality.py: the synthetic shapes and the mAP it reports (ultralytics optional)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ultralytics")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import detection_quality as dq  # noqa: E402


def _gt_as_detections(b, shift=0.0, conf=None):
    out = []
    for i in range(len(b["img"])):
        sel = b["batch_idx"] == i
        boxes = dq.xywhn_to_xyxy(b["bboxes"][sel], dq.SIZE) + shift
        c = torch.ones(len(boxes)) if conf is None else conf[: len(boxes)]
        out.append(torch.cat([boxes, c[:, None], b["cls"][sel]], 1))
    return out


def test_shapes_are_deterministic_and_boxes_inside_the_image():
    a, b = dq.shapes_batch(4, 7), dq.shapes_batch(4, 7)
    assert torch.equal(a["img"], b["img"]) and torch.equal(a["bboxes"], b["bboxes"])
    assert not torch.equal(a["img"], dq.shapes_batch(4, 8)["img"])
    xyxy = dq.xywhn_to_xyxy(a["bboxes"], dq.SIZE)
    assert (xyxy >= -1e-4).all() and (xyxy <= dq.SIZE + 1e-4).all()
    assert set(a["batch_idx"].tolist()) == {0.0, 1.0, 2.0, 3.0} and set(a["cls"][:, 0].tolist()) <= {0.0, 1.0, 2.0}
    # the object is drawn: inside a box the image differs from the background statistics
    assert a["img"].std() > 0.1


def test_mean_ap_is_one_for_the_ground_truth_and_falls_with_worse_boxes():
    val = [dq.shapes_batch(8, 1), dq.shapes_batch(8, 2)]
    perfect = dq.mean_ap([_gt_as_detections(b) for b in val], val)
    assert perfect["map50"] > 0.99 and perfect["map50_95"] > 0.99
    shifted = dq.mean_ap([_gt_as_detections(b, shift=3.0) for b in val], val)
    assert shifted["map50_95"] < perfect["map50_95"] - 0.05 and shifted["map50"] > 0.5
    wrong = [[torch.cat([d[:, :5], (d[:, 5:] + 1) % dq.NC], 1) for d in _gt_as_detections(b)] for b in val]
    assert dq.mean_ap(wrong, val)["map50"] < 0.01


def test_match_one_prediction_per_box():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    pred = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])  # a duplicate is a false positive
    m = dq.match(pred, torch.tensor([1.0, 1.0]), gt, torch.tensor([1.0]), torch.tensor([0.5]))
    assert m[:, 0].tolist() == [True, False]
