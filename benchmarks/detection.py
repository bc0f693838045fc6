"""Detection/segmentation benchmark (issue 15): per model, analyse/prune status with the plain call, share of FLOPs
in prunable groups (outputs aside), MACs/params before/after a 50% FLOPs target, CPU latency before/after (noisy on
a shared machine: re-run on a quiet one).  Writes benchmarks/results/detection.{json,md}.

    PYTHONPATH=src python benchmarks/detection.py [--models a,b] [--size 320]

ultralytics YOLO rows come from benchmarks/_detection_yolo.py (yolo_rows()) when ultralytics is installed.
Torch-Pruning side by side (``--tp-timeout`` per run, in a subprocess: it hangs on some graphs): for YOLO as is
and after a C2f rewrite; for torchvision with the hand-written ignore list it needs (:data:`TP_IGNORE`: every
predictor / output conv), MagnitudePruner L2 at channel ratio 1 - sqrt(0.5) (about half the FLOPs), MACs counted by prunekit's counter on the head outputs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from _bench_common import import_torch_pruning, run_json_child  # noqa: E402

import prunekit as pk
from prunekit.detection.torchvision import head_outputs

MODELS = ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
          "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn",
          "keypointrcnn_resnet50_fpn", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large"]


def _build(name, size):
    from torchvision.models import detection as D, segmentation as S
    torch.manual_seed(0)
    if hasattr(D, name):
        kw = dict(weights=None, weights_backbone=None, num_classes=5)
        if "resnet50" in name:
            kw.update(min_size=size, max_size=size)
        if name.startswith("keypoint"):
            kw.update(num_classes=2, num_keypoints=5)
        return getattr(D, name)(**kw).eval(), [torch.rand(3, size, size)], head_outputs
    return getattr(S, name)(weights=None, weights_backbone=None, num_classes=4).eval(), \
        torch.rand(1, 3, size, size), None


#: the layers Torch-Pruning must be told to ignore (the predictors whose outputs are model outputs): prunekit pins
#: them by itself; a Torch-Pruning user writes this list by hand
TP_IGNORE = {
    "rcnn": ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor", "roi_heads.mask_predictor",
             "roi_heads.keypoint_predictor"],
    "retinanet": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
    "fcos": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
             "head.regression_head.bbox_ctrness"],
    "ssd": ["head.classification_head", "head.regression_head"],
    "lraspp": ["classifier.low_classifier", "classifier.high_classifier"],
    "deeplabv3": ["classifier.4", "aux_classifier.4"],
    "fcn": ["classifier.4", "aux_classifier.4"],
}


def tp_ignored(name: str, model) -> list:
    key = next(k for k in TP_IGNORE if k in name)
    mods = dict(model.named_modules())
    return [mods[n] for n in TP_IGNORE[key] if n in mods]


def tp_child(name: str, size: int, ratio: float = 1 - 0.5 ** 0.5) -> dict:
    """Torch-Pruning's MagnitudePruner (L2) on a torchvision model with its hand ignore list (run in a subprocess)."""
    tp = import_torch_pruning()
    if tp is None:
        return {"status": "not installed (pip install torch-pruning; or TP_PATH)"}
    model, x, fwd = _build(name, size)
    base = pk.count(model, x, forward_fn=fwd).macs
    try:
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=tp_ignored(name, model))
        pruner.step()
        model.eval()
        with torch.no_grad():
            model(x)
        macs = pk.count(model, x, forward_fn=fwd).macs
        return {"status": f"ok (FLOPs {macs / base:.3f})"}
    except Exception as e:  # noqa: BLE001 - the status records the failure
        return {"status": f"error: {type(e).__name__}: {str(e)[:160]}"}


def tp_status(name: str, size: int, timeout: int) -> str:
    info, why = run_json_child([sys.executable, str(Path(__file__).resolve()), "--tp-child", name, "--size", str(size)],
                               timeout)
    return info["status"] if info else why


def _latency_ms(model, x, reps=5):
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        for _ in range(reps):
            model(x)
    return (time.perf_counter() - t) / reps * 1e3


def row(name, size, tp_timeout=0):
    r = {"model": name, "status": "error", "tp_rewrite_status": "n/a (no C2f)",
         "tp_status": tp_status(name, size, tp_timeout) if tp_timeout else "not run"}
    try:
        model, x, fwd = _build(name, size)
        before = pk.count(model, x, forward_fn=fwd)
        g = pk.analyze(model, x)
        r.update(prunable_flops_share=round(g.prunable_proportion, 4), macs_before=before.macs,
                 params_before=before.params, latency_ms_before=round(_latency_ms(model, x), 1))
        r["status"] = "analysed"
        pk.Pruner(model, x, target=pk.FlopsTarget(0.5), round_to=8).prune()
        model.eval()
        after = pk.count(model, x, forward_fn=fwd)
        r.update(status="pruned", macs_after=after.macs, params_after=after.params,
                 flops_reduction=round(1 - after.macs / before.macs, 4),
                 latency_ms_after=round(_latency_ms(model, x), 1))
    except Exception as e:  # noqa: BLE001 - a row per model, the error recorded
        r["error"] = f"{type(e).__name__}: {e}"[:300]
        r["traceback"] = traceback.format_exc()[-1500:]
    return r


def write(rows: list[dict], out: Path) -> str:
    out.mkdir(exist_ok=True)
    (out / "detection.json").write_text(json.dumps(rows, indent=1))
    cols = ["model", "status", "prunable_flops_share", "macs_before", "macs_after", "params_before", "params_after",
            "latency_ms_before", "latency_ms_after", "tp_status", "tp_rewrite_status"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "detection.md").write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS), help="torchvision models ('' for none)")
    ap.add_argument("--yolo", nargs="*", default=None, help="ultralytics yaml names (default: all; none: skip)")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--tp-timeout", type=int, default=180, help="seconds per Torch-Pruning run (it hangs on some)")
    ap.add_argument("--no-tp", action="store_true", help="skip the Torch-Pruning columns")
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of the models run now in the existing detection.json")
    ap.add_argument("--tp-child", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    if a.tp_child:
        print(json.dumps(tp_child(a.tp_child, a.size)))
        return
    out, rows = Path(a.out), []
    old = json.loads((out / "detection.json").read_text()) if a.update and (out / "detection.json").exists() else []

    def add(r: dict) -> None:  # written after every row: a long run that is stopped keeps what it measured
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
        write(merged(), out)

    def merged() -> list[dict]:  # --update: the new rows replace the old ones in place, new models at the end
        new = {x["model"]: x for x in rows}
        return [new.pop(x["model"], x) for x in old] + list(new.values()) if a.update else rows
    for n in [m for m in a.models.split(",") if m]:
        add(row(n, a.size, 0 if a.no_tp else a.tp_timeout))
    if a.yolo is None or a.yolo:
        try:
            import ultralytics  # noqa: F401
            from _detection_yolo import yolo_rows  # the yolo helper's rows (same keys)
        except ImportError:
            yolo_rows = None
        if yolo_rows is not None:
            yolo_rows(a.yolo or None, torch_pruning=not a.no_tp, tp_timeout=a.tp_timeout, on_row=add)
    print(write(merged(), out))


if __name__ == "__main__":
    main()
