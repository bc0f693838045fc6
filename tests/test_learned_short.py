"""Learned gates reach the FLOPs target within the declared num_steps, whatever the user's optimizer: the
gates have their own optimizer and a projection holds the kept MACs to a schedule (issue 11)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from tests.test_learned import Net, train


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


def teacher_data(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images labelled by a fixed random teacher network (a learnable task without a data set)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(123)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                            nn.Linear(32, 10))
    x = torch.randn(n, 1, 14, 14, generator=g)
    with torch.no_grad():
        return x, teacher(x).argmax(1)


def trained_cnn(x, y, width=16, steps=100) -> nn.Module:
    torch.manual_seed(0)
    model = Net(width)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        i = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


OPTIMIZERS = {
    "adamw-2e-3": lambda ps: torch.optim.AdamW(ps, lr=2e-3),
    "sgd-1e-2-m0.9": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "adam-1e-4": lambda ps: torch.optim.Adam(ps, lr=1e-4),  # torch-dag's recommended rate: gates barely move
}


@pytest.mark.parametrize("opt_name, steps", [("adamw-2e-3", 400), ("adamw-2e-3", 200), ("sgd-1e-2-m0.9", 400),
                                             ("sgd-1e-2-m0.9", 200), ("adam-1e-4", 200)])
def test_short_run_reaches_the_target_with_any_optimizer(opt_name, steps, caplog):
    x, y = teacher_data()
    model = trained_cnn(x, y)
    acc0 = accuracy(model, x[:512], y[:512])
    assert acc0 > 0.9
    ex = torch.randn(2, 1, 14, 14)
    target = 0.5
    lp = pk.LearnedPruner(model, ex, pk.FlopsTarget(target), num_steps=steps)
    lp.prepare_for_pruning()  # the torch-dag names
    opt = OPTIMIZERS[opt_name]([*model.parameters(), *lp.parameters()])  # the gates given to it as well
    g = torch.Generator().manual_seed(2)
    model.train()
    for step in range(steps):
        i = torch.randint(0, len(x), (32,), generator=g)
        out = model(x[i])
        p, fl, el, dl = lp.compute_current_proportion_and_pruning_losses(global_step=step)
        task = F.cross_entropy(out, y[i])
        loss = task + fl + el + dl
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(task)
    assert abs(float(p.detach()) - target) <= 0.05  # the proportion the run reports ends at the target too
    model.eval()
    with torch.no_grad():
        gated = model(x[:512])
    assert lp.compute_normalized_flops() == pytest.approx(lp.current_proportion())
    with caplog.at_level(logging.WARNING, logger="prunekit.learned"):
        small = lp.remove_channels()
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]
    assert lp.reached <= target + 1e-9  # a budget: at most the target ...
    assert abs(lp.reached - target) <= 0.05  # ... and within 0.05 of it after the declared steps
    assert lp.compute_normalized_flops() == lp.reached == pytest.approx(pk.count(small, ex).macs / lp.base_macs)
    with torch.no_grad():
        assert torch.allclose(small(x[:512]), gated, atol=1e-4)  # the eval gates were the pruned model
    assert accuracy(small, x[:512], y[:512]) > 0.8  # still a working model (about 0.97 before pruning)


def test_gate_gradients_go_to_the_pruners_own_optimizer():
    x, y = teacher_data(256)
    model = trained_cnn(x, y, width=8, steps=10)
    lp = pk.LearnedPruner(model, torch.randn(2, 1, 14, 14), pk.FlopsTarget(0.5), 100)
    lp.prepare()
    opt = torch.optim.SGD([*model.parameters(), *lp.parameters()], lr=1e-4)
    model.train()
    model(x[:32])
    before = {gid: g.logit.detach().clone() for gid, g in lp.gates.items()}
    p, fl, el, dl = lp.losses(0)
    (F.cross_entropy(model(x[:32]), y[:32]) + fl + el + dl).backward()
    assert all(g.logit.grad is None for g in lp.gates.values())  # taken by the pruner, so opt.step skips them
    opt.step()
    assert all(torch.equal(before[gid], g.logit) for gid, g in lp.gates.items())
    model(x[:32])  # the next forward applies the gates' own update (and the projection)
    moved = torch.cat([(g.logit - before[gid]).detach() for gid, g in lp.gates.items()])
    spread = moved - moved.mean()
    assert spread.abs().max() > 1e-3  # gates move by different amounts: the update is not a common shift


def test_latency_target_trains_against_the_shared_latency_model():
    """LearnedPruner(target=pk.LatencyTarget(r)): the gates' loss is the latency the shared latency model predicts
    (a synthetic staircase table here), differentiable in the expected widths; the run ends at the predicted
    latency target, and the pruned model's predicted latency is what the pruner reports."""
    from prunekit.cost.latency_model import LatencyModel
    from tests.test_latency_model import stair
    x, y = teacher_data()
    model = trained_cnn(x, y, width=64)  # wide enough that the 8-channel steps of the staircase are fine-grained
    ex = torch.randn(2, 1, 14, 14)
    graph = pk.analyze(model, ex)
    lm = LatencyModel(model, ex, measure_fn=stair, graph=graph)
    lp = pk.LearnedPruner(model, ex, pk.LatencyTarget(0.6), num_steps=200, latency_model=lm)
    assert lp.quantity == "latency" and lp.latency_model is lm
    lp.prepare()
    # differentiable: the latency loss reaches the gate logits
    model.train()
    model(x[:32])
    p, fl, el, dl = lp.losses(0)
    assert float(p.detach()) == pytest.approx(
        lp._fraction({g: float(v.detach()) for g, v in _expected(lp).items()}), rel=1e-6)
    grads = torch.autograd.grad(p, [g.logit for g in lp.gates.values()], retain_graph=True)
    assert all(torch.isfinite(gr).all() for gr in grads) and any(float(gr.abs().sum()) > 0 for gr in grads)
    train(lp, model, x, y, 200, seed=2)
    small = lp.finalize()
    assert lp.reached == lp.reached_latency and lp.reached <= 0.6 + 1e-9 and abs(lp.reached - 0.6) <= 0.05
    assert lp.reached_latency == pytest.approx(lm.measure_model(small).median_ms / lm.base_ms, rel=1e-6)
    assert lp.compute_normalized_flops() == lp.reached_macs == pytest.approx(pk.count(small, ex).macs / lp.base_macs)
    assert accuracy(small, x[:512], y[:512]) > 0.7


def _expected(lp):
    return {gid: (torch.sigmoid(g.logit) * g.block_len).sum() for gid, g in lp.gates.items()}
