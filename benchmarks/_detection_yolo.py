"""ultralytics YOLO rows of benchmarks/detection.py: prunekit as is (no forward_fn, no rewrite) vs Torch-Pruning.

``yolo_rows(models, size, repeats)`` returns one dict per model with: model, status, prunable_flops_share,
macs_before, macs_after, params_before, params_after, latency_ms_before, latency_ms_after, tp_status
(Torch-Pruning on the model as it is) and tp_rewrite_status (Torch-Pruning after this file's own C2f -> two-conv
rewrite, the idea of Torch-Pruning's C2f_v2; written here, not copied).  Torch-Pruning runs in a subprocess with
a time limit (it hangs on some YOLO graphs); it is imported from the environment or from ``$TP_PATH``
(``pip install --target /tmp/tp_pkg --no-deps torch-pruning``).

    python benchmarks/_detection_yolo.py [--size 320] [--models yolo11n.yaml ...]   # prints JSON rows
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from _bench_common import import_torch_pruning, run_json_child  # noqa: E402

MODELS = ["yolov8n.yaml", "yolo11n.yaml", "yolo12n.yaml", "yolo26n.yaml", "yolov8n-seg.yaml", "yolo11n-seg.yaml",
          "yolo26n-seg.yaml", "yolo11n-pose.yaml", "yolo26n-pose.yaml"]
TP_TIMEOUT_S = 180


def build(cfg: str) -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel, PoseModel, SegmentationModel
    task = cfg.rsplit(".", 1)[0].split("-")[-1]
    cls = {"seg": SegmentationModel, "pose": PoseModel}.get(task, DetectionModel)
    torch.manual_seed(0)
    return cls(cfg, verbose=False).eval()


def _latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(x)
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    return 1000 * sorted(ts)[len(ts) // 2]


def prunekit_row(cfg: str, size: int = 320, repeats: int = 10, ratio: float = 0.5) -> dict:
    import prunekit as pk
    row = {"model": cfg.rsplit(".", 1)[0]}
    model = build(cfg)
    x = torch.randn(1, 3, size, size)
    try:
        g = pk.analyze(model, x)  # the one-line call: no forward_fn, no rewrite
        row["prunable_flops_share"] = round(g.prunable_proportion, 4)
        row["macs_before"] = g.macs()
        row["params_before"] = sum(p.numel() for p in model.parameters())
        row["latency_ms_before"] = round(_latency_ms(model, x, repeats), 2)
        pk.Pruner(model, x, target=pk.FlopsTarget(ratio)).prune()
        row["macs_after"] = pk.analyze(model, x).macs()
        row["params_after"] = sum(p.numel() for p in model.parameters())
        row["latency_ms_after"] = round(_latency_ms(model, x, repeats), 2)
        row["status"] = f"ok (FLOPs {row['macs_after'] / row['macs_before']:.3f})"
    except Exception as e:  # a benchmark row records the failure instead of stopping the table
        row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
    return row


# ---------------------------------------------------------------- Torch-Pruning side by side
class C2fTwoConv(nn.Module):
    """C2f / C3k2 with its ``cv1(x).chunk(2, 1)`` replaced by two convs holding the two halves of cv1's weight
    (same function), the rewrite Torch-Pruning's YOLOv8 example needs because it cannot follow ``chunk``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        c = block.c
        self.cv0, self.cv1 = copy.deepcopy(block.cv1), copy.deepcopy(block.cv1)
        for half, sl in ((self.cv0, slice(0, c)), (self.cv1, slice(c, 2 * c))):
            half.conv.weight = nn.Parameter(block.cv1.conv.weight.data[sl].clone())
            half.conv.out_channels = c
            bn = half.bn
            bn.weight, bn.bias = nn.Parameter(bn.weight.data[sl].clone()), nn.Parameter(bn.bias.data[sl].clone())
            bn.running_mean, bn.running_var = bn.running_mean[sl].clone(), bn.running_var[sl].clone()
            bn.num_features = c
        self.cv2, self.m = block.cv2, block.m
        for k in ("f", "i", "type", "np"):  # ultralytics' per-layer routing attributes
            if hasattr(block, k):
                setattr(self, k, getattr(block, k))

    def forward(self, x):
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def rewrite_c2f(model: nn.Module) -> int:
    """Replace every C2f-family block (C2f, C3k2; forward = chunk) in ``model`` in place; returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if any(c.__name__ == "C2f" for c in type(child).__mro__) and hasattr(child, "c") \
                    and type(child).forward is _c2f_forward():
                setattr(parent, name, C2fTwoConv(child))
                n += 1
    return n


def _c2f_forward():
    from ultralytics.nn.modules.block import C2f
    return C2f.forward


def _tp_child(cfg: str, size: int, rewrite: bool, ratio: float) -> dict:
    tp = import_torch_pruning()
    if tp is None:
        return {"status": "not installed (pip install torch-pruning; or TP_PATH)"}
    model = build(cfg)
    x = torch.randn(1, 3, size, size)
    n = rewrite_c2f(model) if rewrite else 0
    head = model.model[-1]
    try:
        base_macs, _ = tp.utils.count_ops_and_params(model, x)
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[head])  # TP's example ignores Detect
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, x)
        with torch.no_grad():
            model(x)
        return {"status": f"ok (FLOPs {macs / base_macs:.3f}{', %d blocks rewritten' % n if rewrite else ''})"}
    except Exception as e:
        return {"status": f"error: {type(e).__name__}: {str(e)[:160]}"}


def tp_status(cfg: str, size: int = 320, rewrite: bool = False, ratio: float = 0.5,
              timeout: int = TP_TIMEOUT_S) -> str:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--tp-child", cfg, "--size", str(size), "--ratio", str(ratio)]
    if rewrite:
        cmd.append("--rewrite")
    info, why = run_json_child(cmd, timeout)
    return info["status"] if info else why


def yolo_rows(models: list[str] | None = None, size: int = 320, repeats: int = 10, ratio: float = 0.5,
              torch_pruning: bool = True, tp_timeout: int = TP_TIMEOUT_S, on_row=None) -> list[dict]:
    """One row per YOLO model (keys in the module docstring); [] when ultralytics is not installed."""
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        return []
    rows = []
    for cfg in models or MODELS:
        row = prunekit_row(cfg, size, repeats, ratio)
        row["tp_status"] = tp_status(cfg, size, False, ratio, tp_timeout) if torch_pruning else "not run"
        row["tp_rewrite_status"] = tp_status(cfg, size, True, ratio, tp_timeout) if torch_pruning else "not run"
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--tp-child", metavar="CFG")
    ap.add_argument("--rewrite", action="store_true")
    a = ap.parse_args()
    if a.tp_child:
        print(json.dumps(_tp_child(a.tp_child, a.size, a.rewrite, a.ratio)))
        return
    print(json.dumps(yolo_rows(a.models, a.size, a.repeats, a.ratio, not a.no_tp), indent=1))


if __name__ == "__main__":
    main()
