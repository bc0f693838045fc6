"""Shared helpers for the model-zoo tests: a random plan and the full prune-and-check routine."""
from __future__ import annotations

import random

import torch

import prunekit as pk


def random_plan(graph, seed: int = 0, lo: float = 0.3, hi: float = 0.5) -> dict[int, list[int]]:
    rng = random.Random(seed)
    plan = {}
    for g in graph.prunable_groups:
        n = min(g.size - 1, max(1, int(round(g.size * rng.uniform(lo, hi)))))
        plan[g.id] = rng.sample(range(g.size), n)
    return plan


def prune_and_check(model: torch.nn.Module, x, other_batch=None, seed: int = 0):
    """Analyse, prune with a random 30-50% plan (verified), and check shapes and state_dict round trip."""
    model.eval()
    with torch.no_grad():
        ref = model(x)
    graph = pk.analyze(model, x)
    plan = random_plan(graph, seed)
    pk.prune(model, graph, plan, verify=True)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ref.shape
    if other_batch is not None:
        with torch.no_grad():
            out2 = model(other_batch)
        assert out2.shape[1:] == ref.shape[1:]
    sd = model.state_dict()
    model.load_state_dict(sd)
    return graph, plan
