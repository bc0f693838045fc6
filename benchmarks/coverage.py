#!/usr/bin/env python
"""Coverage sweep of prunekit over timm models (optionally side by side with Torch-Pruning).

For every selected model (random weights, eval mode, batch 1, the model's default input size
capped at 224 px) the sweep records:

* ``pk.analyze`` wall time, number of groups / prunable groups / exact prunable groups,
  ``graph.prunable_proportion`` (fraction of FLOPs in prunable groups), unsupported ops;
* the result of pruning every prunable group by a random 30-50 % of its units (seeded, at least
  one unit kept) with ``pk.prune(..., verify=True)``, followed by an output-shape check;
* a status: ``exact`` (every pruned group exact, verified), ``ok`` (verified, some groups
  inexact), ``pinned-only`` (no prunable group), ``skipped (size)`` or ``error: <message>``;
* with ``--torch-pruning``: Torch-Pruning's ``DependencyGraph().build_dependency`` time and the
  outcome of a ``BasePruner`` (= ``MetaPruner``) step with ``pruning_ratio=0.4`` and the classifier
  ignored, followed by the same output-shape check (``ok`` / ``error: ...``).

Each model runs in a spawned worker process with a per-model timeout, so one hang or crash does
not stop the sweep (the worker is restarted).  Models over ``--max-params`` (counted by building
them on the meta device) are recorded as ``skipped (size)``.

Default selection: one representative per timm model module ("family"): the smallest model of
the family by parameter count (``test_*`` models excluded unless the family has nothing else).

Usage::

    python benchmarks/coverage.py                    # default family subset
    python benchmarks/coverage.py --torch-pruning    # + Torch-Pruning column
    python benchmarks/coverage.py --all              # every timm.list_models()
    python benchmarks/coverage.py --family 'vision_transformer*' --all
    python benchmarks/coverage.py --model resnet18 --model vit_tiny_patch16_224
"""
from __future__ import annotations

import argparse
import atexit
import copy
import datetime as _dt
import fnmatch
import json
import multiprocessing as mp
import os
import platform
import queue
import random
import signal
import statistics
import sys
import threading
import time
import traceback
import warnings
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_common import git_state as _git_state  # noqa: E402
RESULTS = HERE / "results"
MAX_SIDE = 224


# ----------------------------------------------------------------------------- helpers (worker side)
def _quiet():
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)


def _shapes(out):
    import torch
    from torch.utils._pytree import tree_flatten
    flat, _ = tree_flatten(out)
    return [tuple(t.shape) for t in flat if isinstance(t, torch.Tensor)]


def _nparams(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _short(e: BaseException, limit: int = 1500) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def _traceback(limit: int = 5000) -> str:
    """The current exception's traceback without torch-internal frames (they are mostly noise)."""
    out, skip = [], False
    for line in traceback.format_exc().splitlines():
        if line.startswith('  File "'):
            skip = "/site-packages/torch/" in line
            if skip:
                continue
        elif skip and line.startswith("    "):
            continue
        else:
            skip = False
        out.append(line)
    text = "\n".join(out)
    return text if len(text) <= limit else "..." + text[-limit:]


def _meta_info(name: str):
    """(param count, input size) from a meta-device build (no weight memory)."""
    import timm
    import torch
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False)
    cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None) or {}
    return _nparams(m), tuple(cfg.get("input_size", (3, 224, 224)))


def _build(name: str, seed: int, native_size):
    """Build the model with random weights; returns (model, input tensor, note).

    Tries, in order: the default build at min(native, 224) px; ``img_size=224`` (timm's way of
    re-sizing position embeddings / windows) at 224 px; the default build at the native size.
    The first combination whose forward runs is used.
    """
    import timm
    import torch
    c, h, w = native_size
    ch, cw = min(h, MAX_SIDE), min(w, MAX_SIDE)
    tries = [({}, (ch, cw), "")]
    if (ch, cw) != (h, w):
        tries += [({"img_size": MAX_SIDE}, (MAX_SIDE, MAX_SIDE), f"built with img_size={MAX_SIDE}"),
                  ({}, (h, w), f"native input size {h}x{w} (model rejects {MAX_SIDE} px)")]
    err = None
    model, model_kw = None, None
    for kw, (hh, ww), note in tries:
        try:
            if model is None or kw != model_kw:
                torch.manual_seed(seed)
                model, model_kw = None, None
                model = timm.create_model(name, pretrained=False, **kw).eval()
                model_kw = kw
            torch.manual_seed(seed + 1)
            x = torch.randn(1, c, hh, ww)
            with torch.no_grad():
                model(x)
            return model, x, note
        except Exception as e:
            err = e
    raise err


def _classifier_modules(model):
    import torch.nn as nn
    try:
        clf = model.get_classifier()
    except Exception:
        return []
    mods = clf if isinstance(clf, (tuple, list)) else [clf]
    return [m for m in mods if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]


def run_prunekit(name: str, seed: int, max_params: int, state: dict) -> dict:
    import torch
    import prunekit as pk
    res: dict = {"model": name}
    stage = "meta-build"
    try:
        try:
            n, native = _meta_info(name)
            res["params_m"] = round(n / 1e6, 3)
        except Exception as e:  # some models cannot be built on meta; build them for real
            n, native = None, None
            res["meta_build_error"] = _short(e, 300)
        if n is not None and n > max_params:
            res["status"] = "skipped (size)"
            return res
        stage = "build"
        t0 = time.perf_counter()
        if native is None:
            import timm
            native = tuple((timm.models.get_pretrained_cfg(name).to_dict() or {}).get("input_size", (3, 224, 224)))
        model, x, note = _build(name, seed, native)
        res["params_m"] = round(_nparams(model) / 1e6, 3)
        res["input"] = list(x.shape)
        if note:
            res["note"] = note
        res["build_s"] = round(time.perf_counter() - t0, 3)
        if _nparams(model) > max_params:
            res["status"] = "skipped (size)"
            return res
        with torch.no_grad():
            ref_shapes = _shapes(model(x))
        state["model"], state["x"], state["ref_shapes"] = copy.deepcopy(model), x, ref_shapes

        stage = "analyze"
        t0 = time.perf_counter()
        graph = pk.analyze(model, x)
        res["analysis_s"] = round(time.perf_counter() - t0, 4)
        res["groups"] = len(graph.groups)
        pg = graph.prunable_groups
        res["prunable"] = len(pg)
        res["exact"] = sum(1 for g in pg if g.exact)
        res["prunable_proportion"] = round(graph.prunable_proportion, 4)
        res["gmacs"] = round(graph.macs() / 1e9, 4)
        if graph.unsupported_ops:
            res["unsupported_ops"] = sorted(graph.unsupported_ops)
        if not pg:
            res["status"] = "pinned-only"
            return res

        stage = "prune"
        rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode()))
        plan = {}
        for g in pg:
            n_drop = min(g.size - 1, max(1, round(rng.uniform(0.3, 0.5) * g.size)))
            plan[g.id] = sorted(rng.sample(range(g.size), n_drop))
        res["gmacs_after"] = round(graph.macs({k: len(v) for k, v in plan.items()}) / 1e9, 4)
        all_exact = all(graph.group(k).exact for k in plan)
        t0 = time.perf_counter()
        pk.prune(model, graph, plan, verify=True)
        res["prune_s"] = round(time.perf_counter() - t0, 3)
        res["params_after_m"] = round(_nparams(model) / 1e6, 3)
        stage = "shape-check"
        with torch.no_grad():
            shapes = _shapes(model(x))
        if shapes != ref_shapes:
            res["status"] = f"error: [shape-check] output shapes changed {ref_shapes} -> {shapes}"
            return res
        res["status"] = "exact" if all_exact else "ok"
        return res
    except Exception as e:
        res["status"] = f"error: [{stage}] {_short(e)}"
        res["traceback"] = _traceback()
        return res


def run_torch_pruning(state: dict) -> dict:
    import torch
    import torch_pruning as tp
    res: dict = {}
    if "model" not in state:
        return res
    model, x, ref_shapes = state["model"], state["x"], state["ref_shapes"]
    stage = "build_dependency"
    try:
        t0 = time.perf_counter()
        tp.DependencyGraph().build_dependency(model, example_inputs=x)
        res["tp_analysis_s"] = round(time.perf_counter() - t0, 4)
        stage = "prune"
        pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=0.4, ignored_layers=_classifier_modules(model))
        pruner.step()
        stage = "forward"
        with torch.no_grad():
            shapes = _shapes(model(x))
        if shapes != ref_shapes:
            res["tp_status"] = f"error: [shape-check] output shapes changed {ref_shapes} -> {shapes}"
        else:
            res["tp_status"] = "ok"
        res["tp_params_after_m"] = round(_nparams(model) / 1e6, 3)
    except Exception as e:
        res["tp_status"] = f"error: [{stage}] {_short(e, 600)}"
    return res


def _warmup(do_tp: bool) -> None:
    """One tiny analysis so the first real model does not pay one-time import/dispatch costs."""
    import torch
    import prunekit as pk
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    pk.analyze(m, x)
    if do_tp:
        import torch_pruning as tp
        tp.DependencyGraph().build_dependency(m, example_inputs=x)


def worker_main(conn, do_tp: bool, threads: int) -> None:
    _quiet()
    import torch
    if threads:
        torch.set_num_threads(threads)
    try:
        _warmup(do_tp)
    except Exception:
        pass
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        state: dict = {}
        conn.send(("pk", run_prunekit(task["model"], task["seed"], task["max_params"], state)))
        if do_tp:
            conn.send(("tp", run_torch_pruning(state)))
        state.clear()
        import gc
        gc.collect()


# ----------------------------------------------------------------------------- driver side
_LIVE_WORKERS: set = set()


def _kill_all_workers(*_):
    for w in list(_LIVE_WORKERS):
        w.kill()


class Worker:
    def __init__(self, do_tp: bool, threads: int):
        self.do_tp, self.threads = do_tp, threads
        self.proc = None
        self.conn = None

    def start(self):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, self.do_tp, self.threads), daemon=True)
        self.proc.start()
        _LIVE_WORKERS.add(self)
        child.close()
        self.conn = parent

    def kill(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
        self.proc = None
        _LIVE_WORKERS.discard(self)

    def stop(self):
        if self.proc is not None and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(10)
            except Exception:
                pass
        self.kill()

    def recv(self, timeout: float):
        """('ok', msg) | ('timeout', None) | ('crash', exitcode)"""
        try:
            if self.conn.poll(timeout):
                return "ok", self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            return "crash", self.proc.exitcode
        if not self.proc.is_alive():
            return "crash", self.proc.exitcode
        return "timeout", None

    def run(self, task: dict, timeout: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        t0 = time.perf_counter()
        self.conn.send(task)
        kind, msg = self.recv(timeout)
        if kind != "ok":
            self.kill()
            why = f"timeout after {timeout:.0f}s" if kind == "timeout" else f"worker crashed (exit code {msg})"
            res = {"model": task["model"], "status": f"error: [worker] {why}"}
            if self.do_tp:
                res["tp_status"] = "n/a (prunekit run did not finish)"
            return res
        res = msg[1]
        if self.do_tp:
            # prunekit's result is in; Torch-Pruning gets its own timeout budget
            kind, msg = self.recv(timeout)
            if kind == "ok":
                res.update(msg[1])
            else:
                self.kill()
                res["tp_status"] = (f"error: [worker] timeout after {timeout:.0f}s" if kind == "timeout"
                                    else f"error: [worker] crashed (exit code {msg})")
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        return res


def family_of(names):
    from timm.models import _registry
    return {n: _registry._model_to_module.get(n, "?") for n in names}


def select_models(args) -> list[str]:
    import timm
    names = timm.list_models()
    fam = family_of(names)
    if args.model:
        return list(args.model)
    if args.family:
        names = [n for n in names if fnmatch.fnmatch(fam[n], args.family)]
    if args.all:
        return names
    return representatives(names, fam, args)


def representatives(names, fam, args) -> list[str]:
    """Smallest model (meta-device parameter count) of each family; counts are cached."""
    import timm
    import torch
    cache_file = RESULTS / ".timm_param_counts.json"
    cache = {}
    if cache_file.exists():
        try:
            data = json.loads(cache_file.read_text())
            if data.get("timm") == timm.__version__:
                cache = data["counts"]
        except Exception:
            cache = {}
    missing = [n for n in names if n not in cache]
    if missing:
        print(f"counting parameters of {len(missing)} models on the meta device (cached afterwards) ...",
              flush=True)
        _quiet()
        for n in missing:
            try:
                with torch.device("meta"):
                    m = timm.create_model(n, pretrained=False)
                cache[n] = _nparams(m)
            except Exception:
                cache[n] = None
            m = None
        RESULTS.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({"timm": timm.__version__, "counts": cache}))
    by_fam: dict[str, list[str]] = {}
    for n in names:
        by_fam.setdefault(fam[n], []).append(n)
    picks = []
    for f in sorted(by_fam):
        cands = by_fam[f]
        non_test = [n for n in cands if not n.startswith("test_")]
        cands = non_test or cands
        big = float("inf")
        picks.append(min(cands, key=lambda n: (cache.get(n) if cache.get(n) is not None else big, n)))
    return picks


def _fmt_status(s: str, width: int = 140) -> str:
    s = s.replace("|", "\\|")
    return s if len(s) <= width else s[:width] + " ..."


def summarize(results: list[dict], do_tp: bool) -> dict:
    done = [r for r in results if not r.get("status", "").startswith("skipped")]
    n = len(done)
    cnt = {k: 0 for k in ("exact", "ok", "pinned-only", "error")}
    for r in done:
        s = r.get("status", "error")
        cnt["error" if s.startswith("error") else s] = cnt.get("error" if s.startswith("error") else s, 0) + 1
    pct = {k: (100.0 * v / n if n else 0.0) for k, v in cnt.items()}
    times = [r["analysis_s"] for r in done if "analysis_s" in r]
    summ = {
        "models": len(results), "attempted": n, "skipped_size": len(results) - n, "counts": cnt,
        "percent": {k: round(v, 1) for k, v in pct.items()},
        "median_analysis_s": round(statistics.median(times), 4) if times else None,
        "mean_prunable_proportion": round(statistics.mean(r["prunable_proportion"] for r in done
                                                          if "prunable_proportion" in r), 4)
        if any("prunable_proportion" in r for r in done) else None,
    }
    if do_tp:
        tp_ok = sum(1 for r in done if r.get("tp_status") == "ok")
        tp_times = [r["tp_analysis_s"] for r in done if "tp_analysis_s" in r]
        both = [(r["analysis_s"], r["tp_analysis_s"]) for r in done if "analysis_s" in r and "tp_analysis_s" in r]
        summ["tp"] = {
            "ok": tp_ok, "percent_ok": round(100.0 * tp_ok / n, 1) if n else 0.0,
            "median_build_dependency_s": round(statistics.median(tp_times), 4) if tp_times else None,
            "median_speedup_tp_over_pk": round(statistics.median(t / p for p, t in both if p > 0), 2)
            if both else None,
            "pk_verified_and_tp_ok": sum(1 for r in done if r.get("tp_status") == "ok"
                                         and r.get("status") in ("exact", "ok")),
            "pk_verified_tp_error": sum(1 for r in done if str(r.get("tp_status", "")).startswith("error")
                                        and r.get("status") in ("exact", "ok")),
            "pk_error_tp_ok": sum(1 for r in done if r.get("tp_status") == "ok"
                                  and str(r.get("status", "")).startswith("error")),
        }
    return summ


def summary_line(s: dict) -> str:
    p, c = s["percent"], s["counts"]
    line = (f"{s['attempted']} models analysed ({s['skipped_size']} skipped for size): "
            f"exact {c['exact']} ({p['exact']:.1f}%), ok {c['ok']} ({p['ok']:.1f}%), "
            f"pinned-only {c['pinned-only']} ({p['pinned-only']:.1f}%), error {c['error']} ({p['error']:.1f}%); "
            f"median analysis time {s['median_analysis_s']} s")
    if s.get("mean_prunable_proportion") is not None:
        line += f"; mean prunable FLOPs proportion {100 * s['mean_prunable_proportion']:.1f}%"
    if "tp" in s:
        t = s["tp"]
        line += (f". Torch-Pruning: ok {t['ok']} ({t['percent_ok']:.1f}%), median build_dependency "
                 f"{t['median_build_dependency_s']} s, median TP/prunekit analysis-time ratio "
                 f"{t['median_speedup_tp_over_pk']}x")
    return line


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file so an interrupted run never leaves a truncated result (``--resume`` reads it)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(results, meta, do_tp, out_json: Path, out_md: Path) -> dict:
    summ = summarize(results, do_tp)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_json, json.dumps({"meta": meta, "summary": summ, "results": results}, indent=1))
    hdr = ["model", "family", "params (M)", "input", "analysis (s)", "groups", "prunable", "exact",
           "prunable FLOPs", "MACs kept", "status"]
    if do_tp:
        hdr += ["TP build (s)", "TP"]
    lines = [f"# prunekit coverage on timm ({meta['selection']})", "",
             f"Generated {meta['date']} on {meta['machine']}; torch {meta['torch']}, timm {meta['timm']}, "
             f"prunekit {meta['prunekit']} (git {meta['git']})" + (f", torch-pruning {meta.get('torch_pruning')}" if do_tp else "")
             + f". {meta['jobs']} worker(s) x {meta['threads_per_worker']} torch thread(s). "
             f"Command: `{meta['command']}`" + (f". Total {meta['total_s']} s" if "total_s" in meta else ""), "",
             "**Summary:** " + summary_line(summ) + ".", "",
             "Status: `exact` = every pruned group exact and verified against the masked original; `ok` = "
             "verified (shape checks), some groups inexact; `pinned-only` = no prunable group. Each prunable "
             "group is pruned by a random 30-50% of its units (seeded). `prunable FLOPs` = "
             "`graph.prunable_proportion`; `MACs kept` = predicted MACs after the plan / before. "
             "Percentages exclude models skipped for size." + (
                 " TP = Torch-Pruning `BasePruner` (MetaPruner) step, pruning_ratio=0.4, classifier ignored, "
                 "then output-shape check; `TP build` = `DependencyGraph().build_dependency` time." if do_tp
                 else ""), "",
             "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in results:
        kept = ""
        if r.get("gmacs") and "gmacs_after" in r:
            kept = f"{100 * r['gmacs_after'] / r['gmacs']:.0f}%"
        row = [r["model"], r.get("family", ""), str(r.get("params_m", "")),
               "x".join(str(v) for v in r.get("input", [])[2:]),
               str(r.get("analysis_s", "")), str(r.get("groups", "")), str(r.get("prunable", "")),
               str(r.get("exact", "")),
               f"{100 * r['prunable_proportion']:.1f}%" if "prunable_proportion" in r else "",
               kept, _fmt_status(r.get("status", ""))]
        if do_tp:
            row += [str(r.get("tp_analysis_s", "")), _fmt_status(r.get("tp_status", ""), 90)]
        lines.append("| " + " | ".join(row) + " |")
    _atomic_write(out_md, "\n".join(lines) + "\n")
    return summ


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every timm.list_models() (default: one per family)")
    ap.add_argument("--family", help="fnmatch pattern on the timm module name, e.g. 'resnet*'")
    ap.add_argument("--model", action="append", help="explicit model name (repeatable)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N selected models")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per model (and again for TP)")
    ap.add_argument("--torch-pruning", action="store_true", help="add Torch-Pruning's side-by-side column")
    ap.add_argument("--max-params", type=float, default=300e6, help="skip models above this many parameters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="models run in parallel (one worker process each)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per worker (0 = torch default with --jobs 1, else 1)")
    ap.add_argument("--out", default=str(RESULTS / "coverage"), help="output path without extension")
    ap.add_argument("--resume", action="store_true",
                    help="keep the results already in the output JSON and run only the missing models")
    ap.add_argument("--tp-from", help="reuse Torch-Pruning results (tp_* fields) for models already in this earlier "
                                      "coverage JSON (TP's result does not depend on prunekit's code)")
    args = ap.parse_args(argv)

    import timm
    import torch
    import prunekit
    names = select_models(args)
    if args.limit:
        names = names[:args.limit]
    fam = family_of(names)
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "torch": torch.__version__, "timm": timm.__version__, "prunekit": prunekit.__version__,
        "selection": ("--model" if args.model else "all models" if args.all else "one smallest model per family")
        + (f", family={args.family}" if args.family else "") + (f", limit={args.limit}" if args.limit else ""),
        "command": "python benchmarks/coverage.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "git": _git_state(),
        "timeout_s": args.timeout, "max_params": args.max_params, "seed": args.seed,
    }
    if args.torch_pruning:
        import torch_pruning as tp
        meta["torch_pruning"] = getattr(tp, "__version__", "?")
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    print(f"{len(names)} models; results -> {out_json}, {out_md}", flush=True)

    threads = args.threads or (0 if args.jobs == 1 else 1)
    meta["jobs"], meta["threads_per_worker"] = args.jobs, threads or torch.get_num_threads()
    slots: list = [None] * len(names)
    prev_total = 0.0
    if args.resume and out_json.exists():
        old = json.loads(out_json.read_text())
        have = {r["model"]: r for r in old.get("results", [])}
        for i, name in enumerate(names):
            slots[i] = have.get(name)
        prev_total = old.get("meta", {}).get("total_s") or old.get("meta", {}).get("elapsed_s") or 0.0
        meta["resumed_from"] = old.get("meta", {}).get("command")
        meta["previous_run"] = old.get("meta")
        meta["resumed_models"] = sum(1 for x in slots if x is not None)
        print(f"resuming: {meta['resumed_models']} results kept", flush=True)
    tp_cache: dict = {}
    if args.tp_from and args.torch_pruning:
        prev = json.loads(Path(args.tp_from).read_text())
        tp_cache = {r["model"]: {k: v for k, v in r.items() if k.startswith("tp_")}
                    for r in prev.get("results", []) if str(r.get("tp_status", "")) and
                    not str(r.get("tp_status", "")).startswith("n/a")}
        meta["tp_reused_from"] = {"path": args.tp_from, "torch_pruning": prev.get("meta", {}).get("torch_pruning"),
                                  "date": prev.get("meta", {}).get("date"), "models": len(tp_cache)}
    todo = queue.Queue()
    for i, name in enumerate(names):
        if slots[i] is None:
            todo.put((i, name))
    lock = threading.Lock()
    done = [0]
    n_todo = todo.qsize()
    t_start = time.perf_counter()

    def drive():
        workers: dict = {}
        try:
            while True:
                try:
                    i, name = todo.get_nowait()
                except queue.Empty:
                    return
                with_tp = args.torch_pruning and name not in tp_cache
                if with_tp not in workers:
                    workers[with_tp] = Worker(with_tp, threads)
                r = workers[with_tp].run({"model": name, "seed": args.seed, "max_params": args.max_params},
                                         args.timeout)
                if args.torch_pruning and name in tp_cache:
                    r.update(tp_cache[name])
                    r["tp_reused"] = True
                r["family"] = fam.get(name, "?")
                with lock:
                    slots[i] = r
                    done[0] += 1
                    meta["elapsed_s"] = round(prev_total + time.perf_counter() - t_start, 1)
                    extra = f" | TP {r.get('tp_status', '')[:80]}" if args.torch_pruning else ""
                    print(f"[{done[0]}/{n_todo}] {name:40s} {r.get('analysis_s', '-')!s:>8}s  "
                          f"{r.get('prunable', '-')!s:>4}/{r.get('groups', '-')!s:<4} {r['status'][:120]}{extra}",
                          flush=True)
                    write_outputs([x for x in slots if x is not None], meta, args.torch_pruning, out_json, out_md)
        finally:
            for w in workers.values():
                w.stop()

    atexit.register(_kill_all_workers)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    drivers = [threading.Thread(target=drive, daemon=True) for _ in range(max(1, args.jobs))]
    for d in drivers:
        d.start()
    for d in drivers:
        while d.is_alive():
            d.join(1.0)
    results = [x for x in slots if x is not None]
    meta["total_s"] = round(prev_total + time.perf_counter() - t_start, 1)
    summ = write_outputs(results, meta, args.torch_pruning, out_json, out_md)
    print(summary_line(summ), flush=True)
    print(f"total {meta['total_s']} s", flush=True)


if __name__ == "__main__":
    main()
