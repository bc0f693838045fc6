"""Detection quality after pruning (issue 15): mAP of a YOLOv8n trained here on synthetic shapes, dense vs pruned
to 50% FLOPs, after the same fine-tune budget, prunekit (as is: no rewrite, no forward_fn, no ignore list) vs
Torch-Pruning (its recipe: C2f rewritten into two convs, Detect ignored, MagnitudePruner L2, channel ratio found
by bisection so that the FLOPs kept match prunekit's).

The task: 128x128 images of 1-4 filled rectangles, ellipses and triangles (3 classes; random colours, sizes
10-50 px, overlaps allowed) on a noisy background, drawn by :func:`shapes_batch` from a seed (every step sees
fresh images, the same for every model: no dataset on disk, no download).  Training uses ultralytics' own loss
(``model.loss``), AdamW and a cosine schedule; evaluation uses ultralytics' NMS and ``ap_per_class`` on a fixed
held-out set (mAP50 and mAP50-95 as COCO/ultralytics define them).

    PYTHONPATH=src python benchmarks/detection_quality.py [--steps 1500] [--ft-steps 400] [--quick]

Writes benchmarks/results/detection_quality.{json,md}; the dense model is cached under benchmarks/cache/ (keyed by
its settings), so a rerun only prunes and fine-tunes.  Torch-Pruning comes from the environment or ``$TP_PATH``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from _bench_common import git_state, import_torch_pruning, run_json_child  # noqa: E402

HERE = Path(__file__).resolve().parent
NC, SIZE = 3, 128
NAMES = {0: "rectangle", 1: "ellipse", 2: "triangle"}


# ---------------------------------------------------------------- data
def shapes_batch(n: int, seed: int, size: int = SIZE) -> dict:
    """``n`` images with their boxes in ultralytics' batch form: ``img`` (n, 3, size, size) in [0, 1], ``cls``
    (m, 1), ``bboxes`` (m, 4) normalised xywh, ``batch_idx`` (m,).  Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    img = 0.35 + 0.15 * torch.rand(n, 3, 1, 1, generator=g) + 0.08 * torch.randn(n, 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    cls, boxes, idx = [], [], []
    for i in range(n):
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            c = int(torch.randint(0, NC, (1,), generator=g))
            w, h = (10 + 40 * torch.rand(2, generator=g)).tolist()
            cx = float(w / 2 + (size - w) * torch.rand(1, generator=g))
            cy = float(h / 2 + (size - h) * torch.rand(1, generator=g))
            dx, dy = (xx - cx) / (w / 2), (yy - cy) / (h / 2)
            if c == 0:
                mask = (dx.abs() <= 1) & (dy.abs() <= 1)
            elif c == 1:
                mask = dx ** 2 + dy ** 2 <= 1
            else:  # apex at the top centre, base at the bottom
                mask = (dy >= -1) & (dy <= 1) & (dx.abs() <= (dy + 1) / 2)
            colour = torch.rand(3, 1, generator=g)
            img[i][:, mask] = colour.expand(3, int(mask.sum()))
            cls.append(c)
            boxes.append([cx / size, cy / size, w / size, h / size])
            idx.append(i)
    return {"img": img.clamp(0, 1), "cls": torch.tensor(cls, dtype=torch.float32)[:, None],
            "bboxes": torch.tensor(boxes), "batch_idx": torch.tensor(idx, dtype=torch.float32)}


# ---------------------------------------------------------------- model, training, mAP
def build() -> torch.nn.Module:
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=NC, verbose=False)
    model.args = get_cfg()  # the loss reads its box / cls / dfl gains from model.args
    return model


def train(model: torch.nn.Module, steps: int, lr: float, batch: int, seed: int, log_every: int = 50) -> list:
    """``steps`` AdamW steps on fresh shape batches (seeds ``seed + step``), cosine lr with a short warm-up;
    returns the loss history [(step, loss)].  The same seeds for every model: the same data in the same order."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=5e-4)
    warm = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    hist, t0 = [], time.time()
    for s in range(steps):
        b = shapes_batch(batch, seed + s)
        loss, items = model.loss(b)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        if (s + 1) % log_every == 0 or s == steps - 1:
            # the loss items (box, cls, dfl): a tensor in older ultralytics, a dict of tensors in newer
            v = float(sum(items.values()).sum() if isinstance(items, dict) else items.sum())
            hist.append((s + 1, round(v, 4)))
            print(f"  step {s + 1}/{steps} loss {v:.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    return hist


def match(pred_boxes, pred_cls, gt_boxes, gt_cls, thresholds) -> torch.Tensor:
    """(n_pred, n_thr) bool: prediction j is a true positive at threshold t (greedy by IoU, one match per box)."""
    from ultralytics.utils.metrics import box_iou
    correct = torch.zeros(len(pred_boxes), len(thresholds), dtype=torch.bool)
    if not len(pred_boxes) or not len(gt_boxes):
        return correct
    iou = box_iou(gt_boxes, pred_boxes) * (gt_cls[:, None] == pred_cls[None, :])
    for k, t in enumerate(thresholds):
        gi, pj = torch.nonzero(iou >= t, as_tuple=True)
        if not len(gi):
            continue
        order = torch.argsort(iou[gi, pj], descending=True)
        used_g, used_p = set(), set()
        for a, b in zip(gi[order].tolist(), pj[order].tolist()):
            if a not in used_g and b not in used_p:
                used_g.add(a)
                used_p.add(b)
                correct[b, k] = True
    return correct


def xywhn_to_xyxy(b: torch.Tensor, size: int) -> torch.Tensor:
    xy, wh = b[:, :2] * size, b[:, 2:] * size
    return torch.cat([xy - wh / 2, xy + wh / 2], 1)


def evaluate(model: torch.nn.Module, val: list[dict], size: int = SIZE) -> dict:
    """mAP50 and mAP50-95 of ``model`` on the held-out batches (ultralytics' NMS at conf 0.001 / IoU 0.7)."""
    from ultralytics.utils.nms import non_max_suppression
    model.eval()
    with torch.no_grad():
        dets = [non_max_suppression(model(b["img"])[0], conf_thres=0.001, iou_thres=0.7, max_det=100) for b in val]
    return mean_ap(dets, val, size)


def mean_ap(dets: list[list[torch.Tensor]], val: list[dict], size: int = SIZE) -> dict:
    """mAP50 and mAP50-95 (ultralytics' ``ap_per_class``) of per-batch, per-image detections (n, 6: xyxy in
    pixels, confidence, class) against the batches' boxes."""
    import numpy as np
    from ultralytics.utils.metrics import ap_per_class
    thr = torch.linspace(0.5, 0.95, 10)
    tps, confs, pcls, tcls = [], [], [], []
    for b, per_image in zip(val, dets):
        for i, d in enumerate(per_image):
            sel = b["batch_idx"] == i
            gt_b, gt_c = xywhn_to_xyxy(b["bboxes"][sel], size), b["cls"][sel, 0]
            tps.append(match(d[:, :4], d[:, 5], gt_b, gt_c, thr))
            confs.append(d[:, 4])
            pcls.append(d[:, 5])
            tcls.append(gt_c)
    res = ap_per_class(torch.cat(tps).numpy(), torch.cat(confs).numpy(), torch.cat(pcls).numpy(),
                       torch.cat(tcls).numpy(), names=NAMES)
    ap = np.asarray(res[5])  # (classes, 10 thresholds)
    return {"map50": round(float(ap[:, 0].mean()), 4), "map50_95": round(float(ap.mean()), 4)}


def macs(model: torch.nn.Module) -> int:
    import prunekit as pk
    return pk.count(model, torch.zeros(1, 3, SIZE, SIZE)).macs


# ---------------------------------------------------------------- the two pruners
def prune_prunekit(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    import prunekit as pk
    model = copy.deepcopy(model).eval()
    pk.Pruner(model, torch.randn(1, 3, SIZE, SIZE), target=pk.FlopsTarget(ratio), round_to=8).prune()
    return model


def _tp_child(src: str, dst: str, kept: float) -> dict:
    """Torch-Pruning's YOLOv8 recipe on the model pickled at ``src``: C2f rewrite, Detect ignored, MagnitudePruner
    L2; its channel ratio is bisected (5 steps) so that the FLOPs kept come closest to ``kept``."""
    tp = import_torch_pruning()
    if tp is None:
        raise SystemExit("torch-pruning is not installed (pip install torch-pruning; or TP_PATH)")
    from _detection_yolo import rewrite_c2f
    dense = torch.load(src, weights_only=False)
    base = macs(dense)
    x = torch.randn(1, 3, SIZE, SIZE)
    lo, hi, best = 0.0, 0.9, None
    for _ in range(6):
        r = (lo + hi) / 2
        m = copy.deepcopy(dense).eval()
        rewrite_c2f(m)
        tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=r,
                                  ignored_layers=[m.model[-1]]).step()
        k = macs(m) / base
        if best is None or abs(k - kept) < abs(best[1] - kept):
            best = (r, k, m)
        lo, hi = (r, hi) if k > kept else (lo, r)
    torch.save(best[2], dst)
    return {"ratio": round(best[0], 4), "flops_kept": round(best[1], 4)}


def prune_tp(model: torch.nn.Module, kept: float, timeout: int) -> tuple[torch.nn.Module | None, str]:
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "dense.pt", Path(d) / "tp.pt"
        torch.save(model, src)
        info, why = run_json_child([sys.executable, str(Path(__file__).resolve()), "--tp-child", str(src), str(dst),
                                    str(kept)], timeout)
        if info is None:
            return None, why
        pruned = torch.load(dst, weights_only=False)
        pruned.args = model.args
        return pruned, f"ok (channel ratio {info['ratio']})"


# ---------------------------------------------------------------- report
def write(res: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "detection_quality.json").write_text(json.dumps(res, indent=1))
    s = res["settings"]
    lines = [f"# Detection quality: YOLOv8n on synthetic shapes ({s['size']}x{s['size']}, {NC} classes)", "",
             f"Dense: {s['steps']} steps x batch {s['batch']} from scratch (lr {s['lr']}); pruned models: "
             f"{s['ft_steps']} fine-tune steps (lr {s['ft_lr']}, same data order); held-out {s['val_images']} "
             f"images. Code: {res.get('code', '?')}. CPU threads: {s['threads']}.", "",
             "| model | status | MACs (M) | FLOPs kept | params (M) | mAP50 (no FT) | mAP50-95 (no FT) | "
             "mAP50 | mAP50-95 | prune s | fine-tune s |", "|" + "---|" * 11]
    for r in res["rows"]:
        def f(k, d=4):
            v = r.get(k)
            return "" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
        lines.append(f"| {r['model']} | {r['status']} | {r.get('macs', 0) / 1e6:.1f} | {f('flops_kept', 3)} | "
                     f"{r.get('params', 0) / 1e6:.3f} | {f('map50_noft')} | {f('map50_95_noft')} | {f('map50')} | "
                     f"{f('map50_95')} | {f('prune_s', 1)} | {f('finetune_s', 0)} |")
    text = "\n".join(lines) + "\n"
    (out / "detection_quality.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500, help="dense training steps")
    ap.add_argument("--ft-steps", type=int, default=400, help="fine-tune steps after pruning")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--ratio", type=float, default=0.5, help="FLOPs kept")
    ap.add_argument("--val-images", type=int, default=256)
    ap.add_argument("--tp-timeout", type=int, default=600)
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smoke run (60 + 20 steps, 32 val images)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tp-child", nargs=3, metavar=("SRC", "DST", "KEPT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.tp_child:
        print(json.dumps(_tp_child(a.tp_child[0], a.tp_child[1], float(a.tp_child[2]))))
        return
    if a.quick:
        a.steps, a.ft_steps, a.val_images = 60, 20, 32
    settings = dict(size=SIZE, steps=a.steps, ft_steps=a.ft_steps, batch=a.batch, lr=a.lr, ft_lr=a.ft_lr,
                    ratio=a.ratio, val_images=a.val_images, threads=torch.get_num_threads())
    res = {"settings": settings, "code": git_state(), "rows": []}
    out = Path(a.out) if not a.quick else Path(a.out) / "quick"
    val = [shapes_batch(32, 10_000_000 + i) for i in range(max(1, a.val_images // 32))]

    cache = HERE / "cache" / f"yolov8n_shapes_s{a.steps}_b{a.batch}_lr{a.lr}.pt"
    hist_file = cache.with_suffix(".json")  # the dense run's loss history and time, reported on cached runs too
    if cache.exists():
        dense = torch.load(cache, weights_only=False)
        print(f"dense model from {cache}")
        meta = json.loads(hist_file.read_text()) if hist_file.exists() else {}
        hist = meta.get("loss_history")
        if "dense_train_s" in meta:
            settings["dense_train_s"] = meta["dense_train_s"]
    else:
        print("training the dense model")
        dense = build()
        t = time.time()
        hist = train(dense, a.steps, a.lr, a.batch, seed=0)
        settings["dense_train_s"] = round(time.time() - t)
        cache.parent.mkdir(exist_ok=True)
        torch.save(dense, cache)
        hist_file.write_text(json.dumps({"loss_history": hist, "dense_train_s": settings["dense_train_s"]}))
    base = macs(dense)
    row = {"model": "dense", "status": "trained", "macs": base, "flops_kept": 1.0,
           "params": sum(p.numel() for p in dense.parameters()), **evaluate(dense, val)}
    if hist:
        row["loss_history"] = hist
    res["rows"].append(row)
    print(write(res, out))

    ft_seed = 5_000_000  # fine-tune data: the same batches for every pruned model, not the dense training's
    for name in ["dense + fine-tune", "prunekit", "torch-pruning"]:
        if name == "torch-pruning" and a.no_tp:
            continue
        t = time.time()
        if name == "dense + fine-tune":  # the same extra budget without pruning: the reference the pruned rows chase
            pruned, status = copy.deepcopy(dense), "not pruned"
        elif name == "prunekit":
            try:
                pruned, status = prune_prunekit(dense, a.ratio), "ok (as is)"
            except Exception as e:  # noqa: BLE001 - the row records the failure
                pruned, status = None, f"error: {type(e).__name__}: {str(e)[:200]}"
        else:
            pruned, status = prune_tp(dense, a.ratio, a.tp_timeout)
        row = {"model": name, "status": status, "prune_s": round(time.time() - t, 1)}
        if pruned is not None:
            m = macs(pruned)
            row.update(macs=m, flops_kept=round(m / base, 4), params=sum(p.numel() for p in pruned.parameters()))
            noft = {k: res["rows"][0][k] for k in ("map50", "map50_95")} if name == "dense + fine-tune" \
                else evaluate(pruned, val)  # the unpruned copy's figures are the dense row's
            row.update(map50_noft=noft["map50"], map50_95_noft=noft["map50_95"])
            print(f"{name}: FLOPs kept {m / base:.3f}, before fine-tune {noft}")
            t = time.time()
            row["loss_history"] = train(pruned, a.ft_steps, a.ft_lr, a.batch, seed=ft_seed)
            row["finetune_s"] = round(time.time() - t)
            row.update(evaluate(pruned, val))
        res["rows"].append(row)
        print(write(res, out))


if __name__ == "__main__":
    main()
