"""Learned channel pruning: gates reach a FLOPs target, finalize() removes what they closed, the
FLOPs proportion is differentiable, eval gates are deterministic, blocks, ignore, heads, distillation."""
from __future__ import annotations

import gzip
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.algorithms.learned import LearnedPruner, _channel_map
from prunekit.analysis.analyzer import Member
from tests.zoo.tricky_models import MatmulAttentionNet, SDPANet

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every test here runs on one thread (see conftest.one_thread)."""


def fashion_mnist(n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST at 14x14 (2x2 average pooled) if installed, else a learnable synthetic stand-in."""
    img, lab = f"{FMNIST}/train-images-idx3-ubyte.gz", f"{FMNIST}/train-labels-idx1-ubyte.gz"
    if os.path.exists(img) and os.path.exists(lab):
        with gzip.open(img) as f:
            x = torch.frombuffer(bytearray(f.read()[16:]), dtype=torch.uint8).reshape(-1, 1, 28, 28)[:n]
        with gzip.open(lab) as f:
            y = torch.frombuffer(bytearray(f.read()[8:]), dtype=torch.uint8)[:n].long()
        x = (x.float() / 255.0 - 0.286) / 0.353
        return F.avg_pool2d(x, 2), y
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 1, 14, 14, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return protos[y] + 0.5 * torch.randn(n, 1, 14, 14, generator=g), y


class Net(nn.Module):
    def __init__(self, w: int = 8):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w)
        self.c2, self.b2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w)
        self.c3, self.b3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w)
        self.c4, self.b4 = nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        for c, b in ((self.c1, self.b1), (self.c2, self.b2), (self.c3, self.b3), (self.c4, self.b4)):
            x = F.relu(b(c(x)))
        return self.fc(x.mean((2, 3)))


def net(seed=0):
    torch.manual_seed(seed)
    return Net(), torch.randn(2, 1, 14, 14)


def group_of(lp, module):
    return next(g for g in lp.groups if module in g.source)


def close_some(lp, seed=0):
    """Random logits: roughly half of every group's gates closed, at least one closed somewhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in lp.gates.values():
            gate.logit.copy_(torch.randn(gate.logit.shape, generator=g))
            gate.logit[0] = 1.0
            gate.logit[-1] = -1.0


def train(lp, model, x, y, steps, lr_gates=0.1, bs=32, seed=0):
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 3e-3},
                            {"params": list(lp.parameters()), "lr": lr_gates}])
    g = torch.Generator().manual_seed(seed)
    model.train()
    hist = []
    for step in range(steps):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        out = model(x[idx])
        p, fl, el, dl = lp.losses(step)
        loss = F.cross_entropy(out, y[idx]) + fl + el + dl
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(float(p.detach()))
    return hist


# ---------------------------------------------------------------------------- reaching the target
def test_gates_reach_flops_target_and_finalize_removes_channels():
    x, y = fashion_mnist()
    model, ex = net()
    base = pk.count(model, ex).macs
    target, steps = 0.5, 300
    g = pk.analyze(model, ex)
    unit = max(1 - g.macs_kept({gr.id: gr.size - 1}) / g.macs() for gr in g.prunable_groups)
    lp = LearnedPruner(model, ex, pk.FlopsTarget(target), steps, seed=0)
    assert lp.base_macs == base
    lp.prepare()
    hist = train(lp, model, x, y, steps)
    assert hist[0] > 0.85  # gates start ~open
    # at the target: not above it by more than 5%, not below it by more than one unit's share of the MACs (one
    # channel of this small net is up to 4.5% of them; on real Fashion-MNIST the gates settle one unit under)
    assert target - unit - 1e-3 <= hist[-1] < 1.05 * target  # expected proportion at the target
    assert target - unit - 1e-3 <= lp.current_proportion() < 1.05 * target  # deterministic gates too
    model.eval()
    with torch.no_grad():
        gated = model(x[:256])
    small = lp.finalize()
    assert small is model
    assert not model._forward_hooks and not model.c1._forward_hooks and not model.b1._forward_hooks
    assert target - unit - 1e-3 <= lp.reached < 1.05 * target
    assert pk.count(small, ex).macs / base == pytest.approx(lp.reached)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in Net().parameters())
    convs = [(small.c1, small.b1, 8), (small.c2, small.b2, 16), (small.c3, small.b3, 16), (small.c4, small.b4, 32)]
    assert any(c.out_channels < w for c, _b, w in convs)  # which layers lose channels depends on the data
    assert all(b.num_features == c.out_channels for c, b, _w in convs)
    with torch.no_grad():
        out = small(x[:256])
    # deterministic eval gates == the physically pruned model (exact groups; gate after the BatchNorm)
    assert torch.allclose(out, gated, atol=1e-5)
    acc = (out.argmax(1) == y[:256]).float().mean()
    assert acc > 0.3  # trained while pruning: far above chance (0.1)


# ---------------------------------------------------------------------------- the FLOPs loss
def test_proportion_is_differentiable_and_matches_macs_kept():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.5), 100, gate_lr=None)  # gradients stay on the logits (the default: see
    lp.prepare()                                             # test_learned_short.py)
    model(torch.randn(4, 1, 14, 14))
    p, fl, el, dl = lp.losses(0)
    for t in (p, fl, el, dl):
        assert t.dim() == 0
    kept = {gid: float(torch.sigmoid(g.logit.detach()).sum()) for gid, g in lp.gates.items()}
    assert p.item() == pytest.approx(float(lp.graph.macs_kept(kept)) / lp.base_macs, rel=1e-5)
    assert fl.item() == pytest.approx(3.0 * (1.1 * (p.item() - 0.5)), rel=1e-5)  # above the target
    assert el.item() == 0.0  # entropy weight ramps up from 0
    p.backward()
    for gid, g in lp.gates.items():
        assert g.logit.grad is not None and (g.logit.grad > 0).all(), gid  # closing any gate lowers MACs
    # under the target, the symmetric term pulls the proportion back up (negative slope)
    with torch.no_grad():
        for g in lp.gates.values():
            g.logit.fill_(-3.0)
    p2, fl2, _, _ = lp.losses(50)
    assert p2.item() < 0.5 and fl2.item() == pytest.approx(3.0 * 0.1 * (0.5 - p2.item()), rel=1e-5)


def test_entropy_loss_ramps_and_prefers_decided_gates():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.5), 100, entropy_weight=2.0)
    lp.prepare()
    _, _, e_half, _ = lp.losses(50)
    _, _, e_end, _ = lp.losses(100)
    assert e_end.item() == pytest.approx(2 * e_half.item())
    with torch.no_grad():
        for g in lp.gates.values():
            g.logit.fill_(0.0)
    _, _, e_undecided, _ = lp.losses(100)
    assert e_undecided.item() == pytest.approx(2.0, rel=1e-4)  # H(0.5) / log 2 = 1
    assert e_end.item() < e_undecided.item() / 3  # gates at 95% are nearly decided


def test_unreachable_target_is_an_error():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.5), 10, ignore=["c2", "c3", "c4"])
    assert 0 < lp.prunable_proportion < 0.5
    with pytest.raises(ValueError, match="cannot be reached"):
        lp.prepare()
    with pytest.raises(ValueError, match="fraction of MACs to KEEP"):
        LearnedPruner(model, ex, pk.FlopsTarget(1.0), 10)  # a FlopsTarget may keep all; gates must cut


# ---------------------------------------------------------------------------- gates
def test_eval_gates_are_deterministic_and_train_gates_are_seeded():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.5), 100, seed=3)
    lp.prepare()
    close_some(lp)
    x = torch.randn(4, 1, 14, 14)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    with torch.no_grad():  # closed gates silence their channels after the norm
        gate = lp.gates[group_of(lp, "c1").id]
        closed = (~gate.hard()).nonzero().flatten()
        feats = F.relu(model.b1(model.c1(x)))
    assert closed.numel() and (feats[:, closed] == 0).all()
    assert (feats[:, gate.hard().nonzero().flatten()] != 0).any()
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.equal(c, d)  # stochastic relaxed gates in training

    def run_train_forward():
        m, ex2 = net()
        lp2 = LearnedPruner(m, ex2, pk.FlopsTarget(0.5), 100, seed=3)
        lp2.prepare()
        with torch.no_grad():
            return m(x)
    assert torch.equal(run_train_forward(), run_train_forward())


def test_temperature_anneals():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.5), 100, temperature_start=2.0, temperature_end=0.5)
    assert lp.temperature(0) == pytest.approx(2.0)
    assert lp.temperature(50) == pytest.approx(1.0)
    assert lp.temperature(100) == pytest.approx(0.5) and lp.temperature(500) == pytest.approx(0.5)


def test_block_mode_keeps_multiples_of_gate_size():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.5), 100, gate_size=4)
    lp.prepare()
    sizes = {gid: g.group.size for gid, g in lp.gates.items()}
    assert all(g.logit.numel() == sizes[gid] // 4 for gid, g in lp.gates.items())
    close_some(lp, seed=1)
    kept = lp.kept()
    assert all(k % 4 == 0 and 0 < k < sizes[gid] for gid, k in kept.items())
    for gid, units in lp.plan().items():  # whole blocks go
        assert len(units) % 4 == 0 and all(sum(u // 4 == b for u in units) in (0, 4) for b in range(sizes[gid] // 4))
    small = lp.finalize()
    for c in (small.c1, small.c2, small.c3, small.c4):
        assert c.out_channels % 4 == 0
    assert small.c1.out_channels == kept[group_of(lp, "c1").id]
    assert lp.reached == pytest.approx(lp.graph.macs(lp.plan()) / lp.base_macs)


def test_ignore_patterns_and_modules():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.6), 100, ignore=["c1", model.c3])
    gated = {s for g in lp.groups for s in g.source}
    assert "c1" not in gated and "c3" not in gated and {"c2", "c4"} <= gated
    lp.prepare()
    assert not model.b1._forward_hooks and not model.b3._forward_hooks and model.b2._forward_hooks
    close_some(lp)
    small = lp.finalize()
    assert small.c1.out_channels == 8 and small.c3.out_channels == 16
    assert small.c2.out_channels < 16


@pytest.mark.parametrize("cls, proj", [(SDPANet, ("q", "k", "v")), (MatmulAttentionNet, ("qkv",))])
def test_head_gates_repeat_over_head_dim(cls, proj):
    torch.manual_seed(0)
    model, ex = cls(), torch.randn(2, 6, 5)
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.9), 100)
    heads = next(g for g in lp.groups if g.unit == "head")
    n_heads, hd = model.attn.num_heads, model.attn.head_dim
    lp.prepare()
    with torch.no_grad():  # close head 1, everything else open
        lp.gates[heads.id].logit.copy_(torch.tensor([3.0, -3.0] + [3.0] * (n_heads - 2)))
    model.eval()
    for name in proj:  # q, k and v rows of head 1 (all head_dim of them), in separate or fused projections
        with torch.no_grad():
            out = getattr(model.attn, name)(model.inp(ex))
        for part in out.split(n_heads * hd, dim=-1):
            assert (part[..., hd:2 * hd] == 0).all()
            assert (part[..., :hd] != 0).all() and (part[..., 2 * hd:] != 0).all()
    with torch.no_grad():
        gated = model(ex)
    assert lp.plan() == {heads.id: [1]}
    small = lp.finalize()
    assert small.attn.num_heads == n_heads - 1
    with torch.no_grad():
        assert torch.allclose(small(ex), gated, atol=1e-5)


def test_channel_map_merges_members_of_one_weight():
    # q and k rows of one fused projection, 2 heads x 3 dims each at offsets 0 and 6; rows 12..13 outside
    cmap = _channel_map(Member("qkv.weight", 0, 0, (2, 3), 0), 14, None)
    cmap = _channel_map(Member("qkv.weight", 0, 6, (2, 3), 0), 14, cmap)
    assert cmap.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 2, 2]  # 2 = "not in the group": gate 1
    dims = _channel_map(Member("qkv.weight", 0, 0, (2, 3), 1), 6, None)  # head_dim units: every 3rd row
    assert dims.tolist() == [0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------------------- distillation & checkpoints
def test_distillation_loss_against_frozen_teacher():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.5), 100, distill_weight=2.0)
    lp.prepare()
    x = torch.randn(4, 1, 14, 14)
    model.eval()
    model(x)
    assert lp.losses(0)[3].item() == 0.0  # all gates open in eval == the teacher
    close_some(lp)
    out = model(x)
    with torch.no_grad():
        ref = lp.teacher(x)
    d = lp.losses(1)[3]
    assert d.item() == pytest.approx(2.0 * F.mse_loss(out, ref).item(), rel=1e-5)
    d.backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in lp.teacher.parameters())
    with pytest.raises(RuntimeError, match="last forward"):
        lp.losses(2)  # no forward since the last losses()


def test_state_dict_round_trip():
    model, ex = net()
    lp = LearnedPruner(model, ex, pk.FlopsTarget(0.5), 100)
    lp.prepare()
    close_some(lp)
    lp.set_step(42)
    state = lp.state_dict()
    model2, _ = net()
    lp2 = LearnedPruner(model2, ex, pk.FlopsTarget(0.5), 100)
    lp2.prepare()
    lp2.load_state_dict(state)
    assert lp2.step == 42 and lp2.plan() == lp.plan()
    lp3 = LearnedPruner(net()[0], ex, pk.FlopsTarget(0.5), 100, ignore=["c1"])
    lp3.prepare()
    with pytest.raises(ValueError, match="ignore/block_size"):
        lp3.load_state_dict(state)
