"""torchvision detection and segmentation models, pruned as they are (issue 15).

Each model (random weights, small input) is analysed with the plain call -- no forward_fn, no ignore list --
pruned with a random 30% plan (verified by pk.prune on the outputs before post-processing), and its full eval
forward must keep its structure (same keys, same per-box shapes).  A FLOPs target is met within one rounding step.
CI runs a representative subset; ``pytest -m slow`` runs the rest.
"""
from __future__ import annotations

import pytest
import torch

tv = pytest.importorskip("torchvision")

import prunekit as pk  # noqa: E402
from prunekit.detection.torchvision import head_outputs  # noqa: E402

from torchvision.models import detection as D, segmentation as S  # noqa: E402

SIZE = 224
_R50 = dict(min_size=SIZE, max_size=SIZE)
DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": {},
    "ssdlite320_mobilenet_v3_large": {},
    "fasterrcnn_resnet50_fpn": _R50,
    "retinanet_resnet50_fpn": _R50,
    "fcos_resnet50_fpn": _R50,
    "ssd300_vgg16": {},
    "maskrcnn_resnet50_fpn": _R50,
    "keypointrcnn_resnet50_fpn": dict(_R50, num_classes=2, num_keypoints=5),
}
SEGMENTERS = ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"]
CI = {"fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large", "lraspp_mobilenet_v3_large"}


# models with a known open defect: xfail(strict) with the reason (none now; FCOS's regression tower failed the
# shape-only check of inexact groups until 2026-12-03: allclose with rtol=inf is False where ReLU outputs are 0)
KNOWN: dict[str, str] = {}


def _param(names):
    return [pytest.param(n, marks=(() if n in CI else (pytest.mark.slow,))
                         + ((pytest.mark.xfail(reason=KNOWN[n], strict=True),) if n in KNOWN else ()))
            for n in names]


def _build(name):
    torch.manual_seed(0)
    if name in DETECTORS:
        kw = dict(weights=None, weights_backbone=None, num_classes=5)
        kw.update(DETECTORS[name])
        return getattr(D, name)(**kw).eval(), [torch.rand(3, SIZE, SIZE)]
    kw = dict(weights=None, weights_backbone=None, num_classes=4)
    if not name.startswith("lraspp"):
        kw["aux_loss"] = True
    return getattr(S, name)(**kw).eval(), torch.rand(1, 3, SIZE, SIZE)


def _structure(out):
    if isinstance(out, dict):
        return {k: tuple(v.shape) for k, v in out.items()}
    # detections: per image, the keys and every field's per-box shape (the box count is data-dependent)
    return [{k: tuple(v.shape[1:]) for k, v in o.items()} for o in out]


def _random_plan(graph, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for gr in graph.prunable_groups:
        n = int(gr.size * frac)
        if gr.multiple_of > 1:
            n -= n % gr.multiple_of
        n = min(n, gr.size - max(1, gr.min_keep))
        if n > 0:
            plan[gr.id] = torch.randperm(gr.size, generator=g)[:n].tolist()
    return plan


@pytest.mark.parametrize("name", _param(list(DETECTORS) + SEGMENTERS))
def test_random_30pct_plan_verifies_and_keeps_output_structure(name):
    model, x = _build(name)
    with torch.no_grad():
        before = _structure(model(x))
    graph = pk.analyze(model, x)
    # the FPN / backbone / heads carry >= 80% of the FLOPs in prunable groups (the predictors' outputs aside)
    assert graph.prunable_proportion >= 0.8, graph.summary(show_pinned=False)
    plan = _random_plan(graph, 0.3)
    assert plan
    pk.prune(model, graph, plan)  # verified against the masked model; raises (and rolls back) on failure
    model.eval()
    with torch.no_grad():
        after = _structure(model(x))
    assert after == before


def test_fpn_width_is_prunable_through_roi_align():
    # MultiScaleRoIAlign pools each channel on its own: the FPN width feeds roi_align and is no longer pinned
    model, x = _build("fasterrcnn_mobilenet_v3_large_320_fpn")
    graph = pk.analyze(model, x)
    fpn = [g for g in graph.groups if any(m.startswith("backbone.fpn.layer_blocks.0") for m in g.modules)]
    assert fpn and all(g.prunable for g in fpn), [g.reason for g in fpn]
    assert any("roi_heads.box_head.fc6" in g.modules for g in fpn), [g.modules for g in fpn]  # the box head's input follows the width
    assert not [k for k in graph.unsupported_ops if "roi_align" in k]


def test_default_forward_compares_head_outputs_before_postprocessing():
    model, x = _build("fasterrcnn_mobilenet_v3_large_320_fpn")
    graph = pk.analyze(model, x)
    assert graph.forward_fn is not None
    paths = " ".join(graph.tape.output_paths)
    for key in ("rpn_objectness", "rpn_bbox_deltas", "class_logits", "box_regression"):
        assert key in paths
    assert "boxes" not in paths and "scores" not in paths
    # predictors' out channels are model outputs: pinned by default, no ignore list
    pred = [g for g in graph.groups if "roi_heads.box_predictor.cls_score" in g.modules
            and any(m.fqn == "roi_heads.box_predictor.cls_score.weight" and m.dim == 0 for m in g.members)]
    assert pred and not any(g.prunable for g in pred)


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_flops_target_met_within_one_rounding_step(name):
    model, x = _build(name)
    base = pk.count(model, x, forward_fn=head_outputs).macs
    pruner = pk.Pruner(model, x, target=pk.FlopsTarget(0.5), round_to=8)
    pruner.prune()
    after = pk.count(model, x, forward_fn=head_outputs).macs
    ratio = 1 - after / base
    # one rounding step: the largest group's 8 units are worth at most a few % of the FLOPs
    assert 0.45 <= ratio <= 0.56, ratio
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert set(out[0]) >= {"boxes", "scores", "labels"}


def test_training_input_images_and_targets():
    # a detector's train forward takes (images, targets): analysable from that input too (head outputs, eval mode)
    model, x = _build("ssdlite320_mobilenet_v3_large")
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 100.0, 120.0]]), "labels": torch.tensor([1])}]
    model.train()
    g_train = pk.analyze(model, (x, targets))
    model.eval()
    g_eval = pk.analyze(model, x)
    assert [(g.size, g.prunable) for g in g_train.groups] == [(g.size, g.prunable) for g in g_eval.groups]


def test_cli_torchvision_detector_form(capsys):
    # `prunekit analyze torchvision:NAME` builds a detector with weights=None and weights_backbone=None (never a
    # download) and a list-of-images example input
    from prunekit.cli.main import main
    rc = main(["analyze", "torchvision:ssdlite320_mobilenet_v3_large", "--input-shape", "1,3,224,224"])
    assert rc in (0, None)
    assert "cls_logits" in capsys.readouterr().out
