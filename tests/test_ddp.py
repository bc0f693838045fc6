"""DistributedDataParallel: two CPU processes (gloo), different data per rank, identical pruning decisions."""
from __future__ import annotations

import json
import os
import socket
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.b1(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import prunekit as pk
        from prunekit.algorithms.training import masked_units
        from prunekit.plan.importance import get_criterion

        torch.manual_seed(0)
        model = Net()
        x = torch.randn(2, 3, 8, 8)
        ddp = nn.parallel.DistributedDataParallel(model)
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        data = [(torch.randn(8, 3, 8, 8, generator=g) * (1 + 3 * rank), torch.randint(0, 4, (8,), generator=g))
                for _ in range(3)]
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        cfg = {"start_epoch": 0, "end_epoch": 1, "target": 0.6, "criterion": "taylor", "global_pruning": True,
               "regularization": {"type": "channel", "strength": 1e-3}}
        tp = pk.TrainingPruner(ddp, cfg, example_inputs=x, optimizer=opt, data=data)
        # the data-driven scores really differ per rank: without averaging/broadcast the masks could differ
        local = get_criterion("taylor", distributed=False).scores(model, tp.graph, data=data)  # this rank only
        loc_all = [None] * WORLD
        dist.all_gather_object(loc_all, {k: v.tolist() for k, v in local.items()})
        result = {"local_scores_differ": loc_all[0] != loc_all[1]}
        for xb, yb in data:
            opt.zero_grad()
            F.cross_entropy(ddp(xb), yb).backward()
            tp.regularize()
            opt.step()
        tp.step(0)
        masks = {gid: m.tolist() for gid, m in masked_units(model, tp.graph).items()}
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        all_masks = [None] * WORLD
        dist.all_gather_object(all_masks, masks)
        all_w = [None] * WORLD
        dist.all_gather_object(all_w, weights)
        tp.step(1)  # physical removal
        shapes = {n: list(p.shape) for n, p in tp.module.named_parameters()}
        all_shapes = [None] * WORLD
        dist.all_gather_object(all_shapes, shapes)
        ddp2 = nn.parallel.DistributedDataParallel(tp.module)  # re-wrap the smaller model and train on
        for xb, yb in data[:1]:
            opt.zero_grad()
            F.cross_entropy(ddp2(xb), yb).backward()
            opt.step()
        if rank == 0:
            result.update({
                "n_masked": sum(sum(m) for m in masks.values()),
                "masks_equal": all_masks[0] == all_masks[1],
                "weights_equal": all(torch.equal(all_w[0][n], all_w[1][n]) for n in all_w[0]),
                "shapes_equal": all_shapes[0] == all_shapes[1],
                "shrunk": shapes != {n: list(p.shape) for n, p in Net().named_parameters()},
                "pruned": tp.pruned,
            })
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_identical_masks_and_shapes(tmp_path):
    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as e:
        # rank 0 writes result.json only after every collective has completed; a worker killed by a signal
        # after that (seen rarely on a loaded 2-core machine, inside gloo's teardown) is not a pruning failure
        if not (tmp_path / "result.json").exists() or e.exit_code is None or e.exit_code >= 0:
            raise
        warnings.warn(f"a DDP worker died in teardown after finishing: {e}")
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["local_scores_differ"], res  # the test is meaningful: ranks see different statistics
    assert res["n_masked"] > 0 and res["pruned"] and res["shrunk"], res
    assert res["masks_equal"], res
    assert res["weights_equal"], res
    assert res["shapes_equal"], res
