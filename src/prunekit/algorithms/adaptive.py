"""``pk.AdaptivePruner``: NetAdapt-style search, one group (or block) per iteration, with short fine-tuning.

    ap = pk.AdaptivePruner(model, x, pk.FlopsTarget(0.5), finetune_fn=train_a_little, eval_fn=accuracy,
                           workdir="runs/adapt", round_to=8)
    model = ap.run()

Every iteration lowers the budget by ``delta_crop`` of the ORIGINAL model's quantity (FLOPs, parameters or
latency).  Each candidate -- one prunable group, or one block of consecutive groups that share a module
prefix -- proposes the smallest cut of its lowest-ranked units that brings the whole model under the
iteration's budget.  The cut is computed, not tried: FLOPs and parameters from the captured graph
(``macs_kept`` / ``params_kept``), latency from a per-layer latency table measured once on the target device.
Candidates that cannot meet the budget on their own are skipped.  Every proposal is a pruned copy of the
model, fine-tuned briefly by ``finetune_fn(copy, iteration, candidate)`` (or the part of these arguments that
the function takes, see :mod:`prunekit._callbacks`) and scored by ``eval_fn(copy)``
(higher is better); the best proposal (ties: the lowest candidate index) becomes the model.  When the budget
is met, groups whose width is not a multiple of ``round_to`` are rounded down, and ``final_finetune_fn`` runs.

The model passed in is pruned in place (and returned), like :class:`prunekit.Pruner`.

Workdir (all files written atomically after every iteration):

* ``state.json``: settings, model fingerprint, iteration count, current budget, history, ``done`` flag;
* ``iter_<n>.safetensors`` (``pk.save``: weights + pruning record; the previous one is removed) and
  ``final.safetensors`` when the search has finished; ``record.json``: the pruning record;
* ``log.jsonl``: one JSON line per iteration (budget, every candidate with its metric, MACs, params and
  predicted latency, the choice, seconds; measured latency for latency budgets); ``log.md``: the same as a table;
* ``latency_table.json``: per-layer latency tables, keyed by model fingerprint + device + threads.

Resuming: call :meth:`AdaptivePruner.run` again with a freshly built ORIGINAL model (same architecture and
config) and the same settings and workdir.  The last checkpoint's record is replayed on the model and its
weights loaded; the search continues with the next iteration, and a finished search returns at once.
Candidate evaluation is seeded (``seed + iteration * 1000 + candidate index``), so an interrupted and
resumed run ends where an uninterrupted one does, and ``workers > 1`` (spawned CPU processes, one thread
each) chooses the same candidates as ``workers=1``.
"""
from __future__ import annotations

import io
import json
import logging
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .._callbacks import callback
from ..capture.tape import call_model, eval_mode, flatten_outputs
from ..io.checkpoint import model_fingerprint
from ..io.checkpoint import canonical_json as _canon, write_json as _write_json
from ..runs.workdir import ResumeError, Workdir, model_info
from ..surgery import RECORD_ATTR, prune as _prune, pruned_copy, replay_record
from .pruner import Pruner, _Slot, group_key
from ..plan.targets import FlopsTarget, LatencyTarget, ParamsTarget, Target, deprecated

log = logging.getLogger("prunekit.adaptive")

__all__ = ["AdaptivePruner", "Candidate", "LatencyTable", "WorkdirError", "model_fingerprint"]

STATE_FILE = "state.json"
LOG_FILE = "log.jsonl"
TABLE_FILE = "log.md"
RECORD_FILE = "record.json"
FINAL_FILE = "final.safetensors"
LATENCY_FILE = "latency_table.json"
FORMAT = "prunekit.adaptive"
TABLE_FORMAT = "prunekit.latency_table"
FORMAT_VERSION = 1
_KINDS = {"flops": FlopsTarget, "params": ParamsTarget, "latency": LatencyTarget}


class WorkdirError(ResumeError):
    """The workdir holds a run that does not fit this call (another model, other settings, a pruned model)."""


@dataclass(frozen=True)
class Candidate:
    """What ``finetune_fn(model, iteration, candidate)`` is told about the proposal it fine-tunes."""

    index: int  # position among this iteration's candidates (also part of its seed)
    name: str  # source module(s) of the group, or the block's module prefix
    groups: tuple[int, ...]  # group ids in this iteration's analysis
    kept: tuple[int, ...]  # units each of those groups keeps
    steps: int | None  # ``short_finetune_steps`` of the pruner (None: finetune_fn decides)
    seed: int


# ---------------------------------------------------------------- small helpers
def _gkey(g) -> str:
    return json.dumps(group_key(g))


def _group_name(g) -> str:
    mods = g.source or g.modules
    return ",".join(mods[:2]) + (f",+{len(mods) - 2}" if len(mods) > 2 else "")


def _as_metric(value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"eval_fn must return a number (higher is better), got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        log.warning("eval_fn returned NaN; the proposal is ranked last")
        return -math.inf
    return value


def _pack(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


def _unpack(blob: bytes) -> nn.Module:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


def _fidelity(model: nn.Module, inputs: Any, ref: Sequence[torch.Tensor], forward_fn: Callable | None) -> float:
    """Default eval: minus the mean squared difference to the original model's outputs on the example input."""
    with eval_mode(model), torch.no_grad():
        out = flatten_outputs(call_model(model, inputs, forward_fn))[0]
    err = sum(float((a.float() - b.float()).pow(2).mean()) for a, b in zip(out, ref) if a.shape == b.shape)
    return -err


# ---------------------------------------------------------------- candidate evaluation (also in workers)
def _worker_init() -> None:
    torch.set_num_threads(1)


def _evaluate(job: Mapping[str, Any]) -> dict[str, Any]:
    """Fine-tune and score one proposal; runs in this process (serial) or in a spawned worker."""
    packed = isinstance(job["model"], bytes)
    model = _unpack(job["model"]) if packed else job["model"]
    cand: Candidate = job["candidate"]
    t0 = time.perf_counter()
    torch.manual_seed(cand.seed)
    if job["finetune_fn"] is not None:
        job["finetune_fn"](model, job["iteration"], cand)
    if job["eval_fn"] is not None:
        metric = _as_metric(job["eval_fn"](model))
    else:
        metric = _fidelity(model, job["inputs"], job["ref"], job["forward_fn"])
    return {"metric": metric, "seconds": time.perf_counter() - t0, "model": _pack(model) if packed else model}


def _check_picklable(workers: int, **fns: Any) -> None:
    for name, fn in fns.items():
        if fn is None:
            continue
        try:
            pickle.dumps(fn)
        except Exception as e:  # noqa: BLE001 - pickling raises PicklingError, AttributeError, TypeError, ...
            raise TypeError(
                f"AdaptivePruner(workers={workers}) evaluates candidates in spawned worker processes, so {name} "
                f"must be picklable, but {fn!r} is not ({type(e).__name__}: {e}). Define it as a module-level "
                "function (not a lambda, a nested function or a bound method of an unpicklable object), or "
                "functools.partial of one; or use workers=1.") from None


# ---------------------------------------------------------------- latency table
class LatencyTable:
    """Per-layer latency as a function of width, for predicting a pruned model's latency.

    ``layers[key]`` (``key``: a group's identity, stable across re-analyses) holds the group's original
    ``size``, the kept ``fractions`` it was timed at (descending, starting at 1.0) and ``ms``: the summed
    time of the modules the group touches at each width.  Predicted latency = ``baseline_ms`` minus the
    savings of every group, each interpolated linearly between grid points (extrapolated linearly below
    the smallest fraction, never past zero time).  Savings are made monotone in the cut.
    """

    def __init__(self, baseline_ms: float, layers: Mapping[str, Mapping[str, Any]], key: Mapping[str, Any]):
        self.baseline_ms = float(baseline_ms)
        self.layers = {k: dict(v) for k, v in layers.items()}
        self.key = dict(key)
        for v in self.layers.values():  # noise must not make a larger cut look slower
            ms = list(v["ms"])
            for i in range(1, len(ms)):
                ms[i] = min(ms[i], ms[i - 1])
            v["ms"] = ms

    def saving(self, key: str, kept: int) -> float:
        """Milliseconds saved when the group ``key`` keeps ``kept`` of its original units."""
        lay = self.layers.get(key)
        if lay is None:
            return 0.0
        f = kept / lay["size"]
        fr, ms = lay["fractions"], lay["ms"]
        if f >= fr[0]:
            return 0.0
        for i in range(1, len(fr)):
            if f >= fr[i]:
                t = ms[i - 1] + (ms[i] - ms[i - 1]) * (fr[i - 1] - f) / (fr[i - 1] - fr[i])
                return ms[0] - t
        if len(fr) < 2:
            return 0.0
        slope = (ms[-2] - ms[-1]) / (fr[-2] - fr[-1])
        t = max(0.0, ms[-1] - slope * (fr[-1] - f))
        return ms[0] - t

    def predict(self, sizes: Mapping[str, int]) -> float:
        """Predicted latency (ms) of the model whose groups keep ``sizes`` (key -> units); others unpruned."""
        return self.baseline_ms - sum(self.saving(k, n) for k, n in sizes.items())

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_ms": self.baseline_ms, "layers": self.layers, "key": self.key}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyTable":
        return cls(d["baseline_ms"], d["layers"], d.get("key", {}))

    def __repr__(self) -> str:
        return f"LatencyTable({len(self.layers)} layers, baseline {self.baseline_ms:.3f} ms)"


def _module_inputs(model: nn.Module, names: Iterable[str], inputs: Any, forward_fn: Callable | None
                   ) -> dict[str, tuple]:
    """Positional inputs of the first call of each named module during one forward."""
    seen: dict[str, tuple] = {}
    hooks = []
    for name in names:
        def hook(mod, args, name=name):
            seen.setdefault(name, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, inputs, forward_fn)
    finally:
        for h in hooks:
            h.remove()
    return seen


# ---------------------------------------------------------------- the pruner
class AdaptivePruner:
    """NetAdapt-style pruning to a FLOPs, parameter or latency budget (see the module docstring).

    Args:
        model: the original model (pruned in place by :meth:`run`; on resume it must be freshly built).
        example_inputs: what ``model`` is called with (tensor, tuple or dict).
        target: ``pk.FlopsTarget(r)`` (default ``r = 0.5``), ``pk.ParamsTarget(r)`` or ``pk.LatencyTarget(r)``:
            ``r`` the fraction KEPT (a ``LatencyTarget``'s device/threads/repeats are used unless ``device``,
            ``threads``, ``latency_repeats`` are given).  ``budget=(kind, ratio)`` is its deprecated spelling.
        finetune_fn: briefly trains a proposal, offered ``(model_copy, iteration, candidate)``
            (:class:`Candidate` says which; ``candidate.steps`` is ``short_finetune_steps``).  It takes
            what it needs: ``f(model)``, ``f(model, iteration)``, ``f(model, iteration, candidate)``,
            ``f(model, candidate)`` (by name), ``f(model, **kw)`` (the others by keyword) or ``f(*args)``;
            further parameters need a default (``f(model, steps=30)`` keeps its 30).  Checked here, at
            construction: a function that cannot be called so raises ``TypeError``.
        eval_fn: ``eval_fn(model_copy) -> float``, higher is better.  Default: minus the mean squared
            difference to the original model's outputs on ``example_inputs``.  Further parameters need a
            default.
        workdir: folder for checkpoints, logs, the latency table and resuming.
        criterion: ranks units inside a group (:func:`prunekit.get_criterion` names); the lowest go first.
        round_to: kept channels are a multiple of this; at least one unit (one multiple) always stays.
        ignore, max_ratio, forward_fn, data, loss_fn: as for :class:`prunekit.Pruner`.
        delta_crop: fraction of the ORIGINAL quantity removed per iteration; iteration ``i`` removes
            ``delta_crop * delta_decay ** (i - 1)`` (at least ``min_delta``, default ``delta_crop / 10``).
        granularity: ``"group"`` (every prunable group is a candidate) or ``"block"`` (consecutive groups
            whose first source module shares the first ``block_depth`` name components, e.g. resnet stages).
        short_finetune_steps: passed to ``finetune_fn`` as ``candidate.steps``.
        final_finetune_fn: ``final_finetune_fn(model)`` once after the search and the final rounding
            (further parameters need a default).
        final_round: round every eligible group down to a multiple of ``round_to`` at the end.
        workers: ``> 1`` evaluates candidates in that many spawned CPU processes (one thread each);
            ``finetune_fn``/``eval_fn`` must then be picklable (module-level functions).
        device, threads, latency_repeats: where and how latency is measured (latency budgets only).
        latency_table: a :class:`LatencyTable`, or a JSON file to cache tables in (default
            ``workdir/latency_table.json``; in memory without a workdir).
        latency_grid: kept fractions each group is timed at.
        measure_fn: ``measure_fn(module, inputs_tuple) -> ms``; replaces :func:`prunekit.latency` (used for
            the table and for the whole-model cross-check), e.g. a deterministic cost model in tests.
        seed: candidate ``k`` of iteration ``i`` runs under ``torch.manual_seed(seed + i * 1000 + k)``.
        max_iterations: safety stop for the search.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, target: Any = None,
                 finetune_fn: Callable | None = None, eval_fn: Callable | None = None,
                 workdir: str | Path | None = None, *, criterion: Any = "l2", round_to: int = 1,
                 ignore: Iterable[Any] | None = None, max_ratio: float = 1.0, delta_crop: float = 0.05,
                 delta_decay: float = 1.0, min_delta: float | None = None, granularity: str = "group",
                 block_depth: int = 1, short_finetune_steps: int | None = None,
                 final_finetune_fn: Callable | None = None, final_round: bool = True, workers: int = 1,
                 device: str = "cpu", threads: int | None = None, latency_repeats: int = 10,
                 latency_table: LatencyTable | str | Path | None = None,
                 latency_grid: Sequence[float] = (1.0, 0.75, 0.5, 0.25), measure_fn: Callable | None = None,
                 forward_fn: Callable | None = None, data: Any = None, loss_fn: Callable | None = None,
                 seed: int = 0, max_iterations: int = 1000, budget: Any = None):
        if budget is not None:
            if target is not None:
                raise TypeError("AdaptivePruner: pass target=... only (budget= is its deprecated spelling)")
            deprecated("AdaptivePruner(budget=(kind, ratio))", "target=pk.FlopsTarget(ratio) (or ParamsTarget, "
                       "LatencyTarget)")
            target = budget
        elif isinstance(target, (tuple, list)):
            deprecated("AdaptivePruner's (kind, ratio) target", "target=pk.FlopsTarget(ratio) (or ParamsTarget, "
                       "LatencyTarget)")
        if target is None:
            target = FlopsTarget(0.5)
        kind, ratio = self._parse_budget(target)
        if isinstance(target, LatencyTarget):  # the target's measuring settings, unless given here
            device = target.device if device == "cpu" else device
            threads = target.threads if threads is None else threads
            latency_repeats = target.repeats if latency_repeats == 10 else latency_repeats
        if not 0.0 < float(delta_crop) < 1.0:
            raise ValueError(f"delta_crop is the fraction of the original budget removed per iteration and must be "
                             f"in (0, 1), got {delta_crop!r}")
        if not 0.0 < float(delta_decay) <= 1.0:
            raise ValueError(f"delta_decay must be in (0, 1] (1 = constant steps), got {delta_decay!r}")
        if granularity not in ("group", "block"):
            raise ValueError(f"granularity must be 'group' or 'block', got {granularity!r}")
        if not isinstance(block_depth, int) or block_depth < 1:
            raise ValueError(f"block_depth must be a positive integer, got {block_depth!r}")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        owner = "AdaptivePruner"
        self._finetune = callback(finetune_fn, "finetune_fn", owner, ("model", "iteration", "candidate"))
        self._eval = callback(eval_fn, "eval_fn", owner, ("model",))
        self._final_finetune = callback(final_finetune_fn, "final_finetune_fn", owner, ("model",))
        self._measure = callback(measure_fn, "measure_fn", owner, ("module", "inputs"), required=2)
        callback(forward_fn, "forward_fn", owner, ("model", "inputs"), required=2, positional=True)
        grid = sorted({float(f) for f in latency_grid} | {1.0}, reverse=True)
        if any(not 0.0 < f <= 1.0 for f in grid):
            raise ValueError(f"latency_grid holds kept fractions in (0, 1], got {list(latency_grid)}")
        if workers > 1:
            _check_picklable(workers, finetune_fn=finetune_fn, eval_fn=eval_fn, forward_fn=forward_fn)
        self.model = model
        self.example_inputs = example_inputs
        self.kind, self.ratio = kind, ratio
        self.finetune_fn, self.eval_fn, self.final_finetune_fn = finetune_fn, eval_fn, final_finetune_fn
        self.workdir = Path(workdir) if workdir is not None else None
        self._wd = Workdir(self.workdir, FORMAT, version=FORMAT_VERSION, what="an AdaptivePruner", error=WorkdirError,
                           state_file=STATE_FILE) if workdir is not None else None
        self.delta_crop, self.delta_decay = float(delta_crop), float(delta_decay)
        self.min_delta = float(min_delta) if min_delta is not None else self.delta_crop / 10
        self.granularity, self.block_depth = granularity, block_depth
        self.short_finetune_steps = short_finetune_steps
        self.final_round = bool(final_round)
        self.workers = workers
        self.device, self.threads, self.latency_repeats = str(device), threads, int(latency_repeats)
        self.latency_grid = grid
        self.measure_fn = measure_fn
        self.forward_fn = forward_fn
        self.seed = int(seed)
        self.max_iterations = int(max_iterations)
        target = LatencyTarget(ratio, device=self.device, threads=threads, repeats=self.latency_repeats) \
            if kind == "latency" else _KINDS[kind](ratio)
        self.target = target
        self._pruner = Pruner(model, example_inputs, criterion, target, forward_fn=forward_fn, round_to=round_to,
                              max_ratio=max_ratio, ignore=ignore, data=data, loss_fn=loss_fn)
        self.round_to = round_to
        self._latency_source = latency_table
        self.table: LatencyTable | None = latency_table if isinstance(latency_table, LatencyTable) else None
        self._ref = None
        if eval_fn is None:
            with eval_mode(model), torch.no_grad():
                self._ref = [t.detach().clone() for t in
                             flatten_outputs(call_model(model, example_inputs, forward_fn))[0]]
        self.iteration = 0
        self.goal: float | None = None
        self.history: list[dict] = []
        self.done = False
        self.base: float | None = None

    @staticmethod
    def _parse_budget(budget: Any) -> tuple[str, float]:
        if isinstance(budget, (FlopsTarget, ParamsTarget, LatencyTarget)):
            return budget.kind, float(budget.ratio)
        if isinstance(budget, Target) or (isinstance(budget, (int, float)) and not isinstance(budget, bool)):
            raise TypeError(f"AdaptivePruner prunes to a FLOPs, parameter or latency budget: pass "
                            f"target=pk.FlopsTarget(r), pk.ParamsTarget(r) or pk.LatencyTarget(r), got {budget!r}")
        if not (isinstance(budget, (tuple, list)) and len(budget) == 2 and budget[0] in _KINDS):
            raise ValueError(f"budget must be (kind, ratio_kept) with kind one of {sorted(_KINDS)}, e.g. "
                             f"('flops', 0.5), got {budget!r}")
        try:
            r = float(budget[1])
        except (TypeError, ValueError):
            raise ValueError(f"budget ratio must be a number in (0, 1], got {budget[1]!r}") from None
        if not 0.0 < r <= 1.0:
            raise ValueError(f"budget ratio is the fraction KEPT and must be in (0, 1], got {r}")
        return budget[0], r

    # ------------------------------------------------------------------ config & fingerprint
    def config(self) -> dict[str, Any]:
        """The settings a resumed run must share with the saved one."""
        p = self._pruner
        cfg = {"budget": [self.kind, self.ratio], "criterion": p.criterion.name, "round_to": self.round_to,
               "max_ratio": p.max_ratio, "ignore": list(p.ignore), "delta_crop": self.delta_crop,
               "delta_decay": self.delta_decay, "min_delta": self.min_delta, "granularity": self.granularity,
               "block_depth": self.block_depth, "short_finetune_steps": self.short_finetune_steps,
               "final_round": self.final_round, "seed": self.seed}
        if self.kind == "latency":
            cfg.update(device=self.device, threads=self.threads, latency_grid=self.latency_grid)
        return cfg

    # ------------------------------------------------------------------ quantities
    def _value(self, graph, kept: Mapping[int, int] | None = None) -> float:
        """The budgeted quantity of the current model after ``kept`` (group id -> units kept)."""
        kept = kept or {}
        if self.kind == "flops":
            return float(graph.macs_kept(kept))
        if self.kind == "params":
            return float(graph.params_kept(kept))
        return self.table.predict({_gkey(g): kept.get(g.id, g.size) for g in graph.groups})

    def _latency_ms(self, model: nn.Module, inputs: Any, whole: bool) -> float:
        if self.measure_fn is not None:
            return float(self._measure(model, inputs))
        from ..cost import latency
        fwd = self.forward_fn if whole else None
        return float(latency(model, inputs, device=self.device, threads=self.threads, repeats=self.latency_repeats,
                             forward_fn=fwd).median_ms)

    # ------------------------------------------------------------------ latency table
    def _table_key(self) -> dict[str, Any]:
        return {"fingerprint": model_fingerprint(self.model), "device": self.device,
                "threads": self.threads if self.threads is not None else torch.get_num_threads(),
                "grid": self.latency_grid,
                "measure": getattr(self.measure_fn, "__qualname__", type(self.measure_fn).__name__)
                if self.measure_fn is not None else "prunekit.latency"}

    def _table_path(self) -> Path | None:
        src = self._latency_source
        if isinstance(src, (str, Path)):
            return Path(src)
        return self.workdir / LATENCY_FILE if self.workdir is not None and src is None else None

    def _ensure_table(self) -> LatencyTable:
        if self.table is not None:
            return self.table
        key = self._table_key()
        skey = _canon(key)
        path = self._table_path()
        cache: dict[str, Any] = {"format": TABLE_FORMAT, "format_version": FORMAT_VERSION, "tables": {}}
        if path is not None and path.is_file():
            try:
                cache = json.loads(path.read_text())
            except ValueError as e:
                raise WorkdirError(f"{path}: the latency table file is not valid JSON ({e}); delete it to measure "
                                   "again") from None
            if cache.get("format") != TABLE_FORMAT:
                raise WorkdirError(f"{path}: not a prunekit latency table (format {cache.get('format')!r}); "
                                   "pass another latency_table path")
            if skey in cache.get("tables", {}):
                self.table = LatencyTable.from_dict(cache["tables"][skey])
                log.info("latency table for %s reused from %s", key["device"], path)
                return self.table
        self.table = self.measure_table()
        if path is not None:
            cache.setdefault("tables", {})[skey] = self.table.to_dict()
            _write_json(path, cache)
        return self.table

    def measure_table(self) -> LatencyTable:
        """Time every eligible group's modules at each width of ``latency_grid`` (the model is not changed)."""
        t0 = time.perf_counter()
        model, x = self.model, self.example_inputs
        graph = self._pruner.graph
        baseline = self._latency_ms(model, x, whole=True)
        layers: dict[str, dict] = {}
        for slot in self._pruner._slots():
            g = slot.group
            names = [m for m in g.modules if m]
            ms, fracs = [], []
            for f in self.latency_grid:
                keep = max(1, int(round(f * g.size)))
                if fracs and keep >= g.size:
                    continue
                trial = model if keep >= g.size else self._pruned_copy(graph, {g.id: list(range(g.size - keep))},
                                                                       verify=False)
                args = _module_inputs(trial, names, x, self.forward_fn)
                ms.append(sum(self._latency_ms(trial.get_submodule(n), args[n], whole=False)
                              for n in names if n in args))
                fracs.append(keep / g.size)
            layers[_gkey(g)] = {"name": _group_name(g), "size": g.size, "fractions": fracs, "ms": ms}
        table = LatencyTable(baseline, layers, self._table_key())
        log.info("latency table: %d layers x %d widths measured on %s in %.2fs (baseline %.3f ms)", len(layers),
                 len(self.latency_grid), self.device, time.perf_counter() - t0, baseline)
        return table

    # ------------------------------------------------------------------ candidates
    def _pruned_copy(self, graph, plan: Mapping[int, list[int]], verify: bool = True) -> nn.Module:
        """A deep copy of the model with ``plan`` removed, reusing the current analysis (same structure)."""
        return pruned_copy(self.model, graph, plan, verify=verify)

    def _units(self, slots: list[_Slot]) -> list[tuple[str, list[_Slot]]]:
        """(name, slots) per candidate: one per group, or one per block of consecutive groups."""
        if self.granularity == "group":
            return [(_group_name(s.group), [s]) for s in slots]
        blocks: list[tuple[str, list[_Slot]]] = []
        for s in slots:
            first = (s.group.source or s.group.modules or [""])[0]
            prefix = ".".join(first.split(".")[:self.block_depth]) or "<root>"
            if blocks and blocks[-1][0] == prefix:
                blocks[-1][1].append(s)
            else:
                blocks.append((prefix, [s]))
        names: dict[str, int] = {}
        out = []
        for name, ss in blocks:
            names[name] = names.get(name, 0) + 1
            out.append((name if names[name] == 1 else f"{name}#{names[name]}", ss))
        return out

    @staticmethod
    def _levels(slot: _Slot) -> list[int]:
        """Kept sizes below the current one, from the smallest cut to the largest (multiples of the step)."""
        return [k for k in range(slot.cur - 1, slot.min_keep - 1, -1) if k % slot.step == 0]

    def _smallest_cut(self, graph, slots: list[_Slot], goal: float) -> dict[int, int] | None:
        """The smallest cut (group id -> kept) of ``slots`` that brings the model to ``goal``, or None."""
        levels = [self._levels(s) for s in slots]
        n = max((len(lv) for lv in levels), default=0)
        if n == 0:
            return None

        def kept(j: int) -> dict[int, int]:  # every group advances in proportion to its number of levels
            res = {}
            for s, lv in zip(slots, levels):
                i = (j * len(lv)) // n
                if i > 0:
                    res[s.group.id] = lv[i - 1]
            return res
        if self._value(graph, kept(n)) > goal:
            return None
        lo, hi = 1, n
        while lo < hi:
            mid = (lo + hi) // 2
            if self._value(graph, kept(mid)) <= goal:
                hi = mid
            else:
                lo = mid + 1
        return kept(lo)

    def _candidates(self, graph, goal: float) -> list[tuple[str, dict[int, int] | None]]:
        return [(name, self._smallest_cut(graph, ss, goal)) for name, ss in self._units(self._pruner._slots())]

    # ------------------------------------------------------------------ workdir
    def _state(self) -> dict[str, Any]:
        return self._wd.new_state(config=self.config(), model=self._model_info, base=self.base,
                                  iteration=self.iteration, goal=self.goal, done=self.done,
                                  checkpoint=self._checkpoint, history=self.history, final=self.final)

    def _resume(self) -> bool:
        """Restore the run saved in the workdir, if any; True if it had finished."""
        wd = self._wd
        if not wd.has_state():
            return False
        state = wd.read_state()
        wd.check_model(state["model"], self.model, "the saved run was started from a different model",
                       "Resuming needs a freshly built original model of the same architecture and config; or use "
                       "another workdir.")
        wd.check_config(state["config"], self.config(), "Pass the same settings to resume, or use another workdir.")
        self.base, self.goal, self.iteration = state["base"], state["goal"], int(state["iteration"])
        self.history, self.done, self._checkpoint = list(state["history"]), bool(state["done"]), state["checkpoint"]
        self.final = dict(state.get("final") or {})
        if self._checkpoint:
            wd.restore(self.model, self._checkpoint)
            self._pruner.invalidate()
        wd.write_text(LOG_FILE, "".join(json.dumps(e) + "\n" for e in self.history))
        log.info("AdaptivePruner: %s %s after iteration %d", "finished run in" if self.done else "resuming", wd.path,
                 self.iteration)
        return self.done

    def _save_iteration(self, entry: dict) -> None:
        wd = self._wd
        old = self._checkpoint
        name = FINAL_FILE if self.done else f"iter_{self.iteration:04d}.safetensors"
        self._checkpoint = wd.save_checkpoint(self.model, name, {"iteration": self.iteration, "done": self.done})
        wd.write_json(RECORD_FILE, getattr(self.model, RECORD_ATTR, None) or [])
        wd.commit(self._state(), checkpoint=self._checkpoint, previous=old)
        if entry is not None:
            wd.append_line(LOG_FILE, entry)
        wd.write_text(TABLE_FILE, self.log_table())

    def log_table(self) -> str:
        """The history as a markdown table (what ``workdir/log.md`` holds)."""
        unit = {"flops": "MACs", "params": "params", "latency": "ms (predicted)"}[self.kind]
        lines = ["# AdaptivePruner log\n",
                 f"budget: {self.kind} kept {self.ratio:g} of {self.base:.6g} {unit}; criterion "
                 f"{self._pruner.criterion.name}; granularity {self.granularity}; delta_crop {self.delta_crop:g}; "
                 f"round_to {self.round_to}\n",
                 "| iter | budget | chosen | metric | MACs | params | latency pred / meas (ms) | candidates "
                 "(metric; * chosen, - skipped) | s |",
                 "|---:|---:|---|---:|---:|---:|---|---|---:|"]
        for e in self.history:
            cands = ", ".join(f"{c['name']}: " + ("-" if c["metric"] is None else f"{c['metric']:.4g}")
                              + ("*" if c["index"] == e["chosen"] else "") for c in e["candidates"])
            lat = "-" if e.get("latency_predicted") is None else \
                f"{e['latency_predicted']:.3f} / {e.get('latency_measured') or float('nan'):.3f}"
            lines.append(f"| {e['iteration']} | {e['budget_ratio']:.2%} | {e['chosen_name']} | {e['metric']:.4g} | "
                         f"{e['macs']:.4g} | {e['params']:.4g} | {lat} | {cands} | {e['seconds']:.2f} |")
        if self.done:
            lines.append(f"\ndone: {self.final}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ search
    def _evaluate_all(self, pool, graph, it: int, props: list[tuple[int, str, dict[int, int]]],
                      scores: Mapping[int, torch.Tensor]) -> Iterator[tuple[int, dict]]:
        def jobs():
            for idx, name, kept in props:
                plan = {gid: torch.argsort(scores[gid].float(), stable=True)[:graph.group(gid).size - k].tolist()
                        for gid, k in kept.items()}
                trial = self._pruned_copy(graph, plan)
                cand = Candidate(idx, name, tuple(kept), tuple(kept.values()), self.short_finetune_steps,
                                 self.seed + it * 1000 + idx)
                yield {"model": _pack(trial) if pool is not None else trial, "candidate": cand, "iteration": it,
                       "finetune_fn": self._finetune, "eval_fn": self._eval, "inputs": self.example_inputs,
                       "ref": self._ref, "forward_fn": self.forward_fn}
        results = pool.imap(_evaluate, jobs()) if pool is not None else map(_evaluate, jobs())
        for (idx, _, _), res in zip(props, results):
            yield idx, res

    def _iterate(self, pool, current: float) -> dict:
        t0 = time.perf_counter()
        it = self.iteration + 1
        graph = self._pruner.graph
        target = self.ratio * self.base
        ref = min(self.goal if self.goal is not None else self.base, current)
        delta = max(self.min_delta, self.delta_crop * self.delta_decay ** (it - 1))
        while True:
            goal = max(target, ref - delta * self.base)
            cands = self._candidates(graph, goal)
            if any(k is not None for _, k in cands) or delta < 1e-9:
                break
            delta /= 2
            log.info("iteration %d: no single candidate can remove that much; trying a step of %.4g", it, delta)
        props = [(i, name, kept) for i, (name, kept) in enumerate(cands) if kept is not None]
        if not props:
            raise RuntimeError(f"AdaptivePruner: no candidate can reduce the model's {self.kind} any further "
                               f"(at {current / self.base:.1%} of the original, budget {self.ratio:.1%}); relax "
                               "ignore/round_to/max_ratio or choose a larger budget ratio")
        scores = self._pruner.scores([graph.group(g) for _, _, kept in props for g in kept])
        records = [{"index": i, "name": name, "groups": None if kept is None else list(kept),
                    "kept": None if kept is None else [int(k) for k in kept.values()], "metric": None}
                   for i, (name, kept) in enumerate(cands)]
        best, best_model = None, None
        for idx, res in self._evaluate_all(pool, graph, it, props, scores):
            kept = cands[idx][1]
            rec = records[idx]
            rec.update(metric=res["metric"], seconds=res["seconds"], macs=int(graph.macs_kept(kept)),
                       params=int(graph.params_kept(kept)))
            if self.kind == "latency":
                rec["latency_predicted"] = self._value(graph, kept)
            if best is None or res["metric"] > records[best]["metric"]:
                best, best_model = idx, res["model"]
        chosen = _unpack(best_model) if isinstance(best_model, bytes) else best_model
        self._adopt(chosen)
        self.iteration, self.goal = it, goal
        entry = {"iteration": it, "budget": goal, "budget_ratio": goal / self.base, "delta": delta,
                 "candidates": records, "chosen": best, "chosen_name": records[best]["name"],
                 "metric": records[best]["metric"], "macs": records[best]["macs"], "params": records[best]["params"]}
        if self.kind == "latency":
            entry["latency_predicted"] = records[best]["latency_predicted"]
            entry["latency_measured"] = self._latency_ms(self.model, self.example_inputs, whole=True)
        entry["seconds"] = time.perf_counter() - t0
        log.info("iteration %d: budget %.2f%% of the original %s, chose %s (metric %.5g) among %d candidate(s), "
                 "%.2fs", it, 100 * entry["budget_ratio"], self.kind, entry["chosen_name"], entry["metric"],
                 len(props), entry["seconds"])
        if self.kind == "latency":
            log.info("iteration %d: latency predicted %.3f ms, measured %.3f ms", it, entry["latency_predicted"],
                     entry["latency_measured"])
        return entry

    def _adopt(self, chosen: nn.Module) -> None:
        """Make the model (in place) what the chosen, fine-tuned proposal is: replay its new step, load its weights."""
        step = getattr(chosen, RECORD_ATTR)[-1]
        replay_record(self.model, [step])
        self.model.load_state_dict(chosen.state_dict())
        self._pruner.invalidate()

    def _final_round(self) -> dict[int, list[int]]:
        slots = [s for s in self._pruner._slots() if s.step > 1 and s.cur % s.step and s.cur > s.min_keep]
        if not slots or not self.final_round:
            return {}
        scores = self._pruner.scores([s.group for s in slots])
        plan = {}
        for s in slots:
            keep = max(s.min_keep, (s.cur // s.step) * s.step)
            plan[s.group.id] = torch.argsort(scores[s.group.id].float(), stable=True)[:s.cur - keep].tolist()
        _prune(self.model, self._pruner.graph, plan)
        self._pruner.invalidate()
        log.info("final pass: %d group(s) rounded down to a multiple of %d", len(plan), self.round_to)
        return plan

    def run(self) -> nn.Module:
        """Search until the budget is met (resuming a saved run), round, fine-tune; return the pruned model."""
        if getattr(self.model, RECORD_ATTR, None):
            raise WorkdirError("AdaptivePruner.run() needs the original, unpruned model (this one already carries a "
                               "pruning record); build the model again and pass it to a new AdaptivePruner")
        self._model_info = model_info(self.model)
        self._checkpoint = None
        if self.kind == "latency":
            self._ensure_table()
        if self.base is None:
            self.base = self._value(self._pruner.graph)
        self.final: dict[str, Any] = {}
        if self._wd is not None:
            if self._resume():
                return self.model
            self._wd.mkdir()
            if self.iteration == 0:
                self._wd.write_state(self._state())
                self._wd.write_text(LOG_FILE, "")
        target = self.ratio * self.base
        full = {s.group.id: s.min_keep for s in self._pruner._slots()}
        if self._value(self._pruner.graph, full) > target * (1 + 1e-9):
            why = "" if self.kind != "latency" else (
                " according to the latency table (per-layer savings; the rest of the measured baseline, "
                f"{self.table.baseline_ms:.3f} ms, is time pruning cannot remove)")
            raise ValueError(f"budget ({self.kind}, {self.ratio}) is not reachable: with every eligible group at its "
                             "minimum the model keeps "
                             f"{self._value(self._pruner.graph, full) / self.base:.1%}{why} (ignored modules, round_to="
                             f"{self.round_to}, max_ratio, pinned groups: see pk.analyze(model, x).summary()); relax "
                             "the constraints or choose a larger ratio")
        pool = None
        try:
            while True:
                current = self._value(self._pruner.graph)
                if current <= target * (1 + 1e-9):
                    break
                if self.iteration >= self.max_iterations:
                    raise RuntimeError(f"AdaptivePruner stopped after max_iterations={self.max_iterations} without "
                                       f"meeting the budget ({current / self.base:.1%} of the original {self.kind}); "
                                       "raise max_iterations or delta_crop")
                if pool is None and self.workers > 1:
                    import torch.multiprocessing as mp
                    pool = mp.get_context("spawn").Pool(self.workers, initializer=_worker_init)
                entry = self._iterate(pool, current)
                self.history.append(entry)
                if self.workdir is not None:
                    self._save_iteration(entry)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        rounded = self._final_round()
        if self.final_finetune_fn is not None:
            torch.manual_seed(self.seed + (self.iteration + 1) * 1000)
            self._final_finetune(self.model)
        graph = self._pruner.graph
        self.final = {"iterations": self.iteration, "rounded_groups": len(rounded), "macs": int(graph.macs()),
                      "params": int(graph.params_kept({})), "value_ratio": self._value(graph) / self.base}
        self.done = True
        if self.workdir is not None:
            self._save_iteration(None)
        log.info("AdaptivePruner done after %d iteration(s): %s at %.2f%% of the original", self.iteration, self.kind,
                 100 * self.final["value_ratio"])
        return self.model

    def __repr__(self) -> str:
        return (f"AdaptivePruner(budget=({self.kind!r}, {self.ratio}), criterion={self._pruner.criterion.name!r}, "
                f"granularity={self.granularity!r}, delta_crop={self.delta_crop}, round_to={self.round_to}, "
                f"workers={self.workers})")
