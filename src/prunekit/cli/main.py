"""Minimal ``prunekit`` command: analyse a model and prune it uniformly by L2 magnitude, printing the report."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch
from torch import nn


def load_model(spec: str) -> nn.Module:
    """``timm:NAME``, ``torchvision:NAME`` or ``path/to/file.py:fn``."""
    kind, _, name = spec.partition(":")
    if kind == "timm":
        import timm
        return timm.create_model(name, pretrained=False)
    if kind == "torchvision":
        import torchvision
        return torchvision.models.get_model(name, weights=None)
    if spec.count(":") == 1 and kind.endswith(".py"):
        import importlib.util
        mod_spec = importlib.util.spec_from_file_location("user_model", kind)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return getattr(mod, name)()
    raise SystemExit(f"error: cannot load model {spec!r}; use timm:NAME, torchvision:NAME or path/to/file.py:fn")


def l2_plan(model: nn.Module, graph, ratio: float) -> dict[int, list[int]]:
    """Drop the ``ratio`` lowest-L2 units of every prunable group (scores summed over the group's slices)."""
    params = dict(model.named_parameters())
    plan = {}
    for g in graph.prunable_groups:
        n = min(g.size - 1, int(g.size * ratio))
        if n <= 0:
            continue
        score = torch.zeros(g.size)
        for u in range(g.size):
            for fqn, dim, idx in g.slices([u]):
                if fqn in params:
                    score[u] += params[fqn].detach().index_select(dim, idx).float().pow(2).sum()
        plan[g.id] = torch.argsort(score)[:n].tolist()
    return plan


def _changed_layers(before: dict, model: nn.Module) -> list[str]:
    lines = []
    for name, m in model.named_modules():
        if name in before and repr(m) != before[name] and not list(m.children()):
            lines.append(f"{name}: {before[name]} => {m!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    import prunekit as pk

    p = argparse.ArgumentParser(prog="prunekit", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("analyze", "prune"):
        s = sub.add_parser(cmd)
        s.add_argument("model", help="timm:NAME | torchvision:NAME | path/to/file.py:fn")
        s.add_argument("--input-shape", default="1,3,224,224")
        s.add_argument("--json", action="store_true", help="print a JSON report")
        if cmd == "prune":
            s.add_argument("--ratio", type=float, default=0.5, help="fraction of units removed per group")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.cmd == "prune" and not 0.0 <= a.ratio < 1.0:
        p.error(f"--ratio must be in [0, 1), got {a.ratio}")
    model = load_model(a.model).eval()
    x = torch.randn(*[int(s) for s in a.input_shape.split(",")])
    t0 = time.perf_counter()
    graph = pk.analyze(model, x)
    t_an = time.perf_counter() - t0
    report = {"model": a.model, "analysis_seconds": round(t_an, 3), "groups": len(graph.groups),
              "prunable": len(graph.prunable_groups), "macs": graph.macs(),
              "params": sum(t.numel() for t in model.parameters()),
              "prunable_proportion": graph.prunable_proportion}
    if a.cmd == "analyze":
        if a.json:
            print(json.dumps(report, indent=2))
        else:
            print(graph.summary())
            print("\n".join(graph.log_groups()))
        return 0
    before = {n: repr(m) for n, m in model.named_modules()}
    plan = l2_plan(model, graph, a.ratio)
    macs_after = graph.macs(plan)
    pk.prune(model, graph, plan)
    report.update({"macs_after": macs_after, "params_after": sum(t.numel() for t in model.parameters()),
                   "pinned": {g.id: g.reason for g in graph.groups if not g.prunable}})
    if a.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print("\n".join(_changed_layers(before, model)))
    print(f"\nMACs: {report['macs'] / 1e9:.4f} G => {macs_after / 1e9:.4f} G")
    print(f"Params: {report['params'] / 1e6:.4f} M => {report['params_after'] / 1e6:.4f} M")
    print(f"Groups: {len(graph.groups)} ({len(graph.prunable_groups)} prunable, verified exact where marked exact); "
          f"analysis {t_an:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
