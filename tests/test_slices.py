"""Slice pruning: slice geometry, layer selection, the masking schedule reaching the target sparsity,
masks that survive optimizer steps, group-lasso regularisation that shrinks slices, checkpoints."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.algorithms.slices import SlicePruner, slice_norms


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: threads only contend
    yield
    torch.set_num_threads(n)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 12, 3, padding=1)
        self.c2 = nn.Conv2d(12, 16, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(16, 10)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x)).mean((2, 3))
        return self.head(F.relu(self.fc1(x)))


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def batches(n, seed=1, bs=16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 8, 8, generator=g), torch.randint(0, 4, (bs,), generator=g)) for _ in range(n)]


def n_slices(w, block):
    return -(-w.shape[0] // block) * w[0].numel()


# ---------------------------------------------------------------------------- geometry & selection
def test_slice_is_one_input_position_across_a_block_of_filters():
    w = torch.randn(6, 3, 2, 2)  # 6 filters, block 4: blocks [0..3] and [4..5]
    n = slice_norms(w, 4)
    assert n.shape == (2, 3 * 2 * 2)
    for b, rows in ((0, slice(0, 4)), (1, slice(4, 6))):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    assert n[b, (c * 2 + i) * 2 + j] == pytest.approx(float(w[rows, c, i, j].norm()))
    lin = torch.randn(8, 5)
    assert torch.allclose(slice_norms(lin, 4), torch.stack([lin[:4].norm(dim=0), lin[4:].norm(dim=0)]))


def test_default_layers_skip_first_and_last_and_patterns_select():
    model = net()
    sp = SlicePruner(model)
    assert list(sp.layers) == ["c1", "c2", "fc1"]
    assert list(SlicePruner(model, layers=["c*", model.head]).layers) == ["c1", "c2", "head"]
    with pytest.raises(ValueError, match="matches no conv or linear"):
        SlicePruner(model, layers=["nope*"])
    with pytest.raises(ValueError, match="target_sparsity"):
        SlicePruner(model, target_sparsity=1.0)


def test_masking_one_slice_zeroes_exactly_its_weights():
    model = net()
    sp = SlicePruner(model, layers=["c1"], block=4)
    w0 = model.c1.weight.detach().clone()
    sp.masks["c1"][1, 5] = False  # block 1 = filters 4..7; slice 5 = input channel 0, kernel position (1, 2)
    sp.apply_masks()
    zero = model.c1.weight == 0
    assert zero[4:8, 0, 1, 2].all() and int(zero.sum()) == 4
    assert torch.equal(model.c1.weight[~zero], w0[~zero])


# ---------------------------------------------------------------------------- schedule
def test_schedule_reaches_target_sparsity_within_one_slice():
    model = net()
    sp = SlicePruner(model, block=4, target_sparsity=0.6, start_step=10, end_step=50, every=10, reg=0)
    assert sp.step(0) is False and sp.sparsity()["overall"] == 0.0
    seen = []
    for step in range(0, 61):
        if sp.step(step):
            seen.append(step)
        if step == 30:  # half way: cubic ramp 0.6 * (1 - 0.5^3)
            s = 0.6 * (1 - 0.5 ** 3)
            for name, mod in sp.layers.items():
                n = n_slices(mod.weight, 4)
                assert abs(sp.sparsity()["layers"][name] * n - s * n) <= 1
    assert seen == [10, 20, 30, 40, 50]
    rep = sp.sparsity()
    total = 0
    for name, mod in sp.layers.items():
        n = n_slices(mod.weight, 4)
        total += n
        assert abs(rep["layers"][name] * n - 0.6 * n) <= 1, name  # within one slice of the target
    assert abs(rep["overall"] * total - 0.6 * total) <= len(sp.layers)
    assert model.stem.weight.ne(0).all() and model.head.weight.ne(0).all()  # left dense


def test_masks_take_the_smallest_slices_and_only_grow():
    model = net()
    sp = SlicePruner(model, layers=["fc1"], block=2, reg=0)
    with torch.no_grad():
        model.fc1.weight.mul_(10)
        model.fc1.weight[2:4, 7] = 0.01  # block 1, input column 7: the smallest slice
        model.fc1.weight[6:8, 3] = 0.02  # block 3, column 3: the second smallest
    sp.mask_to(2 / 80)
    assert (~sp.masks["fc1"]).nonzero().tolist() == [[1, 7], [3, 3]]
    with torch.no_grad():
        model.fc1.weight[0:2, 0] = 1e-4  # now smaller than anything, but the masks above stay
    sp.mask_to(3 / 80)
    assert (~sp.masks["fc1"]).nonzero().tolist() == [[0, 0], [1, 7], [3, 3]]


def test_masks_stay_zero_after_optimizer_steps():
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = SlicePruner(model, target_sparsity=0.5, start_step=0, end_step=0, reg=1e-3)
    sp.attach(opt)
    sp.step(0)
    before = sp.sparsity()
    assert before["overall"] == pytest.approx(0.5, abs=0.02)
    masked = {n: m.weight.detach() == 0 for n, m in sp.layers.items()}
    for x, y in batches(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sp.regularize()
        opt.step()
    assert sp.sparsity() == before
    for n, m in sp.layers.items():
        assert (m.weight[masked[n]] == 0).all()
    sp.detach()  # without the hook the optimizer brings the masked weights back
    for x, y in batches(2, seed=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert sp.sparsity()["overall"] < 0.1
    sp.apply_masks()
    assert sp.sparsity() == before


# ---------------------------------------------------------------------------- regularisation
def test_regularization_shrinks_slice_norms():
    def run(reg):
        model = net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sp = SlicePruner(model, reg=reg)
        for x, y in batches(40):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sp.regularize()
            opt.step()
        return {n: slice_norms(m.weight.detach(), 4) for n, m in sp.layers.items()}
    plain, reg = run(0.0), run(0.05)
    for name in plain:
        assert reg[name].mean() < 0.8 * plain[name].mean(), name
        # reweighted: the small half shrinks relatively more than the large half
        p, r = plain[name].flatten().sort().values, reg[name].flatten().sort().values
        half = p.numel() // 2
        assert (r[:half].sum() / p[:half].sum()) < (r[half:].sum() / p[half:].sum()), name


def test_loss_gradient_equals_regularize():
    model = net()
    sp = SlicePruner(model, reg=0.1)
    sp.mask_to(0.25)
    sp.loss().backward()
    from_loss = {n: m.weight.grad.clone() for n, m in sp.layers.items()}
    model.zero_grad(set_to_none=True)
    sp.regularize()
    for n, m in sp.layers.items():
        assert torch.allclose(m.weight.grad, from_loss[n], atol=1e-6), n
        assert m.weight.grad.abs().sum() > 0
        assert (m.weight.grad[m.weight == 0] == 0).all()  # masked slices get no pull
        # per-slice pull reg * 2m / (n + m): twice the average for tiny slices, less for large ones
        keep = sp.masks[n]
        norms = slice_norms(m.weight.detach(), 4)
        mean = norms[keep].mean()
        pull = slice_norms(m.weight.grad, 4)
        assert torch.allclose(pull[keep], 0.1 * 2 * mean / (norms[keep] + mean), rtol=1e-4)
        assert pull[keep].max() > 1.05 * 0.1 > 0.95 * 0.1 > pull[keep].min()


def test_state_dict_round_trip():
    model = net()
    sp = SlicePruner(model, target_sparsity=0.4, start_step=0, end_step=0)
    sp.step(0)
    state = sp.state_dict()
    model2 = net(seed=5)
    sp2 = SlicePruner(model2, target_sparsity=0.4, start_step=0, end_step=0)
    sp2.load_state_dict(state)
    assert sp2.sparsity()["layers"] == pytest.approx(sp.sparsity()["layers"])
    assert sp2.step(5) is False  # the final masking round was already done
    with pytest.raises(ValueError, match="same layers"):
        SlicePruner(net(), layers=["c1"]).load_state_dict(state)
    assert pk.SlicePruner is SlicePruner
