#!/usr/bin/env python
"""Coverage sweep of prunekit over Hugging Face transformers text models (random weights, no download).

For every decoder-only / encoder model type transformers can build a causal-LM or masked-LM head for
(``_hf_models.text_model_types()``), built from a tiny config (2 layers, hidden 64, vocab 128, see
``_hf_models.tiny_config``), the sweep records, each type in its own subprocess with a timeout:

* ``build``: whether the tiny config builds and runs (types whose defaults do not survive shrinking are
  reported as ``build-failed`` and counted apart);
* ``analyze``: ``pk.analyze`` time, groups / prunable groups, the prunable parameter share (parameters that
  belong to prunable groups: params with every prunable group at one unit vs all), unit kinds prunable
  (``head``, ``channel`` ...), and whether analysing with and without ``attention_mask`` gives the same
  prunable groups;
* ``prune``: ``pk.Pruner(criterion="l2", target=pk.ParamsTarget(0.7), uniform=True, round_to=8).prune()`` (verified;
  where pinned groups hold more than 30% of the parameters -- a vision tower, say -- ``pk.ChannelRatio(0.3)``
  instead, recorded in ``target``);
* ``reload``: ``pk.hf.save_pretrained`` -> plain ``AutoModelFor*.from_pretrained`` (``plain``), else
  ``pk.hf.from_pretrained`` (``prunekit``); logits compared with the pruned model's (max abs difference);
* with ``--torch-pruning``: Torch-Pruning's LLM recipe (settings of its ``examples/LLMs/prune_llm.py``: group L2
  magnitude averaged over the group, uniform per layer, heads pruned whole, head dims kept, ``round_to=4``,
  ``lm_head`` ignored, ratio 0.3), its own config update, then a forward and a save/plain-reload check.

Status per type: ``reload-exact`` (pruned, verified, reloaded with identical logits), ``pruned`` (no
reload), ``pinned-only``, ``build-failed`` or ``error: [stage] ...``.

Usage::

    python benchmarks/hf_coverage.py                       # every type (~20-30 min on 2 cores)
    python benchmarks/hf_coverage.py --type llama --type gpt2
    python benchmarks/hf_coverage.py --torch-pruning       # + Torch-Pruning's LLM recipe (pip install torch-pruning)
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _bench_common import git_state as _git_state  # noqa: E402

RESULTS = HERE / "results"
KEEP = 0.7        # ParamsTarget ratio (30% of the parameters removed)
TP_RATIO = 0.3    # Torch-Pruning's pruning_ratio (the same 30% of every width)
ROUND_TO = 8      # kept widths multiples of 8 (what GPU kernels and transformers configs want)


def _short(e: BaseException, limit: int = 400) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ")
    return s if len(s) <= limit else s[:limit] + " ..."


def _logits(out):
    import torch
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    return out[0]


def _nparams(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _prunable_signature(graph) -> list:
    return sorted((g.unit, g.size, tuple(sorted(g.modules))[:2]) for g in graph.prunable_groups)


def run_one(model_type: str, seed: int, do_tp: bool) -> dict:
    import logging
    import torch
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    import _hf_models as hm
    import prunekit as pk

    res: dict = {"type": model_type, "task": hm.task_of(model_type)}
    stage = "build"
    try:
        model, x, cfg = hm.build(model_type, seed)
        with torch.no_grad():
            ref = _logits(model(**x))
        res["params_k"] = round(_nparams(model) / 1e3, 1)
    except Exception as e:
        res["status"] = "build-failed"
        res["build_error"] = _short(e, 200)
        return res
    try:
        stage = "analyze"
        t0 = time.perf_counter()
        graph = pk.analyze(model, x)
        res["analysis_s"] = round(time.perf_counter() - t0, 3)
        res["groups"] = len(graph.groups)
        pg = graph.prunable_groups
        res["prunable"] = len(pg)
        full = int(graph.params_kept())
        least = int(graph.params_kept({g.id: 1 for g in pg}))
        res["prunable_params_share"] = round((full - least) / full, 4) if full else 0.0
        res["units"] = sorted({g.unit for g in pg})
        if graph.unsupported_ops:
            res["unsupported_ops"] = sorted(graph.unsupported_ops)[:6]
        nomask = {k: v for k, v in x.items() if k != "attention_mask"}
        res["mask_stable"] = _prunable_signature(pk.analyze(model, nomask)) == _prunable_signature(graph)
        if not pg:
            res["status"] = "pinned-only"
            res["pinned_reasons"] = sorted({str(g.reason)[:120] for g in graph.groups})[:4]
            return res

        stage = "prune"
        t0 = time.perf_counter()
        try:
            pk.Pruner(model, x, criterion="l2", target=pk.ParamsTarget(KEEP), uniform=True, round_to=ROUND_TO).prune()
            res["target"] = f"params {KEEP}"
        except ValueError as e:  # most of the parameters are pinned (e.g. a vision tower): prune what can go
            if "not reachable" not in str(e):
                raise
            pk.Pruner(model, x, criterion="l2", target=pk.ChannelRatio(1 - KEEP), uniform=True,
                      round_to=ROUND_TO).prune()
            res["target"] = f"channels {1 - KEEP:.1f} (params {KEEP} not reachable)"
        res["prune_s"] = round(time.perf_counter() - t0, 3)
        res["params_kept"] = round(_nparams(model) / (res["params_k"] * 1e3), 4)
        with torch.no_grad():
            pruned = _logits(model(**x))
        if pruned.shape != ref.shape:
            raise RuntimeError(f"logits shape changed {tuple(ref.shape)} -> {tuple(pruned.shape)}")

        stage = "reload"
        with tempfile.TemporaryDirectory() as d:
            pk.hf.save_pretrained(model, d)
            try:
                loaded = hm.auto_class(model_type).from_pretrained(d).eval()
                res["reload"] = "plain"
            except Exception as e:
                res["plain_reload_error"] = _short(e, 200)
                loaded = pk.hf.from_pretrained(d).eval()
                res["reload"] = "prunekit"
            with torch.no_grad():
                again = _logits(loaded(**x))
        diff = float((again - pruned).abs().max())
        res["reload_max_abs_diff"] = diff
        res["status"] = "reload-exact" if diff <= 1e-5 * max(1.0, float(pruned.abs().max())) else \
            f"error: [reload] logits differ by {diff:.3g}"
    except Exception as e:
        res["status"] = f"error: [{stage}] {_short(e)}"
        res["traceback"] = traceback.format_exc(limit=6)[-3000:]
    if do_tp:
        res.update(run_torch_pruning(model_type, seed))
    return res


def _tp_config_update(model) -> None:
    """The config/attribute update Torch-Pruning's LLM example does after pruning (its settings, our code)."""
    cfg = model.config
    gqa = getattr(cfg, "num_key_value_heads", None) not in (None, cfg.num_attention_heads)
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn") and hasattr(m, "head_dim"):
            width = m.q_proj.out_features if hasattr(m, "q_proj") else m.qkv_proj.out_features // 3
            cfg.num_attention_heads = width // m.head_dim
            if hasattr(m, "num_key_value_groups") and hasattr(m, "k_proj"):
                m.num_key_value_groups = cfg.num_attention_heads // (m.k_proj.out_features // m.head_dim)
        elif name.endswith("mlp"):
            if hasattr(m, "gate_proj"):
                cfg.intermediate_size = m.gate_proj.out_features
            elif hasattr(m, "gate_up_proj"):
                cfg.intermediate_size = m.gate_up_proj.out_features // 2
    if not gqa and hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = cfg.num_attention_heads


def run_torch_pruning(model_type: str, seed: int) -> dict:
    import torch
    import _hf_models as hm
    res: dict = {}
    stage = "import"
    try:
        import torch_pruning as tp
        model, x, cfg = hm.build(model_type, seed)
        # its recipe traces the model's plain output; with the KV cache in the output it fails on the cache
        # object, so it gets the same use_cache=False our inputs pass
        model.config.use_cache = False
        stage = "prune"
        heads, groups = {}, {}
        for name, m in model.named_modules():
            if name.endswith("self_attn"):
                if hasattr(m, "q_proj"):
                    heads[m.q_proj] = cfg.num_attention_heads
                    heads[m.k_proj] = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
                    heads[m.v_proj] = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
                elif hasattr(m, "qkv_proj"):
                    heads[m.qkv_proj] = cfg.num_attention_heads
            if name.endswith("mlp") and hasattr(m, "gate_up_proj"):
                groups[m.gate_up_proj] = 2
        lm_head = getattr(model, "lm_head", None)
        n0 = _nparams(model)
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=x["input_ids"], importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False, pruning_ratio=TP_RATIO, ignored_layers=[lm_head] if lm_head is not None else [],
            num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=TP_RATIO,
            out_channel_groups=groups, round_to=4)
        for g in pruner.step(interactive=True):
            g.prune()
        res["tp_prune_s"] = round(time.perf_counter() - t0, 3)
        res["tp_params_kept"] = round(_nparams(model) / n0, 4)
        stage = "config"
        if lm_head is not None:
            _tp_config_update(model)
        stage = "forward"
        with torch.no_grad():
            out = _logits(model(**x))
        stage = "reload"
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            loaded = hm.auto_class(model_type).from_pretrained(d).eval()
            with torch.no_grad():
                again = _logits(loaded(**x))
        diff = float((again - out).abs().max())
        res["tp_status"] = "reload-exact" if diff <= 1e-5 * max(1.0, float(out.abs().max())) else \
            f"error: [reload] logits differ by {diff:.3g}"
    except Exception as e:
        res["tp_status"] = f"error: [{stage}] {_short(e, 200)}"
    return res


# -- driver -------------------------------------------------------------------------------------------------------

def _child(model_type: str, seed: int, do_tp: bool, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", model_type, "--seed", str(seed)]
    if do_tp:
        cmd.append("--torch-pruning")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired:
        return {"type": model_type, "status": f"error: [timeout] over {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"type": model_type, "status": f"error: [crash] exit {p.returncode}: {p.stderr.strip()[-300:]}"}
    res = json.loads(lines[-1])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def summarize(results: list[dict], do_tp: bool) -> dict:
    built = [r for r in results if r.get("status") != "build-failed"]
    n = len(built)
    count = lambda pred: sum(1 for r in built if pred(r))  # noqa: E731
    summ = {
        "types": len(results), "built": n, "build_failed": len(results) - n,
        "reload_exact": count(lambda r: r["status"] == "reload-exact"),
        "reload_plain": count(lambda r: r["status"] == "reload-exact" and r.get("reload") == "plain"),
        "pinned_only": count(lambda r: r["status"] == "pinned-only"),
        "errors": count(lambda r: r["status"].startswith("error")),
        "mask_stable": count(lambda r: r.get("mask_stable") is True),
        "median_analysis_s": round(statistics.median(r["analysis_s"] for r in built if "analysis_s" in r), 3)
        if any("analysis_s" in r for r in built) else None,
        "mean_prunable_params_share": round(statistics.mean(r["prunable_params_share"] for r in built
                                                            if "prunable_params_share" in r), 4)
        if any("prunable_params_share" in r for r in built) else None,
    }
    summ["percent_reload_exact"] = round(100.0 * summ["reload_exact"] / n, 1) if n else 0.0
    if do_tp:
        summ["tp_reload_exact"] = count(lambda r: r.get("tp_status") == "reload-exact")
        summ["tp_ran"] = count(lambda r: not str(r.get("tp_status", "error: [prune]")).startswith("error: [prune]")
                               and not str(r.get("tp_status", "")).startswith("error: [import]"))
    return summ


def write_outputs(results: list[dict], meta: dict, do_tp: bool, stem: Path) -> dict:
    summ = summarize(results, do_tp)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summ, "results": results}, indent=1))
    hdr = ["type", "task", "params (k)", "analysis (s)", "groups", "prunable", "prunable params", "units",
           "mask-stable", "params kept", "reload", "status"]
    if do_tp:
        hdr += ["TP params kept", "TP"]
    esc = lambda s: str(s).replace("|", "\\|")[:160]  # noqa: E731
    lines = [
        "# prunekit coverage on Hugging Face transformers text models", "",
        f"Generated {meta['date']} on {meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"prunekit git {meta['git']}" + (f", torch-pruning {meta.get('torch_pruning')}" if do_tp else "")
        + f". Command: `{meta['command']}`. Total {meta.get('total_s', '?')} s."
        + (f" **Partial run: {meta['partial']}.**" if meta.get("partial") else ""), "",
        f"**Summary:** {summ['types']} model types, {summ['built']} built from a tiny config "
        f"({summ['build_failed']} did not survive shrinking: counted apart); of the built ones "
        f"{summ['reload_exact']} ({summ['percent_reload_exact']}%) pruned to {KEEP:.0%} of the params (uniform), "
        f"verified and reloaded with identical logits ({summ['reload_plain']} with plain `from_pretrained`), "
        f"{summ['pinned_only']} pinned-only, {summ['errors']} errors; {summ['mask_stable']} give the same prunable "
        f"groups with and without `attention_mask`; median analysis {summ['median_analysis_s']} s; mean prunable "
        f"params share {summ['mean_prunable_params_share']}."
        + (f" Torch-Pruning's LLM recipe: reload-exact on {summ['tp_reload_exact']}." if do_tp else ""), "",
        "| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in results:
        share = r.get("prunable_params_share")
        row = [r["type"], r.get("task", ""), r.get("params_k", ""), r.get("analysis_s", ""), r.get("groups", ""),
               r.get("prunable", ""), f"{100 * share:.1f}%" if share is not None else "",
               ",".join(r.get("units", [])), {True: "yes", False: "no"}.get(r.get("mask_stable"), ""),
               f"{100 * r['params_kept']:.1f}%" if "params_kept" in r else "", r.get("reload", ""),
               r["status"] if r["status"] != "build-failed" else "build-failed: " + r.get("build_error", "")]
        if do_tp:
            row += [f"{100 * r['tp_params_kept']:.1f}%" if "tp_params_kept" in r else "", r.get("tp_status", "")]
        lines.append("| " + " | ".join(esc(c) for c in row) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return summ


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", action="append", help="model type(s) to sweep (default: every text model type)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-pruning", action="store_true", help="also run Torch-Pruning's LLM recipe")
    ap.add_argument("--out", default=str(RESULTS / "hf_coverage"), help="output stem (.json and .md are written)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.seed, args.torch_pruning)))
        return 0
    import torch
    import transformers
    import _hf_models as hm
    types = args.type or hm.text_model_types()
    t0 = time.perf_counter()

    def meta(t0: float) -> dict:
        return {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, "
                f"{os.cpu_count()} CPUs", "torch": torch.__version__, "transformers": transformers.__version__,
                "git": _git_state(), "command": "python benchmarks/hf_coverage.py " + " ".join(argv or sys.argv[1:]),
                "total_s": round(time.perf_counter() - t0, 1)}
    results: list[dict] = []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        futs = {ex.submit(_child, t, args.seed, args.torch_pruning, args.timeout): t for t in types}
        for i, f in enumerate(cf.as_completed(futs), 1):
            r = f.result()
            results.append(r)
            print(f"[{i}/{len(types)}] {r['type']}: {r['status'][:150]}", flush=True)
            if i % 10 == 0 and i < len(types):  # partial results survive an interrupted sweep
                write_outputs(sorted(results, key=lambda r: r["type"]),
                              {**meta(t0), "partial": f"{i} of {len(types)} types"}, args.torch_pruning, Path(args.out))
    results.sort(key=lambda r: r["type"])
    meta = meta(t0)
    if args.torch_pruning:
        try:
            import torch_pruning
            meta["torch_pruning"] = getattr(torch_pruning, "__version__", "?")
        except ImportError:
            meta["torch_pruning"] = "not installed"
    summ = write_outputs(results, meta, args.torch_pruning, Path(args.out))
    print(json.dumps(summ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
