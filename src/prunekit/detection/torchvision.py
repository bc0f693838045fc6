"""torchvision's detectors as prunekit analyses and verifies them: on the outputs *before* post-processing.

A torchvision detector's forward (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite) takes a list of
images and ends in data-dependent post-processing: RPN proposals (top-k, NMS), box decoding, NMS again, and a
resize to the original image size.  Channels do not flow through any of that, and comparing its results is
brittle (a 1e-6 difference in a score changes which boxes survive).  So, when a detector is analysed without a
``forward_fn``, prunekit calls it through :func:`head_outputs`: the transform, the backbone (with FPN), and each
head up to its predictor -- the dict of raw head outputs.  Those outputs are the model outputs that get pinned
(the box/class/mask/keypoint predictors' out channels keep their size, no ignore list needed) and that
verification compares.  Surgery works on the full model, so its own forward (and post-processing) runs as before.

R-CNN RoI heads are fed a fixed, data-independent set of boxes (a grid over each image, as many as the model uses
at eval time: the RPN's ``post_nms_top_n`` for the box head, ``detections_per_img`` for the mask/keypoint heads),
so the pooled features are compared box for box, and the FLOPs counted are those of the eval forward.

Train mode: the example input may be ``(images, targets)`` (what a detector's training forward takes); the head
outputs are the same in both modes (the analysis captures in eval mode), so the plan made from either input is the
plan for the eval forward.  Models are recognised by their class's qualified name; torchvision is not imported
here.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch

from ..analysis.modules import register_module_by_name
from ..analysis.conventions import register_default_forward

_DET = "torchvision.models.detection"
RCNN = f"{_DET}.generalized_rcnn.GeneralizedRCNN"
ONE_STAGE = (f"{_DET}.retinanet.RetinaNet", f"{_DET}.fcos.FCOS", f"{_DET}.ssd.SSD")


def _images(inputs: Any) -> list[torch.Tensor]:
    """The image list of a detector's input: ``[img, ...]``, one (C, H, W) tensor, a batch (N, C, H, W), or a
    training input ``(images, targets)``."""
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], (list, tuple)) \
            and (inputs[1] is None or isinstance(inputs[1], (list, tuple))):
        inputs = inputs[0]
    if isinstance(inputs, torch.Tensor):
        return [inputs] if inputs.dim() == 3 else list(inputs.unbind(0))
    if isinstance(inputs, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return list(inputs)
    raise TypeError("a torchvision detector's example input is a list of (C, H, W) image tensors, e.g. "
                    "[torch.rand(3, 320, 320)], or (images, targets) for its training forward; got "
                    f"{type(inputs).__name__}")


def fixed_boxes(image_sizes, n: int, like: torch.Tensor) -> list[torch.Tensor]:
    """``n`` boxes (x1, y1, x2, y2) per image, a deterministic grid of centres with a few sizes, so every FPN level
    of a ``MultiScaleRoIAlign`` gets boxes.  Independent of the model's values: the same boxes before and after
    pruning."""
    out = []
    for h, w in image_sizes:
        g = max(1, math.ceil(math.sqrt(n)))
        k = torch.arange(n, dtype=torch.float32)
        cx = ((k % g) + 0.5) / g * w
        cy = (torch.div(k, g, rounding_mode="floor") % g + 0.5) / g * h
        frac = torch.tensor([0.06, 0.15, 0.35, 0.8])[(k % 4).long()]
        bw, bh = frac * w, frac * h
        b = torch.stack([(cx - bw / 2).clamp(0, w), (cy - bh / 2).clamp(0, h),
                         (cx + bw / 2).clamp(0, w), (cy + bh / 2).clamp(0, h)], 1)
        out.append(b.to(device=like.device, dtype=like.dtype))
    return out


def _features(model, images):
    image_list, _ = model.transform(images)
    feats = model.backbone(image_list.tensors)
    if isinstance(feats, torch.Tensor):
        feats = OrderedDict([("0", feats)])
    return image_list, feats


def rcnn_head_outputs(model, inputs) -> dict[str, torch.Tensor]:
    """Faster / Mask / Keypoint R-CNN: the RPN head's objectness and box deltas, and the RoI heads' predictor
    outputs on :func:`fixed_boxes` (see the module docstring)."""
    image_list, feats = _features(model, _images(inputs))
    levels = list(feats.values())
    objectness, deltas = model.rpn.head(levels)
    out: dict[str, Any] = {"rpn_objectness": objectness, "rpn_bbox_deltas": deltas}
    rh, sizes = model.roi_heads, image_list.image_sizes
    n_props = model.rpn._post_nms_top_n["testing"]
    x = rh.box_roi_pool(feats, fixed_boxes(sizes, n_props, levels[0]), sizes)
    out["class_logits"], out["box_regression"] = rh.box_predictor(rh.box_head(x))
    dets = None
    if getattr(rh, "mask_roi_pool", None) is not None:
        dets = fixed_boxes(sizes, rh.detections_per_img, levels[0])
        out["mask_logits"] = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, dets, sizes)))
    if getattr(rh, "keypoint_roi_pool", None) is not None:
        dets = dets if dets is not None else fixed_boxes(sizes, rh.detections_per_img, levels[0])
        out["keypoint_logits"] = rh.keypoint_predictor(rh.keypoint_head(rh.keypoint_roi_pool(feats, dets, sizes)))
    return out


def one_stage_head_outputs(model, inputs) -> dict[str, torch.Tensor]:
    """RetinaNet / FCOS / SSD / SSDlite: the head's raw outputs (``cls_logits``, ``bbox_regression``, FCOS's
    ``bbox_ctrness``) before anchors, decoding and NMS."""
    _, feats = _features(model, _images(inputs))
    return dict(model.head(list(feats.values())))


def head_outputs(model, inputs) -> dict[str, torch.Tensor]:
    """The default forward of a torchvision detector: its outputs before post-processing."""
    for cls in type(model).__mro__:
        if f"{cls.__module__}.{cls.__qualname__}" == RCNN:
            return rcnn_head_outputs(model, inputs)
    return one_stage_head_outputs(model, inputs)


register_default_forward(RCNN, rcnn_head_outputs)
for _name in ONE_STAGE:
    register_default_forward(_name, one_stage_head_outputs)

# MultiScaleRoIAlign allocates its result as zeros((boxes, x.shape[1], h, w)) and writes each level's pooled boxes
# into it: the channel dim follows the features' width
register_module_by_name("torchvision.ops.poolers.MultiScaleRoIAlign", input_sized_dims=(1,), infer_attrs=False)
