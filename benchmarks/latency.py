"""Real speed-ups: measured latency before/after pruning, per backend and batch size (issue 16).

    python benchmarks/latency.py                       # the full run (quiet machine: ~1-2 h on 16 CPU threads)
    python benchmarks/latency.py --quick --models resnet18 --batch 1 --backends eager

For each timm model (random weights) x batch size x backend (eager PyTorch, ONNX Runtime on CPU; eager CUDA
when a GPU is present):

* ``pk flops r8``: ``pk.Pruner(FlopsTarget(0.5), l2, round_to=8)`` (the issue's baseline figure);
* ``pk flops auto``: the same FLOPs target with ``round_to="auto"`` (widths on the fast side of the
  measured staircase of this backend and batch size);
* ``pk latency``: ``pk.LatencyTarget(0.5, backend=..., batch_size=...)`` (latency model + knapsack);
* ``tp magnitude``: Torch-Pruning 1.6.1's ``MagnitudePruner`` (l2, round_to 8) at the MACs of ``pk flops r8``
  (its pruning ratio bisected on MACs), imported from ``--tp-path`` (default /tmp/tpt) when present.

Latency: the dense model and every pruned one are timed interleaved in this one process (``--rounds`` rounds,
each model in turn, ``--repeats`` runs per model in all; ``prunekit.cost.latency_model.measure_many``), so that
a shared machine's drift falls on all alike; *latency kept* is the median over rounds of the paired ratio to the
dense model, the ms columns are the median and IQR of all runs; *efficiency* = latency reduction / MAC
reduction (1.0: the removed MACs turn into time one-for-one).  The latency model's
prediction of every pruned model is reported next to its measurement (``pred err``).

``--quality`` adds the Fashion-MNIST comparison at an equal measured latency (the models, loader and trainer
of ``quality_fmnist.py``): the FLOPs plan (``FlopsTarget(0.5)``) is measured, then the latency-aware plan is
made at that measured latency (``LatencyTarget(r)``), both fine-tuned with the same budget; test accuracy.
Its latency is measured at ``--quality-batch`` (default 128): at small batches these tiny models are
overhead-bound (a half-MACs ResNet measured slower than the dense one at batch 8).

Writes ``benchmarks/results/latency.json`` and ``latency.md`` (``--out`` to change).  The machine must be quiet:
every figure is a wall-clock time.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_common import git_state  # noqa: E402

import prunekit as pk  # noqa: E402
from prunekit.cost.latency_model import (BackendUnavailable, LatencyModel, device_name,  # noqa: E402
                                        measure_many)

log = logging.getLogger("bench.latency")
MODELS = ["resnet50", "convnext_tiny", "mobilenetv3_large_100", "efficientnet_b0", "vit_small_patch16_224"]
TARGET = 0.5


def build(name: str) -> nn.Module:
    import timm
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def macs(model: nn.Module, x: torch.Tensor) -> int:
    return int(pk.count(model, x).macs)


# ------------------------------------------------------------------------------------------- methods
def pk_prune(model: nn.Module, x: torch.Tensor, target: Any, round_to: Any, lm: LatencyModel | None) -> nn.Module:
    m = copy.deepcopy(model)
    lm_m = None
    if lm is not None:  # the latency model is of ``model``; the copy has the same names and widths
        lm_m = copy.copy(lm)
        lm_m._model = m
    p = pk.Pruner(m, x, "l2", target, round_to=round_to, latency_model=lm_m)
    p.prune()
    return m


def tp_path_ok(path: str) -> str | None:
    if path and path not in sys.path:
        sys.path.append(path)
    try:
        import torch_pruning  # noqa: F401
    except ImportError as e:
        return f"torch-pruning not importable ({e}); pip install --target {path} torch-pruning==1.6.1"
    return None


def tp_magnitude(model: nn.Module, x: torch.Tensor, goal_macs: int) -> nn.Module:
    """Torch-Pruning's MagnitudePruner (l2, round_to 8, local) with the pruning ratio bisected to ``goal_macs``."""
    import torch_pruning as tp

    def run(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        pr = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=head, round_to=8)
        pr.step()
        return m
    lo, hi, best = 0.0, 0.95, None
    for _ in range(9):
        mid = (lo + hi) / 2
        m = run(mid)
        if macs(m, x) <= goal_macs:
            best, hi = m, mid
        else:
            lo = mid
    return best if best is not None else run(hi)


# ------------------------------------------------------------------------------------------- one cell
def bench_cell(name: str, batch: int, backend: str, device: str, args, tp_reason: str | None) -> dict[str, Any]:
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    if device == "cuda":
        model, x = model.cuda(), x.cuda()
    cell: dict[str, Any] = {"model": name, "batch": batch, "backend": backend, "device": device, "methods": {}}
    t0 = time.perf_counter()
    try:
        lm = LatencyModel(model, x, backend, device=device, batch_size=batch, graph=pk.analyze(model, x),
                          points=args.points, repeats=args.layer_repeats)
    except BackendUnavailable as e:
        cell["skipped"] = str(e)
        return cell
    cell["latency_model"] = {"seconds": round(time.perf_counter() - t0, 1), "layers": len(lm.layers),
                             "measured": lm.measured, "from_cache": lm.cached_hits, "rest_ms": lm.rest_ms,
                             "scale": lm.scale, "offset_ms": lm.offset,
                             "calibration_uncalibrated_error": (lm.calibration or {}).get("uncalibrated_error")}
    base_macs = macs(model, x)
    methods = {"pk flops r8": lambda: pk_prune(model, x, pk.FlopsTarget(TARGET), 8, None),
               "pk flops auto": lambda: pk_prune(model, x, pk.FlopsTarget(TARGET), "auto", lm),
               "pk latency": lambda: pk_prune(model, x, pk.LatencyTarget(TARGET, backend=backend, device=device,
                                                                         batch_size=batch, repeats=args.repeats),
                                              8, lm)}
    if "tp" in args.methods:
        methods["tp magnitude"] = None
    methods = {k: v for k, v in methods.items() if any(k.startswith(m) for m in args.methods)}
    pruned_models: dict[str, nn.Module] = {}
    for meth, fn in methods.items():
        t1 = time.perf_counter()
        try:
            if meth == "tp magnitude":
                if tp_reason:
                    cell["methods"][meth] = {"skipped": tp_reason}
                    continue
                goal = cell["methods"].get("pk flops r8", {}).get("macs", int(base_macs * TARGET))
                pruned = tp_magnitude(model, x, goal)
            else:
                pruned = fn()
        except Exception as e:  # noqa: BLE001 - a method failing on a model is a result too
            cell["methods"][meth] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log.warning("%s %s b%d %s: %s", name, meth, batch, backend, cell["methods"][meth]["error"])
            continue
        mk = macs(pruned, x)
        try:
            pred = lm.predict_widths(_widths(pruned, lm))
        except Exception:  # noqa: BLE001 - TP may rename/replace layers
            pred = None
        cell["methods"][meth] = {"macs": mk, "macs_kept": mk / base_macs, "predicted_ms": pred,
                                 "seconds": round(time.perf_counter() - t1, 1)}
        pruned_models[meth] = pruned
    # the dense model and every pruned one timed interleaved (rounds of each in turn): a shared machine's drift
    # falls on all alike; latency kept is the per-round paired ratio to the dense model
    # an identical copy of the dense model timed with them: its ratio to the dense model (ideally 1) is this
    # cell's measurement noise
    names = list(pruned_models)
    res = measure_many([model] + [pruned_models[n] for n in names] + [copy.deepcopy(model)], x, backend, device,
                       batch_size=batch, rounds=args.rounds, repeats=args.repeats)
    cell["noise"] = res.ratio(len(names) + 1) - 1.0
    base = res.timings[0].to_dict()
    cell["before"] = {"macs": base_macs, **base}
    for i, meth in enumerate(names, start=1):
        r = cell["methods"][meth]
        t = res.timings[i].to_dict()
        kept = res.ratio(i)
        red_lat, red_macs = 1 - kept, 1 - r["macs_kept"]
        pred = r["predicted_ms"]
        r.update(**t, latency_kept=kept, efficiency=red_lat / red_macs if red_macs > 0 else None,
                 prediction_error=(pred / t["median_ms"] - 1) if pred else None)
        log.info("%s b%d %s %s: MACs %.3f latency %.3f eff %s", name, batch, backend, meth, r["macs_kept"], kept,
                 r["efficiency"])
    return cell


def _widths(model, lm):
    from prunekit.cost.latency_model import _widths_of
    return _widths_of(model, lm.layers)


# ------------------------------------------------------------------------------------------- quality
def quality(args) -> dict[str, Any]:
    """Fashion-MNIST at an equal measured latency: FLOPs plan vs latency-aware plan, same fine-tune budget."""
    import quality_fmnist as q
    try:
        data = q.load_fmnist(Path(args.data_dir) if args.data_dir else q.DATA_DIR,
                             train_limit=4000 if args.quick else None, test_limit=2000 if args.quick else None)
    except q.DatasetMissing as e:
        return {"skipped": str(e)}
    budget = q.Budget()
    if args.quick:
        budget.base_steps, budget.ft_steps = 100, 20
    out = {"budget": {k: getattr(budget, k) for k in ("base_steps", "ft_steps", "ft_lr", "batch")}, "models": {}}
    for name in ("resnet", "mobilenetv2"):
        base, info = q.baseline(name, data, budget, "cpu")
        x = data.xtr[:1].clone()
        b = args.quality_batch
        lm = LatencyModel(base, x, "eager", batch_size=b, graph=pk.analyze(base, x), points=args.points)
        flops = pk_prune(base, x, pk.FlopsTarget(TARGET), 8, None)
        r = min(1.0, measure_many([base, flops], x, "eager", "cpu", batch_size=b, rounds=args.rounds,
                                  repeats=args.repeats).ratio(1))
        lat = pk_prune(base, x, pk.LatencyTarget(r, batch_size=b, repeats=args.repeats), 8, lm)
        t = measure_many([base, flops, lat], x, "eager", "cpu", batch_size=b, rounds=args.rounds,
                         repeats=args.repeats)
        res = {"base_acc": q.accuracy(base, data.xte, data.yte, "cpu"), "latency_ratio_goal": r, "batch": b}
        for i, (label, m) in enumerate((("flops", flops), ("latency", lat)), start=1):
            q.train(m, data, budget.ft_steps, lr=budget.ft_lr, budget=budget, seed=budget.seed, device="cpu")
            res[label] = {"acc": q.accuracy(m, data.xte, data.yte, "cpu"), "latency_kept": t.ratio(i),
                          "macs_kept": macs(m, x) / macs(base, x)}
        out["models"][name] = res
    return out


# ------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Latency benchmark ({res['date']}, {res['git']})", "",
             f"Device: {res['device']}; torch {res['torch']}; repeats {res['repeats']} (median, IQR); target "
             f"{TARGET} of MACs (FLOPs target) / of measured latency (latency target). Efficiency = latency "
             "reduction / MAC reduction. `pred err`: latency model prediction vs measurement.", "",
             "| model | batch | backend | method | MACs kept | latency ms (IQR) | latency kept | efficiency | pred err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        head = f"| {c['model']} | {c['batch']} | {c['backend']} "
        if "skipped" in c:
            lines.append(head + f"| skipped: {c['skipped']} | | | | | |")
            continue
        b = c["before"]
        lines.append(head + f"| dense | 1.000 | {b['median_ms']:.2f} ({b['q1_ms']:.2f}-{b['q3_ms']:.2f}) | 1.000 | | |")
        if c.get("noise") is not None:
            lines.append(head + f"| dense copy (noise) | 1.000 | | {1 + c['noise']:.3f} | | |")
        for meth, r in c["methods"].items():
            if "macs" not in r:
                lines.append(head + f"| {meth} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
            err = f"{r['prediction_error']:+.1%}" if r["prediction_error"] is not None else "-"
            lines.append(head + f"| {meth} | {r['macs_kept']:.3f} | {r['median_ms']:.2f} ({r['q1_ms']:.2f}-"
                                f"{r['q3_ms']:.2f}) | {r['latency_kept']:.3f} | {eff} | {err} |")
    lines += summary_lines(res) + model_lines(res)
    q = res.get("quality")
    if q:
        lines += ["", "## Fashion-MNIST at equal measured latency", ""]
        if "skipped" in q:
            lines.append(f"skipped: {q['skipped']}")
        else:
            lines += [f"Fine-tune budget: {q['budget']}; latency measured at batch "
                      f"{next(iter(q['models'].values()), {}).get('batch', '-')}, eager, interleaved", "",
                      "| model | dense acc | FLOPs plan: acc / latency / MACs | latency plan: acc / latency / MACs |",
                      "|---|---|---|---|"]
            for name, r in q["models"].items():
                f, la = r["flops"], r["latency"]
                lines.append(f"| {name} | {r['base_acc']:.4f} | {f['acc']:.4f} / {f['latency_kept']:.3f} / "
                             f"{f['macs_kept']:.3f} | {la['acc']:.4f} / {la['latency_kept']:.3f} / "
                             f"{la['macs_kept']:.3f} |")
    return "\n".join(lines) + "\n"


def summary(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method over the cells: median efficiency, cells at efficiency >= 0.95, median |prediction error|;
    for the latency target also the cells within 5 % of the goal and at or under goal + 5 %."""
    tgt = res.get("targets", {})
    e_min, within = tgt.get("efficiency_at_50pct_macs", 0.95), tgt.get("latency_target_within", 0.05)
    out: dict[str, dict[str, Any]] = {}
    for c in res["cells"]:
        for meth, r in c.get("methods", {}).items():
            d = out.setdefault(meth, {"cells": 0, "ok": 0, "eff": [], "err": [], "within": 0, "under": 0})
            d["cells"] += 1
            if "macs" not in r:
                continue
            d["ok"] += 1
            if r.get("efficiency") is not None:
                d["eff"].append(r["efficiency"])
            if r.get("prediction_error") is not None:
                d["err"].append(abs(r["prediction_error"]))
            k = r["latency_kept"] / TARGET
            d["within"] += abs(k - 1) <= within
            d["under"] += k <= 1 + within
    for d in out.values():
        eff, err = d.pop("eff"), d.pop("err")
        d["median_efficiency"] = statistics.median(eff) if eff else None
        d["efficiency_ge_target"] = sum(e >= e_min for e in eff)
        d["median_abs_prediction_error"] = statistics.median(err) if err else None
    return out


def model_lines(res: dict[str, Any]) -> list[str]:
    """Per cell: the latency model (layers, timings, build time) and its whole-model correction: the error of the
    uncalibrated per-layer prediction at half width, the fitted scale and the fixed share (offset / dense ms)."""
    lines = ["", "## Latency model and whole-model correction", "",
             "The fit runs through the dense model and a copy with every prunable group at half width. Fixed share = "
             "offset of the fit / dense latency: time that does not shrink with the layers' predicted time "
             "(per-op overhead, unprunable layers, and any non-linearity between the two points); negative where "
             "layers timed alone are slower than inside the model (ONNX Runtime fuses them).", "",
             "| model | batch | backend | layers | timings (cached) | build s | uncalibrated err at half width | "
             "scale | fixed share |", "|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        lm, b = c.get("latency_model"), c.get("before")
        if not lm or not b or "scale" not in lm:
            continue
        err = lm.get("calibration_uncalibrated_error")
        share = lm["offset_ms"] / b["median_ms"] if b["median_ms"] > 0 else 0.0
        lines.append(f"| {c['model']} | {c['batch']} | {c['backend']} | {lm['layers']} | {lm['measured']} "
                     f"({lm['from_cache']}) | {lm['seconds']} | {format(err, '+.1%') if err is not None else '-'} | "
                     f"{lm['scale']:.3f} | {share:+.3f} |")
    return lines


def summary_lines(res: dict[str, Any]) -> list[str]:
    lines = ["", "## Summary", "",
             "| method | cells (ran) | median efficiency | efficiency >= 0.95 | latency within 5 % of 0.5 | "
             "latency <= 0.5 + 5 % | median abs pred err |", "|---|---|---|---|---|---|---|"]
    noise = sorted(abs(c["noise"]) for c in res["cells"] if c.get("noise") is not None)
    if noise:
        lines[3:3] = [f"Measurement noise: an identical copy of the dense model, timed interleaved with the others, "
                      f"measures {statistics.median(noise):.1%} off the dense model in the median cell, up to "
                      f"{noise[-1]:.1%}.", ""]
    for meth, d in summary(res).items():
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        lines.append(f"| {meth} | {d['cells']} ({d['ok']}) | {f(d['median_efficiency'], '.2f')} | "
                     f"{d['efficiency_ge_target']} | {d['within']} | {d['under']} | "
                     f"{f(d['median_abs_prediction_error'], '.1%')} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"],
                    help="eager, compile, onnxruntime (CPU); eager on CUDA is added when a GPU is present")
    ap.add_argument("--methods", nargs="+", default=["pk flops r8", "pk flops auto", "pk latency", "tp"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a sparser width grid (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per model (spread over --rounds)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the dense and pruned models")
    ap.add_argument("--layer-repeats", type=int, default=None)
    ap.add_argument("--points", type=int, default=None, help="anchors of the latency model's width grid")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--tp-path", default="/tmp/tpt")
    ap.add_argument("--quality", action="store_true", help="also the Fashion-MNIST comparison at equal latency")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--quality-batch", type=int, default=128,
                    help="batch size the quality comparison's latency is measured at (the tiny models are "
                         "overhead-bound at small batches)")
    ap.add_argument("--out", default=str(HERE / "results" / "latency"))
    ap.add_argument("--rerender", metavar="JSON", help="only rewrite the markdown of a results JSON")
    args = ap.parse_args(argv)
    if args.rerender:
        src = Path(args.rerender)
        src.with_suffix(".md").write_text(markdown(json.loads(src.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (7 if args.quick else 30)
    args.layer_repeats = args.layer_repeats or (3 if args.quick else None)
    args.points = args.points or (3 if args.quick else None)
    tp_reason = tp_path_ok(args.tp_path) if "tp" in args.methods else "not requested"
    cells = []
    combos = [(b, be, "cpu") for b in args.batch for be in args.backends]
    if torch.cuda.is_available():
        combos += [(b, "eager", "cuda") for b in args.batch]
    for name in args.models:
        for b, be, dev in combos:
            log.info("== %s batch %d %s on %s", name, b, be, dev)
            cells.append(bench_cell(name, b, be, dev, args, tp_reason))
            _write(args, cells, None)
    q = quality(args) if args.quality else None
    _write(args, cells, q)
    return 0


def _write(args, cells, q) -> None:
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "git": git_state(), "device": device_name("cpu"),
           "cpu_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
           "repeats": args.repeats, "quick": args.quick, "argv": sys.argv[1:], "cells": cells, "quality": q,
           "targets": {"efficiency_at_50pct_macs": 0.95, "latency_target_within": 0.05}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(res))


if __name__ == "__main__":
    raise SystemExit(main())
