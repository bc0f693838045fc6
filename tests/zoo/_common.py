"""Shared helpers for the model-zoo tests: a random plan and the full prune-and-check routine."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Callable

import torch

import prunekit as pk
from prunekit.capture import flatten_outputs


def random_plan(graph, seed: int = 0, lo: float = 0.3, hi: float = 0.5) -> dict[int, list[int]]:
    rng = random.Random(seed)
    plan = {}
    for g in graph.prunable_groups:
        m = g.multiple_of  # kept units a multiple of m (a kernel's alignment) and at least min_keep (router top-k)
        n = min(g.size - max(g.min_keep, m), max(1, int(round(g.size * rng.uniform(lo, hi)))))
        n -= n % m
        if n > 0:
            plan[g.id] = rng.sample(range(g.size), n)
    return plan


MARGIN = 0.01  # how far a model's prunable-FLOPs share may fall below its recorded figure


def assert_share_floor(name: str, graph, floors: dict[str, float]) -> float:
    """``graph.prunable_proportion`` is at least ``floors[name]`` minus MARGIN (a model not measured yet must
    still have some prunable FLOPs): a model whose groups get pinned fails.  Returns the share."""
    share, floor = graph.prunable_proportion, floors.get(name)
    if floor is None:
        assert share > 0, f"{name}: no prunable FLOPs"
    else:
        assert share >= floor - MARGIN, f"{name}: prunable FLOPs share {share:.4f}, was {floor:.4f}"
    return share


def call(model, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def run(model, x) -> list[torch.Tensor]:
    """The model's outputs on ``x`` as a flat list of tensors (the library's own output flattening)."""
    with torch.no_grad():
        return list(flatten_outputs(call(model, x))[0])


def assert_same_outputs(a: list[torch.Tensor], b: list[torch.Tensor], what: str, rtol: float = 0.0,
                        atol: float = 0.0) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} vs {len(b)} outputs"
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.shape == v.shape and u.device == v.device, f"{what}: output {i} {u.shape} vs {v.shape}"
        if u.is_floating_point():
            torch.testing.assert_close(v, u, rtol=rtol, atol=atol, equal_nan=True, msg=f"{what}: output {i} differs")
        else:
            assert torch.equal(u, v), f"{what}: output {i} differs"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor], what: str) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before), f"{what}: state_dict keys changed"
    for k, v in before.items():
        w = after[k]
        assert w.device == v.device and w.dtype == v.dtype and w.shape == v.shape, f"{what}: {k} changed"
        assert torch.equal(w, v) or (v.is_floating_point() and torch.equal(w.isnan(), v.isnan())
                                     and torch.equal(w.nan_to_num(), v.nan_to_num())), f"{what}: {k} changed"


def prune_and_check(model: torch.nn.Module, x, other_batch=None, seed: int = 0,
                    factory: Callable[[], torch.nn.Module] | None = None):
    """Analyse, prune with a random 30-50% plan (verified), and check the pruned model.

    Checks that ``pk.analyze`` and building a ``pk.Pruner`` leave the model untouched (same state dict, same
    outputs, and it still runs), that the pruned model keeps its output shapes (also on ``other_batch``), and,
    when ``factory`` builds the original architecture afresh, that the pruned model survives a save/load round
    trip through a FRESH model -- ``pk.load(path, factory)`` (the pruning record is replayed) and
    ``pk.load_state_dict_pruned(fresh, state_dict, example_inputs=x)`` (resized from the shapes alone) -- with
    outputs identical to the pruned model's.
    """
    model.eval()
    before = snapshot(model)
    ref = run(model, x)
    graph = pk.analyze(model, x)
    assert_state_unchanged(model, before, "after pk.analyze")
    assert_same_outputs(ref, run(model, x), "after pk.analyze")
    pk.Pruner(model, x, target=0.5)
    assert_state_unchanged(model, before, "after pk.Pruner(...)")
    assert_same_outputs(ref, run(model, x), "after pk.Pruner(...)")

    plan = random_plan(graph, seed)
    pk.prune(model, graph, plan, verify=True)
    out = run(model, x)
    assert [o.shape for o in out] == [r.shape for r in ref]
    if other_batch is not None:
        out2 = run(model, other_batch)
        assert [o.shape[1:] for o in out2] == [r.shape[1:] for r in ref]
    if factory is not None:
        roundtrip(model, x, factory, out)
    return graph, plan


def roundtrip(model: torch.nn.Module, x, factory: Callable[[], torch.nn.Module],
              out: list[torch.Tensor] | None = None) -> None:
    """Save the pruned ``model`` and rebuild it twice from a freshly built original; outputs must be identical."""
    out = run(model, x) if out is None else out
    model_sd = model.state_dict()
    with tempfile.TemporaryDirectory() as d:
        path = pk.save(model, Path(d) / "pruned.safetensors")
        fresh = pk.load(path, factory).eval()
    assert fresh is not model
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model_sd.items()}
    assert_same_outputs(out, run(fresh, x), "pk.load(path, factory)")

    fresh2 = factory().eval()
    untouched = snapshot(fresh2)
    try:
        pk.load_state_dict_pruned(fresh2, {k: v.clone() for k, v in model_sd.items()}, example_inputs=x)
    except pk.CheckpointError as e:
        # documented refusal: heads x head_dim (or similar) removals that the shapes alone cannot tell apart
        assert "ambiguous" in str(e), e
        assert_state_unchanged(fresh2, untouched, "refused load_state_dict_pruned")
        return
    assert_same_outputs(out, run(fresh2, x), "pk.load_state_dict_pruned(fresh, state_dict)")
