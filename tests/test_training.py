"""Pruning-aware training: masks that survive optimizer steps, masked -> pruned, optimizer rebuild,
regularizers, the TrainingPruner schedule towards a MAC target, config errors, resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.algorithms import BNSlimming, ChannelReg, GroupLasso, GrowingReg, keep_masked, l2_histograms
from prunekit.algorithms.optim import remember_param_names
from prunekit.algorithms.regularizers import unit_sq_norms
from prunekit.algorithms.training import load_config, masked_units


class TinyCNN(nn.Module):
    def __init__(self, width=8, classes=4):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.b2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def tiny(seed=0, width=8):
    torch.manual_seed(seed)
    return TinyCNN(width), torch.randn(2, 3, 8, 8)


def batches(n, seed=1, bs=8, size=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, size, size, generator=g), torch.randint(0, classes, (bs,), generator=g))
            for _ in range(n)]


def train(model, opt, data, reg=None):
    model.train()
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if reg is not None:
            reg.step(model)
        opt.step()


def group_of(graph, module):
    return next(g for g in graph.prunable_groups if module in g.source)


def masked_values(model):
    out = []
    for fqn, s in model._prunekit_masks.items():
        out.append(model.get_parameter(fqn).detach()[~s["mask"]] if fqn in dict(model.named_parameters())
                   else model.get_buffer(fqn)[~s["mask"]])
    return torch.cat([v.flatten() for v in out])


# ---------------------------------------------------------------------------- masks survive training
OPTS = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
        "adam": lambda p: torch.optim.Adam(p, lr=0.05)}


@pytest.mark.parametrize("opt_name", sorted(OPTS))
def test_masks_stay_zero_through_optimizer_steps(opt_name):
    for keep in (False, True):
        model, x = tiny()
        opt = OPTS[opt_name](model.parameters())
        train(model, opt, batches(2))  # momentum / Adam moments exist before masking
        graph = pk.analyze(model, x)
        pk.mask(model, graph, {group_of(graph, "c1").id: [0, 2, 5], group_of(graph, "c2").id: [1, 3]})
        hook = keep_masked(model, opt) if keep else None
        train(model, opt, batches(5, seed=2))
        vals = masked_values(model)
        if keep:
            assert torch.count_nonzero(vals) == 0
            # gradients and optimizer state of masked entries are zero too
            w = model.c1.weight
            m = model._prunekit_masks["c1.weight"]["mask"]
            assert torch.count_nonzero(w.grad[~m]) == 0
            for v in opt.state[w].values():
                if isinstance(v, torch.Tensor) and v.shape == w.shape:
                    assert torch.count_nonzero(v[~m]) == 0
            hook.remove()
        else:  # control: without the hook the optimizer moves masked weights
            assert torch.count_nonzero(vals) > 0


def test_keep_masked_picks_up_masks_added_later():
    model, x = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    hook = keep_masked(model, opt)
    graph = pk.analyze(model, x)
    train(model, opt, batches(1))
    pk.mask(model, graph, {group_of(graph, "c2").id: [0, 1, 2]})
    train(model, opt, batches(4, seed=3))
    assert torch.count_nonzero(masked_values(model)) == 0
    assert "c2.weight" in hook._grad_handles
    hook.remove()


# ---------------------------------------------------------------------------- masked -> pruned
def test_masked_to_pruned_small_cnn_equals_masked_model():
    model, x = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    graph = pk.analyze(model, x)
    g1, g2 = group_of(graph, "c1"), group_of(graph, "c2")
    pk.mask(model, graph, {g1.id: [1, 4], g2.id: [0, 7, 9, 15]})
    keep_masked(model, opt)
    train(model, opt, batches(3))
    model.eval()
    ref = model(x)
    out_model = pk.masked_to_pruned(model, x)
    assert out_model is model
    assert not hasattr(model, "_prunekit_masks")
    assert (model.c1.out_channels, model.c2.out_channels, model.fc.in_features) == (6, 12, 12)
    assert model.b1.weight.shape == (6,) and model.c2.weight.shape == (12, 6, 3, 3)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert len(model._prunekit_record) == 1


def test_masked_to_pruned_resnet18():
    import torchvision
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10).eval(), torch.randn(1, 3, 32, 32)
    p = pk.Pruner(model, x, "l2", 0.4)
    plan = p.plan()
    n_before = sum(t.numel() for t in model.parameters())
    pk.mask(model, p.graph, plan)
    with torch.no_grad():  # masked weights move in training: perturb the kept ones (masked stay zero)
        for prm in model.parameters():
            prm.mul_(1 + 0.1 * torch.randn_like(prm))
    pk.apply_masks(model)
    ref = model(x)
    pk.masked_to_pruned(model, p.graph)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert sum(t.numel() for t in model.parameters()) < 0.5 * n_before
    removed = {gid: len(u) for gid, u in model._prunekit_record[-1]["groups"].items()}
    assert removed == {gid: len(u) for gid, u in plan.items()}


def test_masked_to_pruned_needs_graph_or_inputs():
    model, x = tiny()
    with pytest.raises(ValueError, match="example inputs"):
        pk.masked_to_pruned(model)


# ---------------------------------------------------------------------------- rebuild_optimizer
def _adam_after_prune(reset):
    model, x = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, batches(3))
    old = {n: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
           for n, p in model.named_parameters()}
    graph = pk.analyze(model, x)
    g2 = group_of(graph, "c2")
    drop = [2, 5, 11]
    remember_param_names(model)
    pk.prune(model, graph, {g2.id: drop})
    same = pk.rebuild_optimizer(opt, model, reset=reset)
    assert same is opt
    return model, opt, sched, old, drop


def test_rebuild_optimizer_slices_adam_state_and_training_continues():
    model, opt, sched, old, drop = _adam_after_prune(reset=False)
    keep = torch.tensor([i for i in range(16) if i not in drop])
    params = dict(model.named_parameters())
    assert all(p in opt.state for p in params.values())
    for k in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt.state[params["c2.weight"]][k], old["c2.weight"][k][keep], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[params["b2.bias"]][k], old["b2.bias"][k][keep], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[params["fc.weight"]][k], old["fc.weight"][k][:, keep], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[params["c1.weight"]][k], old["c1.weight"][k], rtol=0, atol=0)
    assert float(opt.state[params["c2.weight"]]["step"]) == 3
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in params.values()}
    before = model.c2.weight.detach().clone()
    train(model, opt, batches(2, seed=5))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert not torch.equal(before, model.c2.weight)
    assert float(opt.state[params["c2.weight"]]["step"]) == 5


def test_rebuild_optimizer_reset_clears_state():
    model, opt, *_ = _adam_after_prune(reset=True)
    assert len(opt.state) == 0
    train(model, opt, batches(1))
    assert float(opt.state[model.c2.weight]["step"]) == 1


def test_rebuild_optimizer_sgd_momentum_and_explicit_names():
    model, x = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train(model, opt, batches(2))
    names = dict(model.named_parameters())
    mom = opt.state[model.c1.weight]["momentum_buffer"].clone()
    graph = pk.analyze(model, x)
    pk.prune(model, graph, {group_of(graph, "c1").id: [0, 3]})
    pk.rebuild_optimizer(opt, model, old_named_params=names)
    keep = torch.tensor([1, 2, 4, 5, 6, 7])
    assert torch.equal(opt.state[model.c1.weight]["momentum_buffer"], mom[keep])
    train(model, opt, batches(1))


def test_rebuild_optimizer_without_names_says_how_to_fix():
    model, x = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    graph = pk.analyze(model, x)
    pk.prune(model, graph, {group_of(graph, "c1").id: [0]})
    with pytest.raises(ValueError, match="old_named_params"):
        pk.rebuild_optimizer(opt, model)


# ---------------------------------------------------------------------------- regularizers
def _norms(model, graph, gid):
    params = dict(model.named_parameters())
    return unit_sq_norms(graph.group(gid), lambda f: params[f].detach() if f in params else None).sqrt()


def _train_with(reg_factory, steps=60, seed=0):
    model, x = tiny(seed)
    graph = pk.analyze(model, x)
    reg = reg_factory(graph, model) if reg_factory else None
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(10, seed=7)
    for i in range(steps):
        train(model, opt, [data[i % 10]], reg)
    return model, graph, reg


@pytest.fixture(scope="module")
def baseline():
    """The tiny CNN trained without a regularizer (the reference every regularizer must beat)."""
    return _train_with(None)[:2]


def test_group_lasso_shrinks_group_norms(baseline):
    base, graph = baseline
    model, graph2, _ = _train_with(lambda g, m: GroupLasso(g, lam=0.3))
    for src in ("c1", "c2"):
        gid = group_of(graph, src).id
        n0, n1 = _norms(base, graph, gid), _norms(model, graph2, gid)
        assert n1.sum() < 0.6 * n0.sum(), src


def test_group_lasso_step_equals_gradient_of_loss():
    model, x = tiny()
    graph = pk.analyze(model, x)
    reg = GroupLasso(graph, lam=0.1)
    reg.step(model)
    stepped = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reg.loss(model).backward()
    for n, g in stepped.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad)
    # closed form for one unit of c1: lam * w / ||w_u||
    g1 = group_of(graph, "c1")
    norm0 = _norms(model, graph, g1.id)[0]
    torch.testing.assert_close(stepped["c1.weight"][0], 0.1 * model.c1.weight[0].detach() / norm0, rtol=1e-4,
                               atol=1e-7)


def test_bn_slimming_shrinks_bn_scales(baseline):
    base, _ = baseline
    model, _, _ = _train_with(lambda g, m: BNSlimming(m, lam=0.3))
    for bn in ("b1", "b2"):
        assert getattr(model, bn).weight.abs().sum() < 0.5 * getattr(base, bn).weight.abs().sum(), bn
    # only norm layers are touched
    m2, _ = tiny()
    BNSlimming(m2, lam=1.0).step(m2)
    assert m2.c1.weight.grad is None or torch.count_nonzero(m2.c1.weight.grad) == 0
    assert torch.equal(m2.b1.weight.grad, torch.sign(m2.b1.weight.detach()))


def test_growing_reg_pushes_selected_units_and_grows(baseline):
    model, graph, reg = _train_with(lambda g, m: GrowingReg(g, lam0=0.0, delta=0.1, interval=5, ratio=0.5,
                                                            lam_max=5.0))
    assert reg.lam == pytest.approx(min(5.0, 0.1 * (60 // 5)))
    gid = group_of(graph, "c2").id
    sel = torch.tensor(reg.units[gid])
    assert len(sel) == 8
    n = _norms(model, graph, gid)
    others = torch.tensor([i for i in range(16) if i not in sel.tolist()])
    assert n[sel].mean() < 0.5 * n[others].mean()
    base, _ = baseline
    assert n[sel].mean() < 0.6 * _norms(base, graph, gid)[sel].mean()


def test_channel_reg_gamma_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    graph = pk.analyze(model, torch.randn(1, 3))
    g = next(g for g in graph.prunable_groups if "0" in g.source)
    reg = ChannelReg(graph, alpha=4.0, reg=0.1, groups=[g.id])
    w0, b0, w2 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[2].weight))
    imp = (w0.pow(2).sum(1) + b0.pow(2) + w2.pow(2).sum(0)).sqrt()
    gamma = 4.0 ** ((imp.max() - imp) / (imp.max() - imp.min()))
    assert gamma.min() == pytest.approx(1.0) and gamma.max() == pytest.approx(4.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    reg.step(model)
    torch.testing.assert_close(model[0].weight.grad, 1 + 0.1 * gamma[:, None] * w0)
    torch.testing.assert_close(model[0].bias.grad, 1 + 0.1 * gamma * b0)
    torch.testing.assert_close(model[2].weight.grad, 1 + 0.1 * gamma[None, :] * w2)
    torch.testing.assert_close(model[2].bias.grad, torch.ones(2))  # not part of the group
    torch.testing.assert_close(reg.loss(model), 0.05 * (gamma * imp.pow(2)).sum())


def test_l2_histograms_data_and_checkpoints(tmp_path):
    model, x = tiny()
    graph = pk.analyze(model, x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["c1.weight"][3] = 0
    torch.save(sd, tmp_path / "e1.pt")
    data = l2_histograms(model, graph, checkpoints=[sd, tmp_path / "e1.pt"])
    assert list(data) == ["model", "ckpt0", "e1.pt"]
    gid = group_of(graph, "c1").id
    assert data["model"][gid].shape == (8,)
    assert data["ckpt0"][gid][3] < data["model"][gid][3]
    torch.testing.assert_close(data["ckpt0"][gid], data["e1.pt"][gid])
    try:
        import matplotlib  # noqa: F401
        l2_histograms(model, graph, path=tmp_path / "h.png")
        assert (tmp_path / "h.png").stat().st_size > 0
    except ImportError:
        with pytest.raises(ImportError, match="pip install matplotlib"):
            l2_histograms(model, graph, path=tmp_path / "h.png")


# ---------------------------------------------------------------------------- TrainingPruner
BASE_CFG = {"start_epoch": 1, "end_epoch": 4, "epoch_rate": 1, "target": 0.5,
            "regularization": {"type": "channel", "strength": 1e-3, "alpha": 4}}


def _run_schedule(cfg, epochs=6, seed=0):
    model, x = tiny(seed, width=24)  # 24/48 channels: one unit is 2-4% of the MACs
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    base = pk.count(model, x).macs
    tp = pk.TrainingPruner(model, cfg, example_inputs=x, optimizer=opt)
    data = batches(3, seed=11)
    fracs = []
    for epoch in range(epochs):
        model.train()
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            tp.regularize()
            opt.step()
        if hasattr(model, "_prunekit_masks"):
            assert torch.count_nonzero(masked_values(model)) == 0
        tp.step(epoch)
        fracs.append(tp.macs_fraction())
    return model, x, opt, tp, base, fracs


@pytest.mark.parametrize("glob", [False, True])
def test_training_pruner_reaches_mac_target(glob):
    cfg = dict(BASE_CFG, global_pruning=glob)
    model, x, opt, tp, base, fracs = _run_schedule(cfg)
    assert tp.pruned
    kept = pk.count(model, x).macs / base
    # target met, within 5% of the original MACs, and no further than one unit's worth of MACs below it
    assert kept <= 0.5 + 1e-6 and abs(kept - 0.5) <= 0.05, kept
    g0 = pk.analyze(tiny(0, width=24)[0], x)
    one_unit = max(1 - g0.macs({g.id: 1}) / g0.macs() for g in g0.prunable_groups)
    assert kept >= 0.5 - one_unit, (kept, one_unit)
    assert fracs[0] == 1.0  # before start_epoch nothing happens
    assert fracs[1] < 1.0 and all(a >= b for a, b in zip(fracs, fracs[1:]))  # the ramp only goes down
    assert [h["epoch"] for h in tp.history] == [1, 2, 3, 4] and tp.history[-1]["pruned"]
    assert tp.history[0]["goal"] == pytest.approx(1 - 0.25 * 0.5)
    # optimizer rebuilt: training continues on the smaller model
    assert all(p.shape == q.shape for p, q in zip(opt.param_groups[0]["params"], model.parameters()))
    train(model, opt, batches(2))
    assert model(x).shape == (2, 4)


def test_training_pruner_layers_and_round_to():
    cfg = dict(BASE_CFG, layers=["c2"], round_to=4, target=0.7, regularization=None)
    model, x, *_ = _run_schedule(cfg)
    assert model.c1.out_channels == 24
    assert model.c2.out_channels < 48 and model.c2.out_channels % 4 == 0


def test_training_pruner_schedule_full_stops_at_target():
    cfg = dict(BASE_CFG, schedule="full", start_epoch=0, end_epoch=9, target=0.6, regularization=None)
    model, x, opt, tp, base, fracs = _run_schedule(cfg, epochs=10)
    assert tp.pruned and len(tp.history) < 10  # target reached before end_epoch
    assert pk.count(model, x).macs / base <= 0.6 * 1.05


def test_training_pruner_config_from_files(tmp_path):
    pj = tmp_path / "pruning_config.json"
    seed = {("mac_target" if k == "target" else k): v for k, v in BASE_CFG.items()}  # a SIRC-style file: old key names
    pj.write_text(json.dumps({"channel_sparsity_args": dict(seed, block_size=2),
                              "slice_sparsity_args": {"block_size": 4}}))
    cfg = load_config(pj)
    assert cfg["round_to"] == 2 and cfg["slice_args"] == {"block_size": 4} and cfg["target"] == 0.5
    py = tmp_path / "cfg.yaml"
    py.write_text("target: 0.6\nend_epoch: 3\nlayers: [c1]\n")
    cfg = load_config(py)
    assert cfg["layers"] == ["c1"] and cfg["end_epoch"] == 3


@pytest.mark.parametrize("cfg, key", [
    ({"target": 0.5, "strat_epoch": 2}, "strat_epoch"),
    ({"end_epoch": 3}, "target"),
    ({"target": 1.5}, "target"),
    ({"target": 0.5, "start_epoch": 5, "end_epoch": 2}, "end_epoch"),
    ({"target": 0.5, "epoch_rate": 0}, "epoch_rate"),
    ({"target": 0.5, "round_to": 1.5}, "round_to"),
    ({"target": 0.5, "max_ratio": 0}, "max_ratio"),
    ({"target": 0.5, "global_pruning": "yes"}, "global_pruning"),
    ({"target": 0.5, "regularization": {"type": "l0"}}, "regularization.type"),
    ({"target": 0.5, "regularization": {"type": "channel", "lam": 1}}, "regularization.lam"),
    ({"target": 0.5, "layers": []}, "layers"),
])
def test_training_pruner_config_errors_name_the_key(cfg, key):
    model, x = tiny()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        pk.TrainingPruner(model, cfg, example_inputs=x)


def test_training_pruner_layers_matching_nothing_and_unreachable_target():
    model, x = tiny()
    with pytest.raises(ValueError, match="layers"):
        pk.TrainingPruner(model, {"target": 0.5, "layers": ["nope*"]}, example_inputs=x)
    tp = pk.TrainingPruner(model, {"target": 0.1, "max_ratio": 0.2, "start_epoch": 0, "end_epoch": 0},
                           example_inputs=x)
    with pytest.raises(ValueError, match="max_ratio"):
        tp.step(0)


def test_training_pruner_resume_mid_schedule_and_after_pruning(tmp_path):
    cfg = dict(BASE_CFG, regularization={"type": "growing", "strength": 0.0, "delta": 1e-3, "interval": 2})
    model, x = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    tp = pk.TrainingPruner(model, cfg, example_inputs=x, optimizer=opt)
    data = batches(2)
    for epoch in range(3):
        train(model, opt, data)
        tp.regularize()
        tp.step(epoch)
    tp.save_checkpoint(tmp_path / "mid.pt", extra_note=1)
    # a fresh original model resumes with the same masks and schedule position
    model2, _ = tiny(seed=5)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    tp2 = pk.TrainingPruner(model2, cfg, example_inputs=x, optimizer=opt2)
    assert tp2.load_checkpoint(tmp_path / "mid.pt") == {"extra_note": 1}
    assert tp2.last_epoch == 2 and tp2.regularizer.calls == tp.regularizer.calls
    m1 = {g: u for g, u in masked_units(model, tp.graph).items()}
    m2 = masked_units(model2, tp2.graph)
    assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
    model.eval(), model2.eval()
    torch.testing.assert_close(model2(x), model(x))
    assert tp2.step(2) is None  # already done
    for epoch in (3, 4):
        tp2.step(epoch)
    assert tp2.pruned
    tp2.save_checkpoint(tmp_path / "pruned.pt")
    # and a fresh original model takes the pruned checkpoint (architecture replayed from the record)
    model3, _ = tiny(seed=9)
    opt3 = torch.optim.Adam(model3.parameters(), lr=0.01)
    tp3 = pk.TrainingPruner(model3, cfg, example_inputs=x, optimizer=opt3)
    tp3.load_checkpoint(tmp_path / "pruned.pt")
    assert tp3.pruned and tp3.step(5) is None
    assert [p.shape for p in model3.parameters()] == [p.shape for p in model2.parameters()]
    model3.eval()
    torch.testing.assert_close(model3(x), model2(x))
    train(model3, opt3, batches(1))
    assert math.isfinite(float(model3(x).detach().sum()))


def test_sirc_calling_convention_model_config_forward_fn():
    """TrainingPruner(model, config, model.forward): inputs come from the config's input_shape."""
    model, x = tiny()
    cfg = dict(BASE_CFG, input_shape=list(x.shape))
    tp = pk.TrainingPruner(model, cfg, model.forward)
    assert tuple(tp.example_inputs.shape) == tuple(x.shape)
    assert tp.macs_fraction() == pytest.approx(1.0)
    assert tp.pruner.graph.prunable_groups  # model.forward (a bound method) works with the dry run on the meta view
    with pytest.raises(ValueError, match="input_shape"):
        pk.TrainingPruner(model, dict(BASE_CFG), model.forward)
