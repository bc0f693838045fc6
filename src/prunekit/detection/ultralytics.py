"""ultralytics YOLO (v8, v10, 11, 12, 26; detect, segment, pose) pruned as it is: no C2f rewrite, no user code.

Registered with :func:`prunekit.analysis.conventions.register_model_convention` for classes defined in ``ultralytics.*``
(matched by module name: nothing here imports ultralytics, which is AGPL and only ever an optional extra), so

    pk.analyze(model, torch.randn(1, 3, 320, 320))
    pk.Pruner(model, torch.randn(1, 3, 320, 320), target=pk.FlopsTarget(0.5)).prune()

work on a ``DetectionModel`` / ``SegmentationModel`` / ``PoseModel`` with no ``forward_fn``.  What the
convention knows:

* **Which outputs are predictions.**  In eval mode the model returns ``(decoded, raw)``: ``decoded`` is
  post-processed (anchors x strides, sigmoid, for end-to-end heads a top-k), and ``raw`` also holds the neck
  ``feats`` the head read, which are features, not outputs (pinning them as outputs would pin the whole neck).
  The analysis, the dry run and the post-prune verification all use :func:`raw_predictions`: the head's raw
  outputs before post-processing (``boxes``, ``scores``, ``mask_coefficient``, ``proto``, ``kpts``...; for
  end-to-end heads both ``one2many`` and ``one2one``), without ``feats``.  Their channels -- the box / class /
  mask-coefficient / keypoint convs' outputs and the mask prototypes -- keep their shapes.
* **Detect.dynamic.**  Post-processing (anchors and strides rebuilt from the feature-map shapes, top-k) never
  runs during analysis or verification, so no anchor cache is filled with the example's shapes (or with meta
  tensors); after pruning, the head rebuilds its anchors on its own (it compares the feature shapes, whose
  channel counts changed).  ``Detect.dynamic`` is left as the user set it.
* **C2f / C3k2 / C3 / ELAN blocks**: their ``chunk`` / ``split`` are followed by the generic op rules (no
  rewrite to ``C2f_v2``).
* **Attention** (``C2PSA``/``PSA``'s ``Attention``, YOLO12's ``AAttn``): ``qkv`` is viewed as heads x
  (key, key, value) and split inside each head; these channels are pinned by name with that reason
  (:data:`PINNED_ATTENTION`), the blocks' outer convs stay prunable.

**Train mode.**  ``model.train()`` forward returns the raw head outputs (with ``feats``); the same
:func:`raw_predictions` is used, so a model analysed in train mode gives the same groups as in eval mode.  The
plan is made on whatever mode the model is in when analysed; eval mode (the default after ``.eval()``) is
the documented, tested default -- BatchNorm statistics are then not updated by the analysis forwards.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.conventions import register_model_convention

log = logging.getLogger("prunekit")

#: head classes (matched by class name along the MRO) whose forward returns raw predictions in training mode
HEADS = ("Detect",)
#: attention modules whose qkv / value channels are pinned (heads x (key, key, value) split inside a head)
PINNED_ATTENTION = ("Attention", "AAttn")
#: blocks whose cv1 output is split into (self.c, self.c) halves, one of them through attention
SPLIT_BY_C = ("C2PSA", "PSA")
ATTENTION_REASON = ("ultralytics {cls} ({name}): qkv is viewed as num_heads x (key_dim, key_dim, head_dim) and split "
                    "inside each head; its channels are pinned (the block's outer convs stay prunable)")


def _is_ultralytics(obj: Any) -> bool:
    return type(obj).__module__.startswith("ultralytics.")


def _mro_names(obj: Any) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def find_head(model: nn.Module) -> nn.Module | None:
    """The Detect-family head (Detect, Segment, Pose, OBB, v10/26 end-to-end heads) of an ultralytics model."""
    layers = getattr(model, "model", None)
    if isinstance(layers, nn.Sequential) and len(layers) and _mro_names(layers[-1]) & set(HEADS):
        return layers[-1]
    for m in model.modules():
        if _mro_names(m) & set(HEADS):
            return m
    return None


def _strip_feats(out: Any) -> Any:
    """The head's raw output dict without the neck features it carries (``feats``)."""
    if isinstance(out, dict):
        return {k: _strip_feats(v) for k, v in out.items() if k != "feats"}
    return out


def raw_predictions(model: nn.Module, x: Any) -> Any:
    """``forward_fn`` for ultralytics models: the head's outputs before post-processing, without ``feats``.

    The head module alone (not its children: BatchNorm keeps its mode) is put in training mode for the call, so
    it returns its raw prediction dict instead of decoding it; in train mode that is what the model returns
    anyway.  ``x`` is the image batch (B, 3, H, W)."""
    head = find_head(model)
    if head is None:
        raise TypeError(f"{type(model).__module__}.{type(model).__qualname__} has no Detect-family head: "
                        "pass forward_fn=... to prunekit (ultralytics classification models need none)")
    was = head.training
    head.training = True
    try:
        out = model(x)
    finally:
        head.training = was
    return _strip_feats(out)


def _resolver(model: nn.Module):
    if not _is_ultralytics(model) or find_head(model) is None:
        return None  # a classification model, a loss module, ... : called as usual
    return raw_predictions


def attention_pins(model: nn.Module) -> dict[str, str]:
    """{module name (``name:out``: its output channels only): reason} of the pinned attention channels: the
    attention modules' own, and the output of ``cv1`` in the blocks that split it into two halves sized by one
    attribute (``a, b = self.cv1(x).split((self.c, self.c))``), whose ``b`` half feeds the attention."""
    pins = {}
    for name, m in model.named_modules():
        if not _is_ultralytics(m):
            continue
        cls = type(m).__name__
        if cls in PINNED_ATTENTION:
            pins[name] = ATTENTION_REASON.format(cls=cls, name=name)
        elif cls in SPLIT_BY_C and isinstance(getattr(m, "cv1", None), nn.Module) and isinstance(getattr(m, "c", None), int):
            pins[f"{name}.cv1:out"] = (f"ultralytics {cls} ({name}): cv1's output is split into two halves of "
                                       f"self.c={m.c} channels each, the second feeding attention; pinned")
    return pins


def save_checkpoint(model: nn.Module, path) -> Path:
    """Write ``model`` in ultralytics' checkpoint form (``{"model": model, "train_args": ...}``, the model object
    pickled, fp16 as ultralytics saves it), which ``ultralytics.nn.tasks.load_checkpoint(path)`` and
    ``ultralytics.YOLO(path)`` load with the pruned widths (no pruning record needed)."""
    import copy

    import torch
    path = Path(path)
    args = getattr(model, "args", None)
    args = dict(vars(args)) if hasattr(args, "__dict__") else dict(args) if isinstance(args, dict) else {}
    torch.save({"model": copy.deepcopy(model).half(), "train_args": args, "date": None, "version": None,
                "pruned_by": "prunekit"}, path)
    return path


register_model_convention("ultralytics.", _resolver, lambda m: attention_pins(m) if _is_ultralytics(m) else {})
