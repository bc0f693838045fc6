#!/usr/bin/env python
"""Analysis time and peak memory of ``pk.analyze`` vs model size, side by side with Torch-Pruning.

Cases (each runs in its own fresh subprocess so memory figures do not leak between cases):

* resnet50, convnext_base, vit_base_patch16_224 (timm, random weights, 1x3x224x224), with real
  weights on CPU and built on the meta device;
* vit_giant_patch14_224 (timm, ~1.0B parameters) built on the meta device;
* llama-1.1b (TinyLlama-1.1B config: hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV
  heads), on CPU (real random weights, ~4.4 GB) and on meta, input_ids 1x128;
* llama-7b (hidden 4096, 32 layers, intermediate 11008, 32 heads, vocab 32000) on meta,
  input_ids 1x128 (target: analysis < 30 s).

Per case and tool: one cold (first) run, then the median of ``--repeats`` timed runs, then one
extra run under ``tracemalloc``.  Memory is reported two ways:

* ``peak RSS delta``: a background thread samples the process RSS (``/proc/self/statm``) every
  2 ms during the cold run; reported value = max RSS during the call - RSS just before it.
  This includes tensor storage (torch allocations), so it is the real extra memory of the call.
* ``tracemalloc peak``: peak of Python-heap allocations traced by ``tracemalloc`` during one
  call.  It does NOT see tensor storage allocated by torch's C++ allocator, and tracemalloc slows
  Python-heavy code, so that run is not timed.

Torch-Pruning: ``tp.DependencyGraph().build_dependency(model, example_inputs=x)`` on the same
model object, same protocol; on meta-built models it is given the inputs moved to meta (it fails
with CPU inputs there) and recorded as "n/a" with its error if it still fails.  Speed-up = TP median / prunekit median (same case).

Hugging Face Llama: the default SDPA attention path and the packed-sequence check in
``transformers.masking_utils`` call ``.item()`` on data, which a meta-device capture cannot do; the
script first analyses ``input_ids`` alone with the default attention once (recorded as ``plain_attempt``,
not timed) and times ``attn_implementation="eager"`` plus an all-ones ``attention_mask``.

Usage::

    python benchmarks/analysis_speed.py                 # all cases
    python benchmarks/analysis_speed.py --case resnet50 --case llama-7b --repeats 3
"""
from __future__ import annotations

import argparse
import collections
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_common import git_state as _git_state  # noqa: E402
RESULTS = HERE / "results"

LLAMA_CFGS = {
    "llama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000),
}
# (case name, device): order of the report
CASES = [
    ("resnet50", "cpu"), ("resnet50", "meta"),
    ("convnext_base", "cpu"), ("convnext_base", "meta"),
    ("vit_base_patch16_224", "cpu"), ("vit_base_patch16_224", "meta"),
    ("vit_giant_patch14_224", "meta"),
    ("llama-1.1b", "cpu"), ("llama-1.1b", "meta"),
    ("llama-7b", "meta"),
]


# ----------------------------------------------------------------------------- measurement helpers
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak RSS above the level at start, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta_mb(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)


def measure(fn, repeats: int, trace: bool) -> dict:
    """Cold run (with RSS sampling), ``repeats`` timed runs, one tracemalloc run."""
    import gc
    res: dict = {}
    gc.collect()
    with RssSampler() as s:
        t0 = time.perf_counter()
        out = fn()
        res["first_s"] = round(time.perf_counter() - t0, 4)
    res["peak_rss_delta_mb"] = s.delta_mb
    del out
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    res["times_s"] = [round(t, 4) for t in times]
    res["median_s"] = round(statistics.median(times), 4) if times else res["first_s"]
    if trace:
        gc.collect()
        tracemalloc.start()
        try:
            out = fn()
            res["tracemalloc_peak_mb"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        finally:
            tracemalloc.stop()
        del out
    return res


def _short(e: BaseException, limit: int = 400) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) <= limit else msg[:limit] + " ..."


# ----------------------------------------------------------------------------- one case (subprocess)
def build_case(name: str, device: str, eager: bool = False):
    """Returns (model, example_inputs, description)."""
    import torch
    torch.manual_seed(0)
    if name.startswith("llama"):
        from transformers import LlamaConfig, LlamaForCausalLM
        kw = dict(LLAMA_CFGS[name], use_cache=False)
        if eager:
            kw["attn_implementation"] = "eager"
        cfg = LlamaConfig(**kw)
        if device == "meta":
            with torch.device("meta"):
                model = LlamaForCausalLM(cfg)
        else:
            model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, cfg.vocab_size, (1, 128))
        x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if eager else ids
        desc = "input_ids 1x128" + (" + attention_mask, eager attention" if eager else "")
        return model.eval(), x, desc
    import timm
    if device == "meta":
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    else:
        model = timm.create_model(name, pretrained=False)
    return model.eval(), torch.randn(1, 3, 224, 224), "1x3x224x224"


def run_case(name: str, device: str, repeats: int, trace: bool, do_tp: bool) -> dict:
    warnings.filterwarnings("ignore")
    import logging
    logging.disable(logging.WARNING)
    import torch
    import prunekit as pk
    res: dict = {"case": name, "device": device}
    # warm up the libraries (imports, dispatcher) on a tiny model, so "first" is about the model
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    pk.analyze(tiny, torch.randn(2, 8))
    if do_tp:
        import torch_pruning as tp
        tp.DependencyGraph().build_dependency(tiny, example_inputs=torch.randn(2, 8))

    t0 = time.perf_counter()
    model, x, desc = build_case(name, device)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    res["input"] = desc
    res["rss_after_build_mb"] = round(_rss_bytes() / 2**20, 1)

    if name.startswith("llama"):
        try:
            g = pk.analyze(model, x)
            n_p = len(g.prunable_groups)
            reasons = collections.Counter(gr.reason.split(":")[0] for gr in g.groups if gr.reason)
            res["plain_attempt"] = (f"analysed ({g.tape.device} tensors), {n_p} prunable groups" + (
                "" if n_p else "; most common pin reason: " + (reasons.most_common(1)[0][0][:200] if reasons else "?"))
                + (f"; dry run skipped: {g.validation_skipped}" if getattr(g, "validation_skipped", None) else ""))
            del g
        except Exception as e:
            res["plain_attempt"] = _short(e)
        # timed: eager attention + attention_mask, the path that runs on meta for every size (same protocol
        # on CPU and meta; the default SDPA path calls .item() and needs a real forward)
        del model
        model, x, desc = build_case(name, device, eager=True)
        res["input"] = desc

    graph_info = {}

    def pk_fn():
        g = pk.analyze(model, x)
        graph_info.update(groups=len(g.groups), prunable=len(g.prunable_groups), ops=len(g.tape.ops),
                          prunable_proportion=round(g.prunable_proportion, 4))
        return g

    try:
        res["pk"] = measure(pk_fn, repeats, trace)
        res["pk"].update(graph_info)
    except Exception as e:
        res["pk"] = {"error": _short(e, 1500)}
    try:  # the same analysis without the dry-run validation (a safety net Torch-Pruning does not have)
        res["pk_novalidate"] = measure(lambda: pk.analyze(model, x, validate=False), repeats, False)
    except Exception as e:
        res["pk_novalidate"] = {"error": _short(e, 600)}

    if do_tp:
        import torch_pruning as tp

        # on meta-built models TP gets meta inputs (it needs inputs on the model's device)
        if device == "meta":
            from torch.utils._pytree import tree_map
            xt = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, x)
        else:
            xt = x

        def tp_fn():
            return tp.DependencyGraph().build_dependency(model, example_inputs=xt)

        def tp_groups_fn():  # what pk.analyze returns: the graph AND its groups
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=xt)
            return list(dg.get_all_groups())

        try:
            res["tp"] = measure(tp_fn, repeats, trace)
        except Exception as e:
            res["tp"] = {"error": ("n/a: " if device == "meta" else "") + _short(e, 600)}
        try:
            res["tp_groups"] = measure(tp_groups_fn, repeats, False)
        except Exception as e:
            res["tp_groups"] = {"error": _short(e, 600)}
        pkm, tpm = res["pk"].get("median_s"), res["tp"].get("median_s")
        if pkm and tpm:
            res["speedup_tp_over_pk"] = round(tpm / pkm, 2)
        tgm, pnm = res["tp_groups"].get("median_s"), res["pk_novalidate"].get("median_s")
        if pkm and tgm:
            res["speedup_tpgroups_over_pk"] = round(tgm / pkm, 2)
        if pnm and tgm:
            res["speedup_tpgroups_over_pk_novalidate"] = round(tgm / pnm, 2)
    return res


# ----------------------------------------------------------------------------- driver
def fmt(v, suffix=""):
    return "" if v is None else f"{v}{suffix}"


def write_outputs(results: list[dict], meta: dict, out_json: Path, out_md: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    hdr = ["model", "params (M)", "weights", "input", "pk median (s)", "pk first (s)", "pk peak RSS Δ (MB)",
           "pk tracemalloc peak (MB)", "groups / prunable", "TP median (s)", "TP first (s)", "TP peak RSS Δ (MB)",
           "TP tracemalloc peak (MB)", "speed-up (TP / pk)", "pk no-validate median (s)",
           "TP graph+groups median (s)", "speed-up (TP graph+groups / pk)",
           "speed-up (TP graph+groups / pk no-validate)"]
    lines = ["# prunekit analysis speed", "",
             f"Generated {meta['date']} on {meta['machine']}; torch {meta['torch']}, timm {meta['timm']}, "
             f"transformers {meta.get('transformers')}, prunekit {meta['prunekit']} (git {meta['git']}), "
             f"torch-pruning {meta.get('torch_pruning')}. Command: `{meta['command']}`.", "",
             f"Times: median of {meta['repeats']} runs after one cold run (`first`), wall clock of "
             "`pk.analyze(model, x)` (default `device=\"auto\"`) and of Torch-Pruning's "
             "`tp.DependencyGraph().build_dependency(model, example_inputs=x)` on the same model object "
             "(meta-built models: TP gets the inputs moved to meta; prunekit gets CPU inputs). "
             "Memory: `peak RSS Δ` = peak process RSS during the cold run (sampled every 2 ms) minus RSS just "
             "before it (includes tensor storage); `tracemalloc peak` = peak Python-heap allocation in one "
             "extra run under tracemalloc (does not see torch tensor storage). Weights: `cpu` = real, randomly "
             "initialised fp32 weights; `meta` = model built under `torch.device(\"meta\")` (no weight memory). "
             "Speed-up = TP median / prunekit median. `TP graph+groups` adds `list(DG.get_all_groups())` to the "
             "graph build, which is what `pk.analyze` returns (graph and groups); `pk no-validate` is "
             "`pk.analyze(..., validate=False)` (no dry-run pruning on a meta view of the model, a check Torch-Pruning does "
             "not make).", "",
             "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in results:
        pk_, tp_ = r.get("pk", {}), r.get("tp", {})
        if "error" in r:
            row = [r["case"], "", r["device"], "", "error: " + r["error"][:200]] + [""] * (len(hdr) - 5)
            lines.append("| " + " | ".join(row).replace("\n", " ") + " |")
            continue
        gp = f"{pk_['groups']} / {pk_['prunable']}" if "groups" in pk_ else ""
        row = [r["case"], fmt(r.get("params_m")), r["device"], r.get("input", ""),
               fmt(pk_.get("median_s")) if "error" not in pk_ else "error: " + pk_["error"][:200].replace("|", "/"),
               fmt(pk_.get("first_s")), fmt(pk_.get("peak_rss_delta_mb")), fmt(pk_.get("tracemalloc_peak_mb")), gp]
        if "error" in tp_:
            row += [tp_["error"][:120].replace("|", "/"), "", "", ""]
        else:
            row += [fmt(tp_.get("median_s")), fmt(tp_.get("first_s")), fmt(tp_.get("peak_rss_delta_mb")),
                    fmt(tp_.get("tracemalloc_peak_mb"))]
        row.append(fmt(r.get("speedup_tp_over_pk"), "x"))
        row += [fmt(r.get("pk_novalidate", {}).get("median_s")), fmt(r.get("tp_groups", {}).get("median_s")),
                fmt(r.get("speedup_tpgroups_over_pk"), "x"), fmt(r.get("speedup_tpgroups_over_pk_novalidate"), "x")]
        lines.append("| " + " | ".join(row) + " |")
    notes = [r for r in results if r.get("plain_attempt")]
    if notes:
        lines += ["", "Llama inputs: first attempt with `input_ids` only and the default (SDPA) attention "
                  "(one untimed analysis; the timed rows use eager attention + attention_mask):"]
        lines += [f"- {r['case']} ({r['device']}): {r['plain_attempt']}" for r in notes]
    s7 = next((r for r in results if r["case"] == "llama-7b" and "median_s" in r.get("pk", {})), None)
    if s7:
        ok = "meets" if s7["pk"]["median_s"] < 30 else "MISSES"
        lines += ["", f"**7B-class Llama on meta: {s7['pk']['median_s']} s median ({s7['pk']['first_s']} s cold) — "
                      f"{ok} the < 30 s target.**"]
    sp = [r["speedup_tp_over_pk"] for r in results if r.get("speedup_tp_over_pk")]
    if sp:
        lines += ["", "Speed-up over Torch-Pruning (TP time / prunekit time; < 1 means Torch-Pruning is faster): "
                      + ", ".join(f"{r['case']} ({r['device']}) {r['speedup_tp_over_pk']}x" for r in results
                                  if r.get("speedup_tp_over_pk"))
                      + f"; median {statistics.median(sp)}x."]
    out_md.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", help="case name (repeatable); default: all. "
                    "Names: " + ", ".join(sorted({c for c, _ in CASES})))
    ap.add_argument("--device", choices=["cpu", "meta"], help="only this weight device")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big-repeats", type=int, default=3, help="repeats for cases with >= 1B parameters")
    ap.add_argument("--no-tracemalloc", action="store_true")
    ap.add_argument("--no-torch-pruning", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per case")
    ap.add_argument("--out", default=str(RESULTS / "analysis_speed"))
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "DEVICE"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        name, device = args.worker
        big = name in ("vit_giant_patch14_224",) or name.startswith("llama")
        res = run_case(name, device, args.big_repeats if big else args.repeats, not args.no_tracemalloc,
                       not args.no_torch_pruning)
        Path(args.worker_out).write_text(json.dumps(res))
        return

    import timm
    import torch
    import prunekit
    meta = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "torch": torch.__version__, "timm": timm.__version__, "prunekit": prunekit.__version__, "git": _git_state(),
        "repeats": args.repeats, "big_repeats": args.big_repeats,
        "command": "python benchmarks/analysis_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "memory_method": "peak RSS delta sampled from /proc/self/statm every 2 ms during the cold run; "
                         "tracemalloc peak (Python heap only) in one extra run",
    }
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    if not args.no_torch_pruning:
        import torch_pruning as tp
        meta["torch_pruning"] = getattr(tp, "__version__", "?")
    cases = [(c, d) for c, d in CASES if (not args.case or c in args.case) and (not args.device or d == args.device)]
    if meta["transformers"] is None:
        cases = [(c, d) for c, d in cases if not c.startswith("llama")]
    results = []
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")
    for name, device in cases:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            tmp = f.name
        cmd = [sys.executable, __file__, "--worker", name, device, "--worker-out", tmp,
               "--repeats", str(args.repeats), "--big-repeats", str(args.big_repeats)]
        cmd += ["--no-tracemalloc"] if args.no_tracemalloc else []
        cmd += ["--no-torch-pruning"] if args.no_torch_pruning else []
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if p.returncode == 0 and os.path.getsize(tmp):
                r = json.loads(Path(tmp).read_text())
            else:
                r = {"case": name, "device": device,
                     "error": f"worker exit code {p.returncode}: {(p.stderr or '').strip()[-600:]}"}
        except subprocess.TimeoutExpired:
            r = {"case": name, "device": device, "error": f"timeout after {args.timeout:.0f}s"}
        finally:
            os.unlink(tmp)
        r["case_wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(r)
        pk_, tp_ = r.get("pk", {}), r.get("tp", {})
        print(f"{name:24s} {device:5s} pk {pk_.get('median_s', pk_.get('error', r.get('error', '')))!s:.80}  "
              f"TP {tp_.get('median_s', tp_.get('error', ''))!s:.80}  speed-up {r.get('speedup_tp_over_pk', '-')}  "
              f"({r['case_wall_s']} s)", flush=True)
        write_outputs(results, meta, out_json, out_md)
    print(f"results -> {out_json}, {out_md}")


if __name__ == "__main__":
    main()
