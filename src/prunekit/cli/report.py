"""The reports of ``prunekit analyze`` and ``prunekit prune``: one JSON-able dict per run (what ``--json``,
``--report`` and ``--save DIR/report.json`` hold) and the text printed from it.

The commands do the work; this module only turns what they measured into the report, so the JSON keys and
the text have one definition.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .common import before_after, human


def versions() -> dict[str, str]:
    import torch

    import prunekit as pk
    return {"prunekit_version": pk.__version__, "torch_version": str(torch.__version__)}


# ---------------------------------------------------------------------------------------------- pinned groups
def pinned_groups(graph) -> list[dict[str, Any]]:
    """Pinned groups by reason; block indices in module names are folded (``blocks.3.attn`` -> ``blocks.*.attn``)
    so that one reason repeated in every block is one row."""
    by_reason: dict[str, list] = defaultdict(list)
    for g in graph.groups:
        if not g.prunable:
            by_reason[re.sub(r"(?<=[A-Za-z_]\.)\d+(?=\.|\b)", "*", g.reason or "not prunable")].append(g)
    return [{"reason": r, "count": len(gs), "groups": [g.id for g in gs],
             "modules": list(dict.fromkeys(m for g in gs for m in g.modules))[:10]}
            for r, gs in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]


def pinned_text(pinned: list[dict]) -> list[str]:
    if not pinned:
        return ["Pinned groups: none"]
    lines = [f"Pinned groups: {sum(p['count'] for p in pinned)} (not prunable), by reason:"]
    for p in pinned:
        mods = ", ".join(m or "<root>" for m in p["modules"][:3]) + (", ..." if len(p["modules"]) > 3 else "")
        reason = p["reason"] if len(p["reason"]) <= 140 else p["reason"][:137] + "..."
        lines.append(f"  {p['count']:>4} x {reason}" + (f"  [{mods}]" if mods else ""))
    return lines


# ---------------------------------------------------------------------------------------------- layer changes
def snapshot(model) -> dict[str, tuple[str | None, dict[str, tuple]]]:
    """{module name: (repr if a leaf, {own param name: shape})}."""
    return {n: (None if any(True for _ in m.children()) else repr(m),
                {p: tuple(t.shape) for p, t in m.named_parameters(recurse=False)})
            for n, m in model.named_modules()}


def changed_layers(before: dict, model) -> list[dict[str, str]]:
    """Every leaf whose repr changed, and every module whose own parameters changed shape although its repr
    did not (LayerScale gamma, cls_token, ...)."""
    after = snapshot(model)
    out = []
    for name, (rep, shapes) in before.items():
        if name not in after:
            continue
        rep2, shapes2 = after[name]
        label = name or "<root>"
        if rep is not None and rep != rep2:
            out.append({"name": label, "before": rep, "after": rep2})
        elif shapes != shapes2:
            diff = [p for p in shapes if shapes2.get(p) != shapes[p]]
            out.append({"name": label, "before": ", ".join(f"{p}: {list(shapes[p])}" for p in diff),
                        "after": ", ".join(f"{p}: {list(shapes2.get(p, ()))}" for p in diff)})
    return out


def widths(model) -> dict[str, int]:
    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
        if isinstance(w, int) and hasattr(m, "weight"):
            out[n] = w
    return out


# ---------------------------------------------------------------------------------------------- analyze
def analyze_report(args, lm, graph, stats, proportion: float, timings: dict[str, float]) -> dict[str, Any]:
    """The ``prunekit analyze`` report of ``lm`` (a LoadedModel) analysed as ``graph``."""
    return {
        **versions(), "command": "analyze", "model": args.model, "model_class": type(lm.model).__name__,
        "input": lm.input_desc, "seed": args.seed, "analysis_seconds": round(graph.analysis_seconds, 3),
        "groups": {"total": len(graph.groups), "prunable": len(graph.prunable_groups),
                   "exact": sum(1 for g in graph.prunable_groups if g.exact),
                   "pinned": len(graph.groups) - len(graph.prunable_groups)},
        "macs": stats.macs, "flops": stats.flops, "params": stats.params,
        "prunable_proportion": proportion, "pinned_groups": pinned_groups(graph),
        "unsupported_ops": graph.unsupported_ops,
        "group_list": [{"id": g.id, "unit": g.unit, "size": g.size, "prunable": g.prunable, "exact": g.exact,
                        "reason": g.reason, "source": g.source, "modules": g.modules} for g in graph.groups],
        "timings_s": timings,
    }


def analyze_text(args, lm, graph, r: dict[str, Any]) -> list[str]:
    """The text ``prunekit analyze`` prints for report ``r``."""
    text = [f"{args.model} ({type(lm.model).__name__}), input {lm.input_desc}", "", graph.summary(), "",
            f"MACs {human(r['macs'])}, FLOPs {human(r['flops'])}, params {human(r['params'])}",
            f"Prunable proportion: {r['prunable_proportion']:.1%} of the FLOPs can be removed (every prunable group "
            "down to one unit)", *pinned_text(r["pinned_groups"]), f"Analysis time: {graph.analysis_seconds:.2f} s"]
    if args.groups:
        text += ["", "Prunable groups:", *("  " + line for line in graph.log_groups(logging.DEBUG))]
    return text


# ---------------------------------------------------------------------------------------------- prune
def prune_report(args, lm, *, target, criterion, shape, sources: dict[str, str], graph, plan: dict,
                 stats_before, stats_after, proportion: float, changed: list[dict], output_shapes: list,
                 timings: dict[str, float], latency_before=None, latency_after=None, latency_interleaved=False,
                 kept_units: dict | None = None) -> dict[str, Any]:
    """The ``prunekit prune`` report: options, MACs / FLOPs / params (and latency) before and after, the
    changed layers, group counts, pinned groups, verification, the kept share of heads and channels
    (``kept_units``: :meth:`prunekit.Pruner.summary`).  ``saved``, ``plots`` and, for transformers models,
    ``hf`` (the new config values) are filled in by the command."""
    pruned_groups = [graph.group(gid) for gid in plan]
    exact = sum(1 for g in pruned_groups if g.exact)
    before = {"macs": stats_before.macs, "flops": stats_before.flops, "params": stats_before.params}
    after = {"macs": stats_after.macs, "flops": stats_after.flops, "params": stats_after.params}
    if latency_before is not None:
        before["latency_ms"], after["latency_ms"] = latency_before.median_ms, latency_after.median_ms
    latency = None if latency_before is None else {
        "backend": getattr(args, "latency_backend", "eager"), "batch_size": getattr(args, "latency_batch", None),
        "before": _timing(latency_before), "after": _timing(latency_after),
        "kept": latency_after.median_ms / latency_before.median_ms if latency_before.median_ms else None,
        "interleaved": bool(latency_interleaved)}
    goal = getattr(args, "latency_target", None)
    if latency is not None and goal is not None and latency["kept"] is not None:
        # the measured latency kept vs the goal: within 5% of the measured latency counts as met
        latency.update(goal=goal, kept_vs_goal=latency["kept"] / goal, goal_met=latency["kept"] <= goal * 1.05)
    options = {"ratio": args.ratio, "flops_target": args.flops_target, "params_target": args.params_target,
               "latency_target": getattr(args, "latency_target", None),
               "latency_backend": getattr(args, "latency_backend", "eager"),
               "latency_batch": getattr(args, "latency_batch", None),
               "uniform": args.uniform, "global": args.global_pruning,
               "round_to": args.round_to, "max_ratio": args.max_ratio, "ignore": list(args.ignore),
               "criterion": criterion.name, "input_shape": list(shape) if shape else None, "seed": args.seed,
               "latency": args.latency, "data_batches": args.data_batches if criterion.needs_data else None}
    return {
        **versions(), "command": "prune", "model": args.model, "model_class": type(lm.model).__name__,
        "input": lm.input_desc, "target": repr(target), "options": options, "config_file": args.config,
        "options_from_config": sorted(sources.values()),
        "before": before, "after": after,
        "kept": {k: (after[k] / before[k] if before[k] else None) for k in before},
        "prunable_proportion": proportion,
        "groups": {"total": len(graph.groups), "prunable": len(graph.prunable_groups), "pruned": len(plan),
                   "pinned": len(graph.groups) - len(graph.prunable_groups)},
        "units_removed": sum(len(u) for u in plan.values()), "changed_layers": changed,
        "pinned_groups": pinned_groups(graph),
        "verification": {"passed": True, "output_shapes": output_shapes, "exact_groups": exact,
                         "shape_checked_groups": len(pruned_groups) - exact},
        "timings_s": timings, "saved": None, "plots": [], "kept_units": kept_units, "latency": latency,
    }


def _timing(t) -> dict[str, Any]:
    """Median and spread of a latency measurement (a ``Timing``, or an older ``LatencyResult``)."""
    if hasattr(t, "to_dict") and hasattr(t, "q1_ms"):
        return t.to_dict()
    times = t.results[0].times_ms
    return {"median_ms": t.median_ms, "min_ms": min(times), "max_ms": max(times), "repeats": len(times)}


def _spread(t: dict) -> str:
    if "q1_ms" in t:
        return f"IQR {t['q1_ms']:.2f}-{t['q3_ms']:.2f} ms, min {t['min_ms']:.2f}, max {t['max_ms']:.2f}"
    return f"min {t['min_ms']:.2f}, max {t['max_ms']:.2f} ms"


def prune_text(args, lm, r: dict, target) -> list[str]:
    """The text ``prunekit prune`` prints for report ``r``."""
    o = r["options"]
    mode = "global" if o["global"] else "local"
    text = [f"Pruning {args.model} ({r['model_class']}), input {lm.input_desc}: {target}, {mode}, "
            f"criterion {o['criterion']}, round_to {o['round_to']}, max_ratio {o['max_ratio']}"
            + (f", ignore {' '.join(o['ignore'])}" if o["ignore"] else ""), ""]
    text += [f"{c['name']}: {c['before']} => {c['after']}" for c in r["changed_layers"]]
    text += [f"({len(r['changed_layers'])} layers changed)", ""]
    b, a = r["before"], r["after"]
    text += [before_after("MACs", b["macs"], a["macs"]), before_after("FLOPs", b["flops"], a["flops"]),
             before_after("Params", b["params"], a["params"])]
    if "latency_ms" in b:
        text.append(before_after("Latency", b["latency_ms"], a["latency_ms"], fmt=lambda v: f"{v:.2f} ms"))
        lat = r.get("latency")
        if lat:
            bs = lat["batch_size"] if lat["batch_size"] is not None else "as the input"
            how = "timed interleaved, " if lat.get("interleaved") else ""
            text.append(f"  ({lat['backend']}, batch {bs}: {how}median over {lat['before'].get('repeats')} runs; spread "
                        + ", ".join(f"{k} {_spread(lat[k])}" for k in ("before", "after")) + ")")
            if lat.get("goal") is not None:
                text.append(f"  latency kept {lat['kept']:.3f} of the original, goal {lat['goal']:.3f} "
                            f"(x{lat['kept_vs_goal']:.3f}): {'met' if lat['goal_met'] else 'NOT met'} "
                            "(within 5% of the measured latency)")
    g = r["groups"]
    text += ["", f"Groups: {g['total']} total, {g['prunable']} prunable, {g['pruned']} pruned "
                 f"({r['units_removed']} units removed); prunable proportion {r['prunable_proportion']:.1%} of FLOPs"]
    text += pinned_text(r["pinned_groups"])
    v = r["verification"]
    text.append(f"Verification: passed (output shapes unchanged {v['output_shapes']}; {v['exact_groups']} pruned "
                f"groups equal the masked original, {v['shape_checked_groups']} under channel-mixing ops "
                "shape-checked)")
    k = r.get("kept_units")
    if k:
        text.append("Kept: " + ", ".join(f"{u} {v:.1%}" for u, v in (("heads", k["heads"]), ("channels", k["channels"]))
                                         if v is not None) + " of the prunable units")
    c = r.get("calibration")
    if c:
        text.append(f"Calibration: {c['file']}, {c['tokens']} tokens ({c['tokenizer']}), {c['samples']} windows of "
                    f"{c['seq_len']} tokens, {c['held_out_windows']} held out" + "".join(f"; {n}" for n in c["notes"]))
    d = r.get("depth")
    if d:
        text.append(f"Depth: removed {', '.join(d['removed'])} ({d['blocks_before']} => {d['blocks_after']} blocks, "
                    f"block influence), then width to {d['width_target']}")
    p = r.get("perplexity")
    if p:
        text.append(f"Perplexity (held-out, {p['held_out_windows']} x {p['seq_len']} tokens): {p['before']:.3f} => "
                    f"{p['after']:.3f}")
    if "hf" in r:
        h = r["hf"]
        text.append("Config: " + ", ".join(f"{c} {v}" + (f" (was {h['changed'][c][0]})" if c in h["changed"] else "")
                                           for c, v in h["config"].items()))
        if h["per_layer"]:
            text.append("Per-layer widths (no single config value): "
                        + ", ".join(f"{c} {v}" for c, v in h["per_layer"].items()))
        if h["saved_pretrained"]:
            how = (f"transformers.{r['model_class']}.from_pretrained" if h["plain_from_pretrained"]
                   else "prunekit.hf.from_pretrained (widths differ per layer or the config rejects them)")
            text.append(f"Saved pretrained: {h['saved_pretrained']} (load with {how})")
    if r["saved"]:
        text.append(f"Saved: {r['saved']} and {Path(args.save) / 'report.json'} (rebuild with prunekit.load(path, "
                    "build_original_model))")
    if args.report:
        text.append(f"Report: {args.report}")
    if r["plots"]:
        text.append(f"Plots: {', '.join(r['plots'])}")
    t = r["timings_s"]
    text.append("Time: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()))
    return text
