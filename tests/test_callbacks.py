"""User callbacks are called with the arguments they accept (prunekit._callbacks), checked up front with a
clear error: AdaptivePruner, prune_iteratively, TrainingPruner."""
from __future__ import annotations

import functools
import pickle

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit._callbacks import callback
from tests.test_adaptive import X_EXAMPLE, make

OFFERED = ("model", "iteration", "candidate")
SEEN: list = []


# module level: picklable, as AdaptivePruner(workers > 1) needs
def ft_model(model):
    SEEN.append(("model",))


def ft_steps(model, steps=30):
    SEEN.append(("steps", steps))


def ft_iteration(model, iteration):
    SEEN.append(("iteration", iteration))


def ft_all(model, iteration, candidate):
    SEEN.append(("all", iteration, candidate))


def ft_kw(model, **kw):
    SEEN.append(("kw", sorted(kw)))


def ft_candidate(model, candidate):
    SEEN.append(("candidate", candidate))


def ft_args(*args):
    SEEN.append(("args", len(args)))


def ft_four(model, iteration, candidate, optimizer):
    raise AssertionError("must not be called")


def ft_kwonly(model, *, lr):
    raise AssertionError("must not be called")


@pytest.mark.parametrize("fn, expect", [
    (ft_model, ("model",)),
    (ft_steps, ("steps", 30)),  # the user's default stays: the iteration is not passed into ``steps``
    (ft_iteration, ("iteration", 7)),
    (ft_all, ("all", 7, "cand")),
    (ft_kw, ("kw", ["candidate", "iteration"])),
    (ft_candidate, ("candidate", "cand")),  # by name
    (ft_args, ("args", 3)),
    (lambda model, it, cand=None: SEEN.append(("named-other", it, cand)), ("named-other", 7, None)),
    (lambda m, iteration=0: SEEN.append(("default-by-name", iteration)), ("default-by-name", 7)),
    (functools.partial(ft_steps, steps=5), ("steps", 5)),
])
def test_natural_signatures_get_what_they_take(fn, expect):
    SEEN.clear()
    cb = callback(fn, "finetune_fn", "Owner", OFFERED)
    cb("the model", 7, "cand")
    assert SEEN == [expect]
    if getattr(fn, "__name__", "") != "<lambda>":  # module-level functions go to worker processes
        assert pickle.loads(pickle.dumps(cb)).passes() == cb.passes()


@pytest.mark.parametrize("fn, why", [
    (ft_four, "parameter 'optimizer' has no default"),
    (ft_kwonly, "keyword-only parameter 'lr' has no default"),
    (lambda: None, "does not take model"),
])
def test_uncallable_signatures_fail_with_the_accepted_ones(fn, why):
    with pytest.raises(TypeError, match="Owner: finetune_fn=") as e:
        callback(fn, "finetune_fn", "Owner", OFFERED)
    msg = str(e.value)
    assert why in msg
    assert "finetune_fn(model), finetune_fn(model, iteration), finetune_fn(model, iteration, candidate)" in msg
    assert "finetune_fn(model, **kwargs)" in msg
    with pytest.raises(TypeError, match="finetune_fn must be callable"):
        callback(3, "finetune_fn", "Owner", OFFERED)
    assert callback(None, "finetune_fn", "Owner", OFFERED) is None


def test_positional_check_only():
    cb = callback(lambda m, x, flag=False: (m, x), "forward_fn", "Owner", ("model", "inputs"), required=2,
                  positional=True)
    assert cb(1, 2) == (1, 2)
    with pytest.raises(TypeError, match=r"forward_fn=.*cannot be called with \(model, inputs\)"):
        callback(lambda x: x, "forward_fn", "Owner", ("model", "inputs"), required=2, positional=True)


def test_builtins_without_signature_are_called_as_before():
    seen = []
    cb = callback(seen.append, "callback", "Owner", ("entry",))
    cb({"step": 1})
    assert seen == [{"step": 1}]


# ---------------------------------------------------------------- the library's callbacks
@pytest.mark.parametrize("fn, check", [
    (ft_model, lambda s: s and all(e == ("model",) for e in s)),
    (ft_steps, lambda s: s and all(e == ("steps", 30) for e in s)),
    (ft_iteration, lambda s: s and {e[1] for e in s} == {1}),
    (ft_all, lambda s: s and all(e[1] == 1 and isinstance(e[2], pk.algorithms.adaptive.Candidate) for e in s)),
    (ft_kw, lambda s: s and all(e == ("kw", ["candidate", "iteration"]) for e in s)),
])
def test_adaptive_pruner_calls_finetune_fn_with_what_it_takes(fn, check):
    SEEN.clear()
    final = []
    ap = pk.AdaptivePruner(make(), X_EXAMPLE, pk.FlopsTarget(0.9), finetune_fn=fn, eval_fn=lambda m, batches=2: 1.0,
                           final_finetune_fn=lambda model, epochs=1: final.append(epochs), delta_crop=0.15)
    ap.run()
    assert check(SEEN), SEEN
    assert final == [1]


def test_adaptive_pruner_refuses_uncallable_callbacks_at_construction():
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"AdaptivePruner: finetune_fn=ft_four\(model, iteration, candidate, "
                                        r"optimizer\) cannot be called"):
        pk.AdaptivePruner(model, X_EXAMPLE, pk.FlopsTarget(0.5), finetune_fn=ft_four)
    with pytest.raises(TypeError, match="AdaptivePruner: eval_fn=.*eval_fn\\(model\\)"):
        pk.AdaptivePruner(model, X_EXAMPLE, pk.FlopsTarget(0.5), eval_fn=lambda model, loader: 1.0)
    with pytest.raises(TypeError, match="AdaptivePruner: forward_fn="):
        pk.AdaptivePruner(model, X_EXAMPLE, pk.FlopsTarget(0.5), forward_fn=lambda x: model(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fn, expect", [
    (lambda model: ("model",), [("model",)] * 2),
    (lambda model, steps=30: ("steps", steps), [("steps", 30)] * 2),
    (lambda model, iteration: ("iteration", iteration), [("iteration", 1), ("iteration", 2)]),
    (lambda model, step: ("step", step), [("step", 1), ("step", 2)]),
    (lambda model, **kw: ("kw", kw), [("kw", {"step": 1}), ("kw", {"step": 2})]),
])
def test_prune_iteratively_calls_finetune_fn_with_what_it_takes(fn, expect):
    from tests.test_schedules import X, tiny
    seen, evals = [], []
    p = pk.Pruner(tiny(), X, "l2", 0.5)
    wrapped = functools.wraps(fn)(lambda *a, **k: seen.append(fn(*a, **k)))  # records; has the signature of ``fn``
    pk.prune_iteratively(p, pk.Linear(steps=2), wrapped, lambda model, batches=3: evals.append(batches) or 1.0,
                         callback=lambda entry: None, progress=False)
    assert seen == expect
    assert evals == [3, 3]


def test_prune_iteratively_refuses_uncallable_callbacks_before_pruning():
    from tests.test_schedules import X, tiny
    model = tiny()
    p = pk.Pruner(model, X, "l2", 0.5)
    macs = pk.count(model, X).macs
    with pytest.raises(TypeError, match=r"prune_iteratively: finetune_fn=.*finetune_fn\(model, step\)"):
        pk.prune_iteratively(p, pk.Linear(steps=2), lambda model, step, optimizer: None, progress=False)
    with pytest.raises(TypeError, match="prune_iteratively: callback="):
        pk.prune_iteratively(p, pk.Linear(steps=2), callback=lambda: None, progress=False)
    assert pk.count(model, X).macs == macs and not p.history


def test_training_pruner_checks_forward_and_loss_fn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    cfg = {"target": 0.5, "start_epoch": 0, "end_epoch": 1}
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(TypeError, match=r"TrainingPruner: forward_fn=.*TrainingPruner\(model, config, model.forward\)"):
        pk.TrainingPruner(model, cfg, x, forward_fn=model.forward)
    with pytest.raises(TypeError, match="TrainingPruner: loss_fn="):
        pk.TrainingPruner(model, cfg, x, loss_fn=lambda out: out.sum())
    pk.TrainingPruner(model, cfg, x, forward_fn=lambda m, inputs: m(inputs))  # fine
