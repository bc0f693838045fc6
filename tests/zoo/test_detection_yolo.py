"""ultralytics YOLO (v8, v10, 11, 12, 26; detect / segment / pose) pruned as it is, no forward_fn, no rewrite.

Models are built offline from ultralytics' yaml with random weights; the file skips without ultralytics (an
optional AGPL extra).  The fast subset (YOLOv8n, YOLO11n detect/seg/pose, YOLO26n) runs in CI; the rest is slow.
"""
from __future__ import annotations

import copy
import random
import subprocess
import sys

import pytest
import torch

import prunekit as pk

ul = pytest.importorskip("ultralytics")
from ultralytics.nn.tasks import DetectionModel, PoseModel, SegmentationModel  # noqa: E402

from prunekit.detection.ultralytics import raw_predictions  # noqa: E402

FAST = ["yolov8n.yaml", "yolo11n.yaml", "yolo11n-seg.yaml", "yolo11n-pose.yaml", "yolo26n.yaml"]
SLOW = ["yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov10n.yaml", "yolo12n.yaml", "yolo26n-seg.yaml",
        "yolo26n-pose.yaml"]
ALL = FAST + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW]
SIZE = 160


def build(cfg: str):
    task = cfg.rsplit(".", 1)[0].split("-")[-1]
    cls = {"seg": SegmentationModel, "pose": PoseModel}.get(task, DetectionModel)
    torch.manual_seed(0)
    return cls(cfg, verbose=False).eval()


def structure(o):
    """Shapes of the eval output, the neck ``feats`` (whose channels pruning may change) reduced to their count."""
    if isinstance(o, torch.Tensor):
        return tuple(o.shape)
    if isinstance(o, dict):
        return {k: (len(v) if k == "feats" else structure(v)) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [structure(v) for v in o]
    return type(o).__name__


def example():
    torch.manual_seed(1)
    return torch.randn(1, 3, SIZE, SIZE)


@pytest.mark.parametrize("cfg", ALL)
def test_random_30pct_plan_verifies_and_keeps_output_structure(cfg):
    model, x = build(cfg), example()
    with torch.no_grad():
        before = structure(model(x))
    g = pk.analyze(model, x)  # no forward_fn: the ultralytics convention chooses the raw head outputs
    assert g.forward_fn is raw_predictions
    # >= 80% of the FLOPs can be removed by prunable groups (outputs aside), with no C2f rewrite
    assert g.prunable_proportion >= 0.8, g.summary()
    rng = random.Random(0)
    plan = {gr.id: rng.sample(range(gr.size), int(0.3 * gr.size)) for gr in g.prunable_groups
            if int(0.3 * gr.size) > 0}
    macs = g.macs()
    pk.prune(model, g, plan)  # verified against the masked model, rolled back on failure
    with torch.no_grad():
        after = structure(model(x))
    assert after == before  # predictions keep their shapes; feats are still there (fewer channels)
    assert pk.analyze(model, x).macs() < 0.8 * macs


def test_feats_are_not_pinned_as_outputs_and_heads_are():
    model, x = build("yolov8n.yaml"), example()
    g = pk.analyze(model, x)
    reasons = " ".join(gr.reason for gr in g.groups if not gr.prunable)
    assert "feats" not in reasons  # the neck is prunable: its features are not model outputs
    # the neck convs feeding the head (model.15/18/21 cv2) are prunable
    for neck in ("model.15.cv2.conv", "model.18.cv2.conv", "model.21.cv2.conv"):
        assert any(gr.prunable and gr.source and gr.source[0] == neck for gr in g.groups), neck
    # the box / class convs' outputs keep their shapes: 4 * reg_max and nc
    head = model.model[-1]
    for i in range(head.nl):
        for conv, n in ((head.cv2[i][2], 4 * head.reg_max), (head.cv3[i][2], head.nc)):
            name = next(k for k, v in model.named_modules() if v is conv)
            owning = [gr for gr in g.groups if name in gr.source]
            assert owning and all(not gr.prunable for gr in owning) and conv.out_channels == n


def test_attention_is_pinned_by_name_with_a_reason():
    model, x = build("yolo11n.yaml"), example()
    g = pk.analyze(model, x)
    attn = [gr for gr in g.groups if any(".attn" in m for m in gr.modules)]
    assert attn and all(not gr.prunable for gr in attn if all(".attn" in m or m.startswith("model.10") for m in gr.modules))
    reasons = [gr.reason for gr in attn if not gr.prunable]
    assert any("ultralytics Attention" in r for r in reasons)
    assert not any("dry-run pruning breaks" in r for r in reasons)  # pinned by knowledge, not by a failed dry run
    assert not any("dry-run pruning breaks" in gr.reason for gr in g.groups)


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo26n.yaml", pytest.param("yolo11n-seg.yaml", marks=pytest.mark.slow)])
def test_train_mode_analysis_gives_the_same_groups(cfg):
    model, x = build(cfg), example()
    ge = pk.analyze(model, x)
    model.train()
    gt = pk.analyze(model, x)
    model.eval()
    key = lambda g: [(gr.size, gr.prunable, tuple(sorted(gr.modules))) for gr in g.groups]  # noqa: E731
    assert key(gt) == key(ge)
    assert not model.training and model.model[-1].training is False


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", pytest.param("yolov8n-seg.yaml", marks=pytest.mark.slow)])
def test_flops_target_met_within_one_rounding_step(cfg):
    model, x = build(cfg), example()
    g = pk.analyze(model, x)
    before = g.macs()
    pk.Pruner(model, x, target=pk.FlopsTarget(0.5), round_to=8).prune()
    ratio = pk.analyze(model, x).macs() / before
    # met (<= 0.5), and not overshot by more than one rounding step (8 channels of a group: < 5% of the MACs here)
    assert 0.45 <= ratio <= 0.5 + 1e-6, ratio


@pytest.fixture(scope="module")
def pruned11():
    model, x = build("yolo11n.yaml"), example()
    pk.Pruner(model, x, target=pk.FlopsTarget(0.5)).prune()
    return model, x


def test_loss_and_backward_after_pruning(pruned11):
    from ultralytics.cfg import get_cfg
    model = copy.deepcopy(pruned11[0])
    model.args = get_cfg()  # the loss reads its box/cls/dfl gains from model.args
    model.train()
    batch = {"img": torch.rand(2, 3, SIZE, SIZE), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[1.0], [3.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.4, 0.1, 0.1]])}
    loss, items = model.loss(batch)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert model.model[0].conv.weight.grad is not None and model.model[0].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cfg", ["yolo11n-seg.yaml", "yolo11n-pose.yaml"])
def test_seg_and_pose_loss_and_backward_after_pruning(cfg):
    """Segment and pose heads keep working with ultralytics' own losses after a 50% FLOPs prune."""
    from ultralytics.cfg import get_cfg
    model, x = build(cfg), example()
    pk.Pruner(model, x, target=pk.FlopsTarget(0.5)).prune()
    model.args = get_cfg()
    model.train()
    batch = {"img": torch.rand(2, 3, SIZE, SIZE), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [0.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.4, 0.1, 0.1]])}
    if cfg.endswith("-seg.yaml"):  # overlap format: per image, a mask of instance numbers (1-based)
        masks = torch.zeros(2, SIZE // 4, SIZE // 4)
        masks[0, 14:26, 16:24] = 1
        masks[1, 12:20, 10:14] = 1
        batch["masks"] = masks
    else:
        nk = model.kpt_shape[0]
        batch["keypoints"] = torch.cat([torch.rand(2, nk, 2) * 0.2 + 0.3, torch.ones(2, nk, 1) * 2], dim=-1)
    loss, items = model.loss(batch)
    assert torch.isfinite(loss).all() and loss.sum() > 0
    loss.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_ultralytics_checkpoint_save_and_reload(pruned11, tmp_path):
    from ultralytics.nn.tasks import load_checkpoint
    model, x = pruned11
    path = tmp_path / "pruned.pt"
    torch.save({"model": copy.deepcopy(model).half(), "train_args": {}}, path)  # ultralytics' checkpoint form
    loaded, _ = load_checkpoint(str(path))
    assert loaded.model[0].conv.weight.shape == model.model[0].conv.weight.shape
    with torch.no_grad():
        assert torch.allclose(loaded(x)[0], model(x)[0], atol=1e-2, rtol=1e-2)


def test_onnx_and_torch_export_after_pruning(pruned11, tmp_path):
    onnx = pytest.importorskip("onnx")
    model, x = pruned11
    path = pk.export(model, x, tmp_path / "yolo.onnx", format="onnx")
    onnx.checker.check_model(str(path))
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(ep.module()(x)[0], model(x)[0], atol=1e-4)


def test_core_never_imports_ultralytics():
    code = "import sys, prunekit; assert 'ultralytics' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_prune_ultralytics_form_saves_ultralytics_checkpoint(tmp_path, capsys):
    from ultralytics.nn.tasks import load_checkpoint

    from prunekit.cli.main import main
    rc = main(["prune", "ultralytics:yolo11n.yaml", "--flops-target", "0.5", "--input-shape", f"1,3,{SIZE},{SIZE}",
               "--save", str(tmp_path)])
    assert rc == 0
    loaded, _ = load_checkpoint(str(tmp_path / "model.pt"))
    assert type(loaded).__name__ == "DetectionModel"
    assert loaded.model[0].conv.weight.shape[0] < 16  # pruned widths survive the reload
    with torch.no_grad():
        assert structure(loaded(example())) == structure(build("yolo11n.yaml")(example()))
