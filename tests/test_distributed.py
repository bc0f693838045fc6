"""torch.distributed on CPU (gloo, 2 spawned ranks): data-parallel calibration, AdaptivePruner candidates spread
over ranks, LearnedPruner / TrainingPruner under DDP and FSDP.  Every worker writes its findings to a file; a
hang fails the test after a timeout instead of blocking CI."""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2
TIMEOUT = 120


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.b1(self.c1(x)))))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batches(n: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g) * (1 + i), torch.randint(0, 4, (4,), generator=g)) for i in range(n)]


def _entry(rank: int, port: int, out_dir: str, name: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = globals()[name](rank, out_dir)
    except BaseException:  # noqa: BLE001 - reported to the parent
        res = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"{name}.{rank}.pkl"), "wb") as f:
        pickle.dump(res, f)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run_ranks(name: str, tmp_path) -> list[dict]:
    """Run ``name(rank, out_dir)`` on WORLD gloo ranks; the results of every rank (fails on error or hang)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, port, str(tmp_path), name)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    out = []
    for r in range(WORLD):
        f = tmp_path / f"{name}.{r}.pkl"
        if not f.exists():
            pytest.fail(f"rank {r} of {name} left no result ({'hung' if hung else 'died'}; exit codes "
                        f"{[p.exitcode for p in procs]})")
        res = pickle.loads(f.read_bytes())
        if "error" in res:
            pytest.fail(f"rank {r} of {name} failed:\n{res['error']}")
        out.append(res)
    return out


def _same_params(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ, BatchNorm running statistics aside (each rank's own, as DDP/FSDP leave them
    after the last forward; SyncBatchNorm shares them)."""
    assert set(a) == set(b)
    return [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
            and not torch.equal(a[k], b[k])]


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---------------------------------------------------------------------------- 1. data-parallel calibration
CRITERIA = ("activation", "wanda_sp", "flap", "taylor", "taylor_act", "hessian")


def _calibration(rank, out_dir):
    import prunekit as pk
    from prunekit.plan.importance import get_criterion

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    g = pk.analyze(model, x)
    data = _batches(4)
    mine = data[rank::WORLD]  # each rank sees half of the batches
    res = {}
    for name in CRITERIA:
        res[name] = {
            "dist": get_criterion(name).scores(model, g, data=mine),
            "local": get_criterion(name, distributed=False).scores(model, g, data=mine),
            "all": get_criterion(name, distributed=False).scores(model, g, data=data),  # one process, all data
        }
    pg = dist.new_group([0, 1])  # an explicit process group (here: both ranks) gives the same merge
    res["group"] = get_criterion("flap", distributed=pg).scores(model, g, data=mine)
    p = pk.Pruner(model, x, "flap", pk.FlopsTarget(0.6), data=mine, global_pruning=True)
    p1 = pk.Pruner(model, x, get_criterion("flap", distributed=False), pk.FlopsTarget(0.6), data=data,
                   global_pruning=True)
    res["plan"], res["plan_all"] = p.plan(), p1.plan()
    return res


def test_calibration_two_ranks_equal_one_process_over_all_data(tmp_path):
    r0, r1 = run_ranks("_calibration", tmp_path)
    for name in CRITERIA:
        d0, d1, all0, loc0 = r0[name]["dist"], r1[name]["dist"], r0[name]["all"], r0[name]["local"]
        assert all(torch.equal(d0[k], d1[k]) for k in d0), name  # bit-identical on every rank
        scale = max(float(v.abs().max()) for v in all0.values())
        assert _max_diff(d0, all0) < 1e-5 * scale, name
        assert _max_diff(loc0, all0) > 1e-2 * scale, name  # the halves differ: a rank alone would score otherwise
    assert r0["plan"] == r1["plan"] == r0["plan_all"]
    assert all(torch.equal(r0["group"][k], r0["flap"]["dist"][k]) for k in r0["group"])


# ---------------------------------------------------------------------------- 2. search spread over ranks
_EVALUATED: list[tuple[int, int]] = []  # (iteration, candidate index) fine-tuned in this process


def finetune(model, iteration, candidate):
    """A short fine-tune whose outcome depends on the candidate's seed (set by the search)."""
    _EVALUATED.append((iteration, candidate.index))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for xb, yb in _batches(2, seed=torch.randint(0, 1000, ()).item()):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def _search(rank, out_dir):
    import prunekit as pk

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def build():
        torch.manual_seed(0)
        return Net().eval()

    def search(distributed, wd):
        model = build()
        ap = pk.AdaptivePruner(model, x, pk.FlopsTarget(0.7), finetune_fn=finetune, workdir=wd, delta_crop=0.1,
                               distributed=distributed)
        ap.run()
        return ap, model

    wd = os.path.join(out_dir, f"wd_rank{rank}")  # a folder per rank: as on machines without a shared disk
    ap, model = search(None, wd)
    res = {"history": [(e["chosen"], e["chosen_name"], e["metric"], [c["metric"] for c in e["candidates"]])
                       for e in ap.history],
           "state": {k: v.clone() for k, v in model.state_dict().items()},
           "wrote": sorted(os.listdir(wd)) if os.path.isdir(wd) else [], "evaluated": list(_EVALUATED)}
    _EVALUATED.clear()
    ap1, model1 = search(False, os.path.join(out_dir, f"serial_rank{rank}"))
    res["serial_history"] = [(e["chosen"], e["chosen_name"], e["metric"], [c["metric"] for c in e["candidates"]])
                             for e in ap1.history]
    res["serial_state"] = model1.state_dict()
    res["serial_evaluated"] = list(_EVALUATED)
    # resume the finished run: rank 0 reads its workdir and sends the result to the others
    ap2 = pk.AdaptivePruner(model2 := build(), x, pk.FlopsTarget(0.7), finetune_fn=finetune, workdir=wd,
                            delta_crop=0.1)
    ap2.run()
    res["resumed_state"] = model2.state_dict()
    res["resumed_iteration"] = ap2.iteration
    return res


def test_search_two_ranks_same_winner_as_one(tmp_path):
    r0, r1 = run_ranks("_search", tmp_path)
    assert r0["history"], r0
    assert r0["history"] == r1["history"] == r0["serial_history"]
    # each candidate was fine-tuned on exactly one rank
    assert sorted(r0["evaluated"] + r1["evaluated"]) == sorted(r0["serial_evaluated"])
    assert r0["evaluated"] and r1["evaluated"] and not set(r0["evaluated"]) & set(r1["evaluated"])
    for r in (r0, r1):
        for k, v in r0["serial_state"].items():
            assert torch.equal(r["state"][k], v), k
            assert torch.equal(r["resumed_state"][k], v), k
    assert r1["resumed_iteration"] == r0["resumed_iteration"] == len(r0["history"])
    assert "state.json" in r0["wrote"] and r1["wrote"] == []  # the workdir is written by rank 0 only


# ---------------------------------------------------------------------------- 3. training-time pruning
def _learned_ddp(rank, out_dir):
    import prunekit as pk

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    lp = pk.LearnedPruner(model, x, pk.FlopsTarget(0.6), num_steps=12)
    lp.prepare()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.02)
    data = _batches(12, seed=100 + rank)  # different data on every rank
    for step, (xb, yb) in enumerate(data):
        out = ddp(xb)
        losses = lp.losses(step)
        loss = F.cross_entropy(out, yb) + losses.flops_loss + losses.entropy_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    logits = {gid: g.logit.detach().clone() for gid, g in lp.gates.items()}
    plan = lp.plan()
    small = lp.finalize()
    return {"logits": logits, "plan": plan, "state": small.state_dict()}


def test_learned_pruner_ddp_identical_gates_and_model(tmp_path):
    r0, r1 = run_ranks("_learned_ddp", tmp_path)
    assert all(torch.equal(r0["logits"][k], r1["logits"][k]) for k in r0["logits"])
    assert r0["plan"] == r1["plan"] and r0["plan"], r0["plan"]
    assert _same_params(r0["state"], r1["state"]) == []
    assert sum(v.numel() for v in r0["state"].values()) < sum(v.numel() for v in Net().state_dict().values())


def _training_ddp_checkpoint(rank, out_dir):
    import prunekit as pk
    from prunekit.algorithms.training import masked_units

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    ddp = nn.parallel.DistributedDataParallel(model)
    data = _batches(3, seed=100 + rank)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    cfg = {"start_epoch": 0, "end_epoch": 2, "target": 0.6, "criterion": "taylor", "global_pruning": True}
    tp = pk.TrainingPruner(ddp, cfg, example_inputs=x, optimizer=opt, data=data)
    path = os.path.join(out_dir, f"ck_rank{rank}.pt")  # a path per rank: only rank 0's may appear
    for epoch in range(3):
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(ddp(xb), yb).backward()
            opt.step()
        tp.step(epoch)
        if not tp.pruned:
            masks = {gid: m.tolist() for gid, m in masked_units(model, tp.graph).items()}
        tp.save_checkpoint(path)
        if tp.pruned:
            ddp = nn.parallel.DistributedDataParallel(tp.module)
    return {"masks": masks, "exists": os.path.exists(path), "state": tp.module.state_dict()}


def test_training_pruner_ddp_checkpoint_written_once(tmp_path):
    r0, r1 = run_ranks("_training_ddp_checkpoint", tmp_path)
    assert r0["exists"] and not r1["exists"]
    assert r0["masks"] == r1["masks"]
    assert _same_params(r0["state"], r1["state"]) == []
    assert sum(v.numel() for v in r0["state"].values()) < sum(v.numel() for v in Net().state_dict().values())


def _learned_fsdp(rank, out_dir):
    import prunekit as pk
    from prunekit.runs.distributed import full_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    lp = pk.LearnedPruner(model, x, pk.FlopsTarget(0.6), num_steps=12)
    lp.prepare()  # gates are hooks on the layers' outputs: they work on the sharded model too
    for m in (model.c1, model.c2, model.fc1):
        fully_shard(m)
    fully_shard(model)
    sharded = type(model.c1.weight).__name__
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    for step, (xb, yb) in enumerate(_batches(12, seed=100 + rank)):
        out = model(xb)
        losses = lp.losses(step)
        loss = F.cross_entropy(out, yb) + losses.flops_loss + losses.entropy_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    plan = lp.plan()
    lp.remove_hooks()
    full = Net()  # the pruned model comes from the gathered (unsharded) weights
    full.load_state_dict(full_state_dict(model))
    pk.prune(full, pk.analyze(full, x), plan)
    return {"sharded": sharded, "plan": plan, "state": full.state_dict(),
            "logits": {gid: g.logit.detach().clone() for gid, g in lp.gates.items()}}


def test_learned_pruner_fsdp2_identical_plan_and_model(tmp_path):
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # FSDP2
    r0, r1 = run_ranks("_learned_fsdp", tmp_path)
    assert r0["sharded"] == "DTensor"
    assert all(torch.equal(r0["logits"][k], r1["logits"][k]) for k in r0["logits"])
    assert r0["plan"] == r1["plan"] and r0["plan"], r0["plan"]
    assert _same_params(r0["state"], r1["state"]) == []
    assert sum(v.numel() for v in r0["state"].values()) < sum(v.numel() for v in Net().state_dict().values())


def _training_fsdp(rank, out_dir):
    import prunekit as pk
    from prunekit.algorithms.training import masked_units
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    data = _batches(3, seed=100 + rank)  # different data on every rank
    cfg = {"start_epoch": 0, "end_epoch": 1, "target": 0.6, "criterion": "taylor", "global_pruning": True}
    tp = pk.TrainingPruner(model, cfg, example_inputs=x, data=data)  # analysed before sharding
    for m in (model.c1, model.c2, model.fc1):
        fully_shard(m)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tp.attach_optimizer(opt)
    masks = []
    for epoch in range(2):
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        tp.step(epoch)
        masks.append({gid: m.tolist() for gid, m in masked_units(model, tp.graph).items()})
    try:
        tp.finalize()
        refused = None
    except ValueError as e:
        refused = str(e)
    small = tp.finalize(into=Net())
    return {"sharded": type(model.c1.weight).__name__, "masks": masks, "refused": refused,
            "state": small.state_dict(), "pruned": tp.pruned}


def test_training_pruner_fsdp2_identical_masks_and_model(tmp_path):
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # FSDP2
    r0, r1 = run_ranks("_training_fsdp", tmp_path)
    assert r0["sharded"] == "DTensor"
    assert r0["masks"] == r1["masks"] and r0["masks"][-1], r0["masks"]
    assert r0["refused"] and "into=" in r0["refused"]
    assert r0["pruned"] and r1["pruned"]
    assert _same_params(r0["state"], r1["state"]) == []
    assert sum(v.numel() for v in r0["state"].values()) < sum(v.numel() for v in Net().state_dict().values())
