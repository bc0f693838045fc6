#!/usr/bin/env python
"""Accuracy after structured pruning on Fashion-MNIST: prunekit criteria, schedules and algorithms vs Torch-Pruning.

For each model (a small ResNet and a MobileNetV2-style net, defined below, 1x28x28 input) a baseline is trained
once (seed 0) and cached in ``benchmarks/cache/``.  Then, for each FLOPs target (keep 50 % / 30 % of the MACs),
every method in :data:`METHODS` starts from a copy of that baseline, prunes, and is fine-tuned with the same
number of SGD steps (the same batches, in the same order).  A row records: accuracy right after pruning and after
fine-tuning (test set), MACs and parameters (``pk.count``, the same counter for every row), CPU latency
(``pk.latency``, 1 thread, batch 1 and 64, median ms) and wall time.

Methods (adding one is one entry in ``METHODS``):

* ``pk:<criterion>``: one-shot ``pk.Pruner(model, x, criterion, pk.FlopsTarget(r))`` for every criterion in
  ``prunekit.plan.importance.CRITERIA``; data criteria get ``--calib-batches`` training batches and the default
  cross-entropy loss.
* ``tp:<criterion>``: Torch-Pruning's ``BasePruner`` (= ``MetaPruner``) with the matching importance, the final
  ``fc`` ignored, same ``global_pruning`` and ``round_to``.  Torch-Pruning prunes by channel ratio, so the
  ``pruning_ratio`` that meets the MACs target is found by bisection (on deep copies, counted with
  ``tp.utils.count_ops_and_params``: the first ratio of a 0.05 grid that meets the target, then 8 bisection steps
  below it, since TP's MACs are not monotone in the ratio near 1; with local pruning the MACs do not depend on the
  importance, so the search uses magnitude importance, with global pruning the real one), then the baseline is
  pruned once.
* ``pk-sched:linear|agp|lottery``: ``pk.prune_iteratively`` with l2 and ``pk.Linear/AGP/LotteryTicket(steps)``;
  the fine-tune budget is split over the steps.  "acc pruned" is measured right after the last pruning step (for
  the lottery ticket: after rewinding, i.e. the baseline weights of the surviving units).
* ``pk:learned`` / ``pk:training-reg`` / ``pk:adaptive``: ``pk.LearnedPruning``, ``pk.TrainingPruner`` with group
  lasso, ``pk.AdaptivePruner`` (NetAdapt); included when the installed prunekit has them (a TODO row otherwise).
* ``dense+ft``: the unpruned baseline fine-tuned with the same budget (a control for the extra training).

    /work/venv/bin/python benchmarks/quality_fmnist.py            # full run
    /work/venv/bin/python benchmarks/quality_fmnist.py --quick    # a few minutes, fewer methods, smaller budget
    /work/venv/bin/python benchmarks/quality_fmnist.py --resume   # keep the rows already in the JSON

Data: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``), read here from
the idx files; nothing is downloaded.  Training and evaluation run on ``--device`` (default: CUDA when available,
else CPU); pruning, counting and latency always run on the CPU.
"""
from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import logging
import math
import os
import platform
import struct
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import git_state  # noqa: E402

import prunekit as pk  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_PACKAGE = "dataset-fashion-mnist"
CACHE_DIR = HERE / "cache"
OUT = HERE / "results" / "quality_fmnist"
MEAN, STD = 0.2860, 0.3530
FILES = {"xtr": "train-images-idx3-ubyte.gz", "ytr": "train-labels-idx1-ubyte.gz",
         "xte": "t10k-images-idx3-ubyte.gz", "yte": "t10k-labels-idx1-ubyte.gz"}

log = logging.getLogger("quality_fmnist")


# ============================================================================ data
class DatasetMissing(RuntimeError):
    """The Fashion-MNIST idx files are not installed."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = struct.unpack(">I", raw[:4])[0]
    if magic >> 8 != 0x08:  # 0x0000 08 nd: unsigned bytes
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {magic:#x})")
    nd = magic & 0xFF
    dims = struct.unpack(f">{nd}I", raw[4:4 + 4 * nd])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)


def dataset_available(root: Path = DATA_DIR) -> bool:
    return all((Path(root) / f).is_file() for f in FILES.values())


@dataclass
class Data:
    """Normalised tensors on CPU: train (minus a held-out validation split), validation, test."""

    xtr: torch.Tensor
    ytr: torch.Tensor
    xval: torch.Tensor
    yval: torch.Tensor
    xte: torch.Tensor
    yte: torch.Tensor

    def to(self, device: str) -> "Data":
        return Data(*(t.to(device) for t in (self.xtr, self.ytr, self.xval, self.yval, self.xte, self.yte)))


def load_fmnist(root: Path = DATA_DIR, *, val: int = 2000, train_limit: int | None = None,
                test_limit: int | None = None) -> Data:
    """Fashion-MNIST from the idx files of the Debian package; the last ``val`` training images are held out."""
    root = Path(root)
    missing = [f for f in FILES.values() if not (root / f).is_file()]
    if missing:
        raise DatasetMissing(f"Fashion-MNIST not found: {', '.join(str(root / f) for f in missing)} missing. Install "
                             f"the Debian package {DATA_PACKAGE} (apt-get install -y {DATA_PACKAGE}) or pass --data-dir")
    arr = {k: _read_idx(root / f) for k, f in FILES.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(a.copy()).float() / 255.0 - MEAN) / STD).unsqueeze(1)

    xtr, ytr = images(arr["xtr"]), torch.from_numpy(arr["ytr"].astype(np.int64))
    xte, yte = images(arr["xte"]), torch.from_numpy(arr["yte"].astype(np.int64))
    xval, yval = xtr[-val:], ytr[-val:]
    xtr, ytr = xtr[:-val], ytr[:-val]
    if train_limit:
        xtr, ytr = xtr[:train_limit], ytr[:train_limit]
    if test_limit:
        xte, yte = xte[:test_limit], yte[:test_limit]
    return Data(xtr, ytr, xval, yval, xte, yte)


# ============================================================================ models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class SmallResNet(nn.Module):
    """Stem 3x3 conv (stride 2: 14x14), three stages of two BasicBlocks (7x7, 4x4, 2x2), GAP, FC."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), stem: int = 32, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        stages, cin = [], stem
        for w in widths:
            stages.append(nn.Sequential(BasicBlock(cin, w, 2), BasicBlock(w, w, 1)))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, stride: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res else out


class SmallMobileNetV2(nn.Module):
    """MobileNetV2-style: stem 3x3 conv (stride 2), inverted residuals (expansion 4-6, depthwise 3x3), 1x1 head."""

    CFG = ((1, 16, 1, 1), (4, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1), (6, 96, 1, 1))  # expand, width, n, stride

    def __init__(self, width_mult: float = 1.0, head: int = 256, num_classes: int = 10):
        super().__init__()
        c = lambda w: max(4, int(round(w * width_mult)))  # noqa: E731
        stem = c(16)
        self.stem = nn.Sequential(nn.Conv2d(1, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())
        blocks, cin = [], stem
        for t, w, n, s in self.CFG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, c(w), t, s if i == 0 else 1))
                cin = c(w)
        self.features = nn.Sequential(*blocks)
        head = c(head)
        self.head = nn.Sequential(nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6())
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self.head(self.features(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet": SmallResNet, "mobilenetv2": SmallMobileNetV2}


# ============================================================================ training
@dataclass
class Budget:
    """Everything that decides the numbers (part of the results header and of the baseline cache key)."""

    base_steps: int = 700           # baseline training (SGD, cosine), ~1.5 epochs of 58k at batch 128
    base_lr: float = 0.1
    batch: int = 128
    ft_steps: int = 80              # fine-tune budget of EVERY method (SGD steps of `batch`)
    ft_lr: float = 0.01
    weight_decay: float = 5e-4
    calib_batches: int = 4          # batches of 64 training images for data-driven criteria
    sched_steps: int = 3            # pruning steps of the schedules (ft_steps split over them)
    adapt_short_steps: int = 5      # NetAdapt: fine-tune steps per candidate (search cost, outside the budget)
    adapt_delta: float = 0.125      # NetAdapt: fraction of the original MACs removed per iteration
    adapt_val: int = 500            # NetAdapt: validation images per candidate evaluation
    lat_repeats: int = 15
    seed: int = 0


def train(model: nn.Module, data: Data, steps: int, *, lr: float, budget: Budget, seed: int, device: str,
          params: list | None = None, extra_loss: Callable[[int], torch.Tensor | None] | None = None,
          after_backward: Callable[[int], None] | None = None, on_step_end: Callable[[int, Any], None] | None = None,
          setup: Callable[[Any], None] | None = None) -> nn.Module:
    """``steps`` SGD steps (momentum 0.9, nesterov, cosine to 0) on random training batches drawn with ``seed``;
    the model is moved to ``device`` for training and back to the CPU afterwards."""
    if steps <= 0:
        return model
    model.to(device).train()
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                          weight_decay=budget.weight_decay)
    if setup is not None:
        setup(opt)
    gen = torch.Generator().manual_seed(seed)
    n = data.xtr.shape[0]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, n, (budget.batch,), generator=gen).to(data.xtr.device)
        x, y = data.xtr[idx], data.ytr[idx]
        flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss = F.cross_entropy(model(x), y)
        if extra_loss is not None:
            extra = extra_loss(step)
            if extra is not None:
                loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        opt.step()
        if on_step_end is not None:
            on_step_end(step, opt)
    model.cpu()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: str, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode (the model is moved to ``device`` and back to the CPU)."""
    was = model.training
    model.to(device).eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.cpu().train(was)
    return correct / max(1, x.shape[0])


def baseline(name: str, data: Data, budget: Budget, device: str, cache: Path | None = CACHE_DIR,
             build: Callable[[], nn.Module] | None = None) -> tuple[nn.Module, dict]:
    """The trained baseline (cached under ``cache`` keyed by model, training budget and data size)."""
    build = build or MODELS[name]
    key = {"model": name, "steps": budget.base_steps, "lr": budget.base_lr, "batch": budget.batch,
           "wd": budget.weight_decay, "seed": budget.seed, "n_train": int(data.xtr.shape[0]),
           "arch": repr(build())}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"fmnist_{name}_{digest}.pt" if cache is not None else None
    torch.manual_seed(budget.seed)
    model = build()
    if path is not None and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state"])
        log.info("%s: baseline loaded from %s", name, path)
        return model.eval(), dict(blob["info"], cached=True)
    t0 = time.perf_counter()
    log.info("%s: training the baseline (%d steps on %s)", name, budget.base_steps, device)
    train(model, data, budget.base_steps, lr=budget.base_lr, budget=budget, seed=budget.seed, device=device)
    info = {"train_seconds": round(time.perf_counter() - t0, 1), "train_device": device, "key": key,
            "cache_file": path.name if path is not None else None}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state": model.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)
    return model.eval(), dict(info, cached=False)


# ============================================================================ methods
@dataclass
class Ctx:
    """What a method needs: the model's name, the FLOPs target (fraction of MACs KEPT), data, budget, settings."""

    model_name: str
    keep: float
    data: Data
    budget: Budget
    device: str
    global_pruning: bool
    round_to: int
    example: torch.Tensor = field(default_factory=lambda: torch.randn(1, 1, 28, 28,
                                                                      generator=torch.Generator().manual_seed(0)))

    @property
    def calib(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed CPU batches (64 training images each) for data-driven criteria, the same for every method."""
        n = self.budget.calib_batches
        x, y = self.data.xtr[:64 * n].cpu(), self.data.ytr[:64 * n].cpu()
        return [(x[i:i + 64], y[i:i + 64]) for i in range(0, 64 * n, 64)]

    def finetune(self, model: nn.Module, steps: int, seed_offset: int = 0, **kw) -> nn.Module:
        return train(model, self.data, steps, lr=self.budget.ft_lr, budget=self.budget,
                     seed=self.budget.seed + 1 + seed_offset, device=self.device, **kw)

    def acc(self, model: nn.Module) -> float:
        return accuracy(model, self.data.xte, self.data.yte, self.device)

    def val_acc(self, model: nn.Module) -> float:
        n = self.budget.adapt_val
        return accuracy(model, self.data.xval[:n], self.data.yval[:n], self.device)


@dataclass
class Outcome:
    model: nn.Module
    acc_pruned: float | None
    ft_steps: int
    notes: dict = field(default_factory=dict)


@dataclass
class Method:
    """One row per (model, target): ``run(ctx, baseline_copy) -> Outcome``; ``missing()`` names what is absent."""

    name: str
    side: str                      # "prunekit" | "Torch-Pruning" | "control"
    criterion: str | None          # the criterion compared across libraries, if any
    run: Callable[[Ctx, nn.Module], Outcome]
    missing: Callable[[], str | None] = lambda: None
    quick: bool = False            # part of --quick


def _oneshot(prune_fn: Callable[[Ctx, nn.Module], tuple[nn.Module, dict]]) -> Callable[[Ctx, nn.Module], Outcome]:
    """Prune (CPU), measure, fine-tune the whole budget."""
    def run(ctx: Ctx, model: nn.Module) -> Outcome:
        model.eval()
        model, notes = prune_fn(ctx, model)
        acc_p = ctx.acc(model)
        ctx.finetune(model, ctx.budget.ft_steps)
        return Outcome(model, acc_p, ctx.budget.ft_steps, notes)
    return run


def pk_oneshot(criterion: str) -> Callable[[Ctx, nn.Module], Outcome]:
    def prune(ctx: Ctx, model: nn.Module) -> tuple[nn.Module, dict]:
        crit = pk.importance.get_criterion(criterion)
        data = ctx.calib if crit.needs_data else None
        pruner = pk.Pruner(model, ctx.example, crit, pk.FlopsTarget(ctx.keep), global_pruning=ctx.global_pruning,
                           round_to=ctx.round_to, data=data)
        return pruner.prune(), {}
    return _oneshot(prune)


# ---------------------------------------------------------------------------- Torch-Pruning
TP_IMPORTANCE: dict[str, Callable[[Any], Any]] = {
    "l1": lambda tp: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda tp: tp.importance.GroupMagnitudeImportance(p=2),
    "fpgm": lambda tp: tp.importance.FPGMImportance(p=2),
    "taylor": lambda tp: tp.importance.GroupTaylorImportance(),
    "bn_scale": lambda tp: tp.importance.BNScaleImportance(),
    "lamp": lambda tp: tp.importance.LAMPImportance(p=2),
    "random": lambda tp: tp.importance.RandomImportance(),
    "hessian": lambda tp: tp.importance.GroupHessianImportance(),
}


def _tp_missing() -> str | None:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return "torch-pruning is not installed (pip install torch-pruning)"
    return None


def _tp_gradients(tp, model: nn.Module, imp: Any, calib: list) -> None:
    """What Torch-Pruning's data importances need before ``step()``: accumulated gradients (Taylor) or per-sample
    gradients fed to the scorer (Hessian), on the same batches prunekit's criteria get (model in eval mode)."""
    if isinstance(imp, tp.importance.GroupHessianImportance):
        imp.zero_grad()
        for x, y in calib:
            losses = F.cross_entropy(model(x), y, reduction="none")
            for i, loss in enumerate(losses):
                model.zero_grad()
                loss.backward(retain_graph=i < len(losses) - 1)
                imp.accumulate_grad(model)
    elif isinstance(imp, tp.importance.GroupTaylorImportance):
        model.zero_grad()
        for x, y in calib:
            F.cross_entropy(model(x), y).backward()


def tp_oneshot(criterion: str) -> Callable[[Ctx, nn.Module], Outcome]:
    def prune(ctx: Ctx, model: nn.Module) -> tuple[nn.Module, dict]:
        import torch_pruning as tp
        ex = ctx.example

        def prune_at(m: nn.Module, ratio: float, real_importance: bool) -> nn.Module:
            imp = TP_IMPORTANCE[criterion](tp) if real_importance else tp.importance.GroupMagnitudeImportance(p=2)
            if real_importance:
                _tp_gradients(tp, m, imp, ctx.calib)
            torch.manual_seed(ctx.budget.seed)  # RandomImportance
            pruner = tp.pruner.BasePruner(m, ex, importance=imp, pruning_ratio=ratio,
                                          global_pruning=ctx.global_pruning, ignored_layers=[m.fc],
                                          round_to=ctx.round_to if ctx.round_to > 1 else None)
            pruner.step()
            m.zero_grad(set_to_none=True)
            return m

        base_macs = tp.utils.count_ops_and_params(model, ex)[0]
        goal = ctx.keep * base_macs

        def macs_at(ratio: float) -> float:
            return tp.utils.count_ops_and_params(prune_at(copy.deepcopy(model), ratio, ctx.global_pruning), ex)[0]

        # TP's MACs are not monotone in pruning_ratio near 1 (with round_to, a group that would be emptied is
        # skipped), so: the first ratio of a coarse ascending grid that meets the goal, then bisection below it
        lo, hi = 0.0, None
        for r in [k / 20 for k in range(1, 20)]:
            if macs_at(r) <= goal:
                hi = r
                break
            lo = r
        if hi is None:
            raise ValueError(f"Torch-Pruning cannot reach {ctx.keep:.0%} of the MACs with pruning_ratio <= 0.95")
        for _ in range(8):  # to 0.05 / 256 ~ 2e-4
            mid = (lo + hi) / 2
            if macs_at(mid) <= goal:
                hi = mid
            else:
                lo = mid
        prune_at(model, hi, True)
        return model, {"tp_pruning_ratio": round(hi, 5), "tp_macs_ratio": round(
            tp.utils.count_ops_and_params(model, ex)[0] / base_macs, 5)}
    return _oneshot(prune)


# ---------------------------------------------------------------------------- schedules
def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def pk_schedule(make: Callable[[int], Any]) -> Callable[[Ctx, nn.Module], Outcome]:
    def run(ctx: Ctx, model: nn.Module) -> Outcome:
        model.eval()
        n = ctx.budget.sched_steps
        schedule = make(n)
        pruner = pk.Pruner(model, ctx.example, "l2", pk.FlopsTarget(ctx.keep), global_pruning=ctx.global_pruning,
                           round_to=ctx.round_to)
        per = _split(ctx.budget.ft_steps, n)
        seen: dict[str, float] = {}

        def finetune(m: nn.Module, t: int) -> None:
            if t == n:
                seen["acc_pruned"] = ctx.acc(m)
            ctx.finetune(m, per[t - 1], seed_offset=100 * (t - 1))
            m.eval()

        model, hist = pk.prune_iteratively(pruner, schedule, finetune, None, progress=False, seed=ctx.budget.seed)
        return Outcome(model, seen.get("acc_pruned"), sum(per),
                       {"schedule": repr(schedule), "macs_ratio_per_step": [round(h["macs_ratio"], 4) for h in hist],
                        "ft_steps_per_step": per})
    return run


# ---------------------------------------------------------------------------- algorithms in flux
def _has(*names: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        absent = [n for n in names if not hasattr(pk, n)]
        return f"TODO: prunekit {pk.__version__} at {git_state()} has no pk.{', pk.'.join(absent)}" if absent else None
    return missing


def _remove_then_finetune(ctx: Ctx, model: nn.Module, remove: Callable[[], Any], used: int) -> tuple[float, int]:
    """Physical removal (on the training device), accuracy right after it, then the rest of the budget."""
    model.to(ctx.device)
    remove()
    model.cpu()
    acc_p = ctx.acc(model)
    rest = ctx.budget.ft_steps - used
    ctx.finetune(model, rest, seed_offset=7)
    return acc_p, rest


LEARNED_GATE_LR = 0.1         # Adam on the gate logits (the FLOPs gradient per unit is tiny: SGD would not move them)
LEARNED_ENTROPY_WEIGHT = 1.0  # library default 0.1 leaves gates undecided (hard model at 100% MACs) in ~60 steps
LEARNED_GATE_FRACTION = 0.75  # of the fine-tune budget spent training weights + gates; the rest after removal


def pk_learned(ctx: Ctx, model: nn.Module) -> Outcome:
    """Weights and gates trained with the task loss + FLOPs/entropy losses for 3/4 of the budget, then removal and
    fine-tuning for the rest.  The gate settings are this benchmark's (chosen on a random-data probe so that the
    hard gates reach the target within ~60 steps), not tuned per model."""
    gate_steps = int(ctx.budget.ft_steps * LEARNED_GATE_FRACTION)
    dev = ctx.device
    model.to(dev).train()
    lp = pk.LearnedPruning(model, ctx.example.to(dev), ctx.keep, gate_steps, entropy_weight=LEARNED_ENTROPY_WEIGHT,
                           seed=ctx.budget.seed)
    lp.prepare()
    gate_opt = torch.optim.Adam(lp.parameters(), lr=LEARNED_GATE_LR)

    def gate_step(step: int, opt: Any) -> None:
        gate_opt.step()
        gate_opt.zero_grad(set_to_none=True)

    ctx.finetune(model, gate_steps, extra_loss=lambda step: sum(lp.losses(step)[1:]), on_step_end=gate_step)
    acc_p, rest = _remove_then_finetune(ctx, model, lp.finalize, gate_steps)
    return Outcome(model, acc_p, gate_steps + rest, {"reached_macs_ratio": round(float(lp.reached), 4),
                                                      "gate_steps": gate_steps, "ft_after_removal": rest})


def pk_training_reg(ctx: Ctx, model: nn.Module) -> Outcome:
    """``pk.TrainingPruner``: group-lasso regularisation and a linear masking schedule over the first half of the
    budget (3 "epochs"), physical removal, then plain fine-tuning for the other half."""
    epochs, half = 3, ctx.budget.ft_steps // 2
    per = _split(half, epochs)
    bounds = np.cumsum(per).tolist()
    dev = ctx.device
    model.to(dev)
    cfg = {"start_epoch": 0, "end_epoch": epochs - 1, "mac_target": ctx.keep, "criterion": "l2",
           "global_pruning": ctx.global_pruning, "block_size": ctx.round_to,
           "regularization": {"type": "group_lasso", "strength": 1e-4}}
    tpr = pk.TrainingPruner(model, cfg, example_inputs=ctx.example.to(dev))

    def end(step: int, opt: Any) -> None:
        if step + 1 in bounds:
            tpr.step(bounds.index(step + 1), opt)

    ctx.finetune(model, half, setup=tpr.attach_optimizer, after_backward=lambda s: tpr.regularize(), on_step_end=end)
    acc_p, rest = _remove_then_finetune(ctx, model, tpr.finalize, half)  # finalize: a no-op once removed
    return Outcome(model, acc_p, half + rest, {"config": cfg, "reg_steps": half, "ft_after_removal": rest})


def pk_adaptive(ctx: Ctx, model: nn.Module) -> Outcome:
    """NetAdapt (``pk.AdaptivePruner``, FLOPs budget): each candidate is fine-tuned ``adapt_short_steps`` steps and
    scored on held-out training images (search cost, outside the budget); the result gets the full budget."""
    b = ctx.budget

    def short(m: nn.Module, it: int, cand: Any) -> None:
        ctx.finetune(m, b.adapt_short_steps, seed_offset=1000 + it)

    model.eval()
    ap = pk.AdaptivePruner(model, ctx.example, ("flops", ctx.keep), finetune_fn=short, eval_fn=ctx.val_acc,
                           criterion="l2", round_to=ctx.round_to, delta_crop=b.adapt_delta, granularity="block",
                           block_depth=2,
                           short_finetune_steps=b.adapt_short_steps, seed=b.seed)
    model = ap.run()
    model.cpu()
    acc_p = ctx.acc(model)
    ctx.finetune(model, b.ft_steps)
    cands = sum(len(h.get("candidates", [])) for h in ap.history) if ap.history else None
    return Outcome(model, acc_p, b.ft_steps, {"iterations": len(ap.history), "candidates_evaluated": cands,
                                              "search_ft_steps": (cands or 0) * b.adapt_short_steps})


def dense_finetune(ctx: Ctx, model: nn.Module) -> Outcome:
    acc = ctx.acc(model)
    ctx.finetune(model, ctx.budget.ft_steps)
    return Outcome(model, acc, ctx.budget.ft_steps)


QUICK_CRITERIA = ("l2", "taylor")
METHODS: list[Method] = [Method("dense+ft", "control", None, dense_finetune, quick=True)]
METHODS += [Method(f"pk:{c}", "prunekit", c, pk_oneshot(c), quick=c in QUICK_CRITERIA)
            for c in pk.importance.CRITERIA]
METHODS += [Method(f"tp:{c}", "Torch-Pruning", c, tp_oneshot(c), _tp_missing, quick=c in QUICK_CRITERIA)
            for c in TP_IMPORTANCE]
METHODS += [
    Method("pk-sched:linear", "prunekit", None, pk_schedule(lambda n: pk.Linear(n)), quick=True),
    Method("pk-sched:agp", "prunekit", None, pk_schedule(lambda n: pk.AGP(n))),
    Method("pk-sched:lottery", "prunekit", None, pk_schedule(lambda n: pk.LotteryTicket(n, rewind="init"))),
    Method("pk:learned", "prunekit", None, pk_learned, _has("LearnedPruning")),
    Method("pk:training-reg", "prunekit", None, pk_training_reg, _has("TrainingPruner")),
    Method("pk:adaptive", "prunekit", None, pk_adaptive, _has("AdaptivePruner")),
]


# ============================================================================ one row
def measure(model: nn.Module, ctx: Ctx) -> dict:
    """MACs/params (pk.count) and CPU latency (pk.latency, 1 thread, batch 1 and 64, median ms)."""
    model.cpu().eval()
    st = pk.count(model, ctx.example)
    lat = pk.latency(model, ctx.example, batch_sizes=[1, 64], threads=1, warmup=3, repeats=ctx.budget.lat_repeats)
    return {"macs": int(st.macs), "params": int(st.params), "lat_b1_ms": round(lat[1].median_ms, 4),
            "lat_b64_ms": round(lat[64].median_ms, 3)}


def run_row(method: Method, ctx: Ctx, base: nn.Module, base_row: dict) -> dict:
    row = {"model": ctx.model_name, "target": ctx.keep, "method": method.name, "side": method.side,
           "criterion": method.criterion, "acc_baseline": base_row["acc_finetuned"]}
    why = method.missing()
    if why:
        return dict(row, status="todo", note=why)
    torch.manual_seed(ctx.budget.seed)
    t0 = time.perf_counter()
    try:
        out = method.run(ctx, copy.deepcopy(base))
        acc_ft = ctx.acc(out.model)
        wall = time.perf_counter() - t0
        row.update(status="ok", acc_pruned=out.acc_pruned, acc_finetuned=acc_ft, ft_steps=out.ft_steps,
                   wall_s=round(wall, 2), notes=out.notes, **measure(out.model, ctx))
        row["macs_ratio"] = round(row["macs"] / base_row["macs"], 5)
        row["params_ratio"] = round(row["params"] / base_row["params"], 5)
        if method.side != "control":
            row["meets_target"] = bool(row["macs"] <= ctx.keep * base_row["macs"] * (1 + 1e-9))
    except Exception as e:  # a failing method is a result, not a crash of the benchmark
        log.exception("%s %s %.2f failed", ctx.model_name, method.name, ctx.keep)
        row.update(status="error", note=f"{type(e).__name__}: {str(e)[:300]}",
                   wall_s=round(time.perf_counter() - t0, 2))
    return row


# ============================================================================ output
def provenance(args: argparse.Namespace, device: str) -> dict:
    try:
        import torch_pruning as tp
        tpv = tp.__version__
    except ImportError:
        tpv = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git": git_state(), "prunekit": pk.__version__,
            "torch": torch.__version__, "torch_pruning": tpv, "python": platform.python_version(),
            "machine": f"{cpu}, {os.cpu_count()} CPUs", "torch_threads": torch.get_num_threads(),
            "train_device": device, "gpu": gpu,
            "command": "python benchmarks/quality_fmnist.py " + " ".join(sys.argv[1:])}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _fmt_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"| {r['method']} | {r['side']} | {r.get('status')}: {r.get('note', '')} |  |  |  |  |  |  |  |"
    delta = r["acc_finetuned"] - r["acc_baseline"]
    flag = " (over target)" if r.get("meets_target") is False and r.get("side") != "control" else ""
    return (f"| {r['method']} | {r['side']} | {_pct(r['acc_pruned'])} | {_pct(r['acc_finetuned'])} | {100 * delta:+.2f} "
            f"| {r['macs'] / 1e6:.3f} ({100 * r['macs_ratio']:.1f}%){flag} | {r['params'] / 1e3:.1f} "
            f"({100 * r['params_ratio']:.1f}%) | {r['lat_b1_ms']:.3f} | {r['lat_b64_ms']:.2f} | {r['wall_s']:.1f} |")


def comparison(rows: list[dict]) -> tuple[list[str], dict]:
    """prunekit vs Torch-Pruning per criterion: fine-tuned (and pruned) accuracy, pk / TP, per model and target."""
    ok = {(r["model"], r["target"], r["method"]): r for r in rows if r.get("status") == "ok"}
    cols = sorted({(r["model"], r["target"]) for r in rows if r["method"] != "baseline"},
                  key=lambda c: (list(MODELS).index(c[0]) if c[0] in MODELS else 99, -c[1]))
    crits = [c for c in pk.importance.CRITERIA]
    def kept(m: str, t: float, side: str) -> str:
        r = next((r for (mm, tt, name), r in ok.items() if (mm, tt) == (m, t) and name.startswith(side)), None)
        return f"{100 * r['macs_ratio']:.1f}%" if r else "-"

    head = "| criterion | " + " | ".join(f"{m} {int(round(100 * t))}% FLOPs (MACs kept: pk {kept(m, t, 'pk:')}, TP "
                                        f"{kept(m, t, 'tp:')})" for m, t in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    wins = ties = losses = 0
    for c in crits:
        cells = []
        for m, t in cols:
            a, b = ok.get((m, t, f"pk:{c}")), ok.get((m, t, f"tp:{c}"))
            if a is None and b is None:
                cells.append("-")
                continue
            fa = _pct(a["acc_finetuned"]) if a else "-"
            fb = _pct(b["acc_finetuned"]) if b else ("n/a" if c not in TP_IMPORTANCE else "-")
            pa = _pct(a["acc_pruned"]) if a else "-"
            pb = _pct(b["acc_pruned"]) if b else "-"
            if a and b:
                d = a["acc_finetuned"] - b["acc_finetuned"]
                if abs(d) < 0.001:
                    ties += 1
                elif d > 0:
                    wins += 1
                    fa = f"**{fa}**"
                else:
                    losses += 1
                    fb = f"**{fb}**"
            cells.append(f"{fa} / {fb} ({pa} / {pb})")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines, {"prunekit_better": wins, "ties": ties, "tp_better": losses}


def write_outputs(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    summary_lines, summary = comparison(rows)
    payload = {"meta": meta, "summary": summary, "rows": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, out.with_suffix(".json"))
    b = meta["budget"]
    md = [f"# Pruning quality on Fashion-MNIST{' (quick run)' if meta.get('quick') else ''}", "",
          f"Generated {meta['date']} by `{meta['command']}` (git {meta['git']}); prunekit {meta['prunekit']}, "
          f"torch {meta['torch']}, torch-pruning {meta['torch_pruning']}, Python {meta['python']}; "
          f"{meta['machine']}; training/evaluation on `{meta['train_device']}`"
          + (f" ({meta['gpu']})" if meta.get("gpu") else "") + f"; total wall time {meta.get('wall_s', '?')} s"
          + (f" ({meta['wall_note']})" if meta.get("wall_note") else "") + ".", "",
          f"Budget: baseline {b['base_steps']} SGD steps (lr {b['base_lr']}, cosine, batch {b['batch']}, seed "
          f"{b['seed']}, cached); **every method gets the same fine-tune budget: {b['ft_steps']} SGD steps** (batch "
          f"{b['batch']}, lr {b['ft_lr']}, cosine, the same batches); schedules split it over {b['sched_steps']} pruning "
          f"steps. Data criteria (both libraries) get {b['calib_batches']} batches of 64 training images, "
          f"cross-entropy, model in eval mode. Test set: {meta['n_test']} images; train {meta['n_train']} "
          f"(2000 held out for NetAdapt's candidate evaluation).", "",
          f"Pruning: FLOPs target = fraction of the baseline MACs KEPT; global_pruning={meta['global_pruning']} "
          f"(the same for both libraries), round_to={meta['round_to']}, the final fc's outputs never pruned. "
          "Torch-Pruning reaches the target with the smallest pruning_ratio that meets it on "
          "`tp.utils.count_ops_and_params` (0.05 grid, then bisection). MACs/params: `pk.count` for every row; "
          f"latency: `pk.latency` on the CPU, 1 thread, median of {b['lat_repeats']} runs (ms per forward of batch 1 / "
          "64; on a shared machine the batch-1 figures are noisy). \"acc pruned\" = right after pruning (for "
          "schedules: after the last step, before its fine-tuning chunk); accuracies in %.", ""]
    for name in MODELS:
        base = next((r for r in rows if r["model"] == name and r["method"] == "baseline"), None)
        if base is None:
            continue
        md.append(f"## {name}: baseline {_pct(base['acc_finetuned'])}% top-1, {base['macs'] / 1e6:.3f} M MACs, "
                  f"{base['params'] / 1e3:.1f} k params, latency {base['lat_b1_ms']:.3f} / {base['lat_b64_ms']:.2f} ms")
        md.append("")
        for keep in sorted({r["target"] for r in rows if r["model"] == name and r["method"] != "baseline"},
                           reverse=True):
            md += [f"### {name}, keep {int(round(100 * keep))}% of FLOPs", "",
                   "| method | side | acc pruned | acc fine-tuned | Δ vs baseline | MACs M (kept) | params k (kept) "
                   "| lat b1 ms | lat b64 ms | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
            md += [_fmt_row(r) for r in rows if r["model"] == name and r["target"] == keep and r["method"] != "baseline"]
            md.append("")
    md += ["## prunekit vs Torch-Pruning (same criterion, baseline, target and fine-tune budget)", "",
           "Cells: fine-tuned accuracy prunekit / Torch-Pruning (accuracy right after pruning in parentheses); the "
           "better fine-tuned one in bold (difference >= 0.1 point). taylor_act has no Torch-Pruning counterpart.", ""]
    md += summary_lines
    n_test = meta.get("n_test") or 10000
    se = 100 * math.sqrt(0.88 * 0.12 / n_test)
    md += ["", f"Summary: prunekit better in {summary['prunekit_better']}, Torch-Pruning better in "
           f"{summary['tp_better']}, ties (< 0.1 point) in {summary['ties']} of the criterion x model x target cells. "
           f"One seed and {n_test} test images: the standard error of one accuracy near 88% is {se:.2f} points, so "
           f"single-cell differences below ~{2 * se:.1f} points are within noise. Both libraries meet the target from "
           "below with round_to steps, but not at the same point (MACs kept in the column headers): keeping more MACs "
           "favours accuracy."]
    todos = sorted({r["note"] for r in rows if r.get("status") == "todo"})
    if todos:
        md += [""] + [f"- {t}" for t in todos]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer methods, keep 50%% only, small budget")
    p.add_argument("--resume", action="store_true", help="keep the rows already in the output JSON, run the rest")
    p.add_argument("--model", action="append", choices=list(MODELS), help="repeatable (default: all)")
    p.add_argument("--method", action="append", help="method names or fnmatch patterns, repeatable (default: all)")
    p.add_argument("--targets", type=float, nargs="+", default=None, help="fractions of FLOPs kept (default 0.5 0.3)")
    p.add_argument("--global-pruning", action="store_true", help="rank units across groups (default: local)")
    p.add_argument("--round-to", type=int, default=4)
    p.add_argument("--device", default="auto", help="training/evaluation device: auto (cuda if available), cpu, cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine 2 threads trained 8x slower;\n"
                        "latency always uses 1)")
    p.add_argument("--ft-steps", type=int, default=None)
    p.add_argument("--base-steps", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None,
                   help="evaluate on the first N test images (default 5000; --quick 1000; 0 = all 10000)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="only combine the rows of these result JSONs (e.g. one run per --model) into --out")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--cache", type=Path, default=CACHE_DIR)
    p.add_argument("--out", type=Path, default=OUT, help="output path without extension")
    return p.parse_args(argv)


def make_budget(args: argparse.Namespace) -> Budget:
    b = Budget()
    if args.quick:
        b = Budget(base_steps=150, batch=64, ft_steps=20, sched_steps=2, adapt_val=200, lat_repeats=5)
    if args.ft_steps is not None:
        b.ft_steps = args.ft_steps
    if args.base_steps is not None:
        b.base_steps = args.base_steps
    return b


def selected(args: argparse.Namespace) -> list[Method]:
    import fnmatch
    ms = [m for m in METHODS if m.quick] if args.quick else list(METHODS)
    if args.method:
        ms = [m for m in METHODS if any(fnmatch.fnmatchcase(m.name, p) for p in args.method)]
    return ms


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("prunekit", "torch_pruning"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    budget = make_budget(args)
    targets = args.targets or ([0.5] if args.quick else [0.5, 0.3])
    rows: list[dict] = []
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        walls = [p["meta"].get("wall_s", 0) for p in parts]
        cmds = [p["meta"]["command"] for p in parts]
        meta = dict(parts[0]["meta"], merged_from=[str(f) for f in args.merge], wall_s=max(walls),
                    wall_note=f"the longest of {len(parts)} runs in parallel, one process each; sum {sum(walls):.0f} s",
                    command=" & ".join(cmds) + " ; python benchmarks/quality_fmnist.py " + " ".join(sys.argv[1:]))
        seen_keys: set = set()
        for part in parts:
            for r in part["rows"]:
                if (r["model"], r["target"], r["method"]) not in seen_keys:
                    seen_keys.add((r["model"], r["target"], r["method"]))
                    rows.append(r)
        write_outputs(args.out, meta, rows)
        log.info("merged %d rows into %s.{json,md}", len(rows), args.out)
        return 0
    try:
        limit = args.test_limit if args.test_limit is not None else (1000 if args.quick else 5000)
        data = load_fmnist(args.data_dir, test_limit=limit or None)
    except DatasetMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tdata = data.to(device)
    out = args.out
    meta = dict(provenance(args, device), budget=asdict(budget), quick=args.quick, global_pruning=args.global_pruning,
                round_to=args.round_to, targets=targets, n_train=int(data.xtr.shape[0]), n_test=int(data.xte.shape[0]))
    if args.resume and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if old["meta"]["budget"] != meta["budget"] or old["meta"].get("n_test") != meta["n_test"]:
            print("error: --resume with another budget or test size than the saved results; drop --resume",
                  file=sys.stderr)
            return 2
        rows = [r for r in old["rows"] if r.get("status") in ("ok", "todo")]
        meta["resumed_wall_s"] = old["meta"].get("wall_s", 0)
    done = {(r["model"], r["target"], r["method"]) for r in rows if r.get("status") == "ok"}
    methods = selected(args)
    t_start = time.perf_counter()
    for name in args.model or list(MODELS):
        base, info = baseline(name, tdata, budget, device, args.cache)
        ctx0 = Ctx(name, 1.0, tdata, budget, device, args.global_pruning, args.round_to)
        if (name, 1.0, "baseline") not in done:
            rows = [r for r in rows if (r["model"], r["target"], r["method"]) != (name, 1.0, "baseline")]
            acc = ctx0.acc(base)
            rows.append({"model": name, "target": 1.0, "method": "baseline", "side": "baseline", "criterion": None,
                         "status": "ok", "acc_baseline": acc, "acc_pruned": acc, "acc_finetuned": acc, "ft_steps": 0,
                         "wall_s": info.get("train_seconds", 0.0), "baseline_info": info, **measure(base, ctx0),
                         "macs_ratio": 1.0, "params_ratio": 1.0})
            log.info("%s baseline: acc %.4f", name, acc)
        base_row = next(r for r in rows if r["model"] == name and r["method"] == "baseline")
        for keep in targets:
            ctx = Ctx(name, keep, tdata, budget, device, args.global_pruning, args.round_to)
            for m in methods:
                key = (name, keep, m.name)
                if key in done:
                    continue
                rows = [r for r in rows if (r["model"], r["target"], r["method"]) != key]
                row = run_row(m, ctx, base, base_row)
                rows.append(row)
                if row["status"] == "ok":
                    log.info("%s keep %.2f %-18s acc %.4f -> %.4f  MACs %.1f%%  %.1fs", name, keep, m.name,
                             row["acc_pruned"] if row["acc_pruned"] is not None else float("nan"),
                             row["acc_finetuned"], 100 * row["macs_ratio"], row["wall_s"])
                else:
                    log.info("%s keep %.2f %-18s %s: %s", name, keep, m.name, row["status"], row.get("note"))
                meta["wall_s"] = round(meta.get("resumed_wall_s", 0) + time.perf_counter() - t_start, 1)
                write_outputs(out, meta, rows)
    meta["wall_s"] = round(meta.get("resumed_wall_s", 0) + time.perf_counter() - t_start, 1)
    write_outputs(out, meta, rows)
    log.info("done in %.1f s: %s.{json,md}", meta["wall_s"], out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
