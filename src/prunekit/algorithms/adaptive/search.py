"""``pk.AdaptivePruner``: the NetAdapt-style search loop (see :mod:`prunekit.algorithms.adaptive`).

The class is put together from focused parts: :mod:`.config` (settings checks), :mod:`.candidates`
(proposals), :mod:`.evaluate` (fine-tune and score, also in workers), :mod:`.latency` (budgeted quantity,
latency table), :mod:`.state` (workdir, resume, logs)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..._callbacks import callback
from ...capture import call_model, eval_mode, flatten_outputs
from ...runs import distributed as D
from ...runs.workdir import Workdir, model_info
from ...surgery import RECORD_ATTR, prune as _prune, replay_record
from ..pruner import Pruner
from ...plan.targets import FlopsTarget, LatencyTarget, deprecated
from .candidates import CandidateSearch
from .config import _KINDS, check_settings, parse_budget
from .evaluate import Candidate, _check_picklable, _evaluate, _pack, _unpack, _worker_init
from .latency import LatencyBudget, LatencyTable
from .state import FORMAT, FORMAT_VERSION, LOG_FILE, STATE_FILE, Persistence, WorkdirError

log = logging.getLogger("prunekit.adaptive")


class AdaptivePruner(CandidateSearch, LatencyBudget, Persistence):
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
        latency_model: a :class:`prunekit.LatencyModel` of ``model``; with a ``LatencyTarget`` (and no
            ``measure_fn``) the latency table is predicted by it (default: one is built from the target's
            backend, device, threads and batch size, measured layers cached on disk) and the whole-model
            cross-check measured on its backend.
        measure_fn: ``measure_fn(module, inputs_tuple) -> ms``; replaces :func:`prunekit.latency` (used for
            the table and for the whole-model cross-check), e.g. a deterministic cost model in tests.
        seed: candidate ``k`` of iteration ``i`` runs under ``torch.manual_seed(seed + i * 1000 + k)``.
        max_iterations: safety stop for the search.
        distributed: spread the candidates over the ranks of ``torch.distributed`` (default ``None``: when it is
            initialised, over the default group; a process group: over that group; ``False``: every rank runs
            the whole search alone).  Every rank builds the same pruner and calls :meth:`run`; rank ``r``
            fine-tunes and evaluates candidates ``r, r + world, ...`` (with ``workers`` processes of its own),
            the metrics are gathered, every rank picks the same winner (the same rule and seeds as one process)
            and receives its weights from the rank that trained it, so all ranks end with the same model.
            Only rank 0 writes the workdir; on resume rank 0 reads it and sends the state to the others (no
            shared file system needed).
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
                 seed: int = 0, max_iterations: int = 1000, budget: Any = None, latency_model: Any = None,
                 distributed: Any = None):
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
        kind, ratio = parse_budget(target)
        # a LatencyTarget's table comes from the shared latency model (pk.LatencyModel: its backend, batch size),
        # unless a measure_fn replaces the timings
        self._latency_model = latency_model
        self._lm_spec = (target.backend, target.batch_size) if isinstance(target, LatencyTarget) else ("eager", None)
        self._use_lm = kind == "latency" and measure_fn is None and (latency_model is not None
                                                                      or isinstance(target, LatencyTarget))
        if isinstance(target, LatencyTarget):  # the target's measuring settings, unless given here
            device = target.device if device == "cpu" else device
            threads = target.threads if threads is None else threads
            latency_repeats = target.repeats if latency_repeats == 10 else latency_repeats
        grid = check_settings(delta_crop=delta_crop, delta_decay=delta_decay, granularity=granularity,
                              block_depth=block_depth, workers=workers, latency_grid=latency_grid)
        owner = "AdaptivePruner"
        self._finetune = callback(finetune_fn, "finetune_fn", owner, ("model", "iteration", "candidate"))
        self._eval = callback(eval_fn, "eval_fn", owner, ("model",))
        self._final_finetune = callback(final_finetune_fn, "final_finetune_fn", owner, ("model",))
        self._measure = callback(measure_fn, "measure_fn", owner, ("module", "inputs"), required=2)
        callback(forward_fn, "forward_fn", owner, ("model", "inputs"), required=2, positional=True)
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
        self._dist, self._group = D.active(distributed)
        target = LatencyTarget(ratio, device=self.device, threads=threads, repeats=self.latency_repeats,
                               backend=self._lm_spec[0], batch_size=self._lm_spec[1], method="search") \
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


    _parse_budget = staticmethod(parse_budget)

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


    # ------------------------------------------------------------------ search
    def _evaluate_all(self, pool, graph, it: int, props: list[tuple[int, str, dict[int, int]]],
                      scores: Mapping[int, torch.Tensor]) -> Iterator[tuple[int, dict]]:
        def jobs(subset=props):
            for idx, name, kept in subset:
                plan = {gid: torch.argsort(scores[gid].float(), stable=True)[:graph.group(gid).size - k].tolist()
                        for gid, k in kept.items()}
                trial = self._pruned_copy(graph, plan)
                cand = Candidate(idx, name, tuple(kept), tuple(kept.values()), self.short_finetune_steps,
                                 self.seed + it * 1000 + idx)
                yield {"model": _pack(trial) if pool is not None else trial, "candidate": cand, "iteration": it,
                       "finetune_fn": self._finetune, "eval_fn": self._eval, "inputs": self.example_inputs,
                       "ref": self._ref, "forward_fn": self.forward_fn}
        if self._dist:
            yield from self._evaluate_shared(pool, jobs, props)
            return
        results = pool.imap(_evaluate, jobs()) if pool is not None else map(_evaluate, jobs())
        for (idx, _, _), res in zip(props, results):
            yield idx, res

    def _evaluate_shared(self, pool, jobs, props) -> Iterator[tuple[int, dict]]:
        """Candidates spread over ranks: this rank evaluates its round-robin share, metrics are gathered, the
        winner (first best in candidate order, as serially) is sent by the rank that trained it."""
        g = self._group
        world, me = D.world_size(g), D.rank(g)
        mine = [p for k, p in enumerate(props) if k % world == me]
        results = pool.imap(_evaluate, jobs(mine)) if pool is not None else map(_evaluate, jobs(mine))
        local = {}
        for (idx, _, _), res in zip(mine, results):
            local[idx] = res
        gathered: dict[int, dict] = {}
        for part in D.all_gather_object({i: {"metric": r["metric"], "seconds": r["seconds"]}
                                         for i, r in local.items()}, g):
            gathered.update(part)
        best = None
        for idx, _, _ in props:
            if best is None or gathered[idx]["metric"] > gathered[best]["metric"]:
                best = idx
        owner = [idx for idx, _, _ in props].index(best) % world
        blob = None
        if me == owner:
            m = local[best]["model"]
            blob = m if isinstance(m, bytes) else _pack(m)
        blob = D.broadcast_object(blob, src=owner, group=g)
        for idx, _, _ in props:
            yield idx, {**gathered[idx], "model": blob if idx == best else None}

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
            if self._resume_shared():
                return self.model
            if D.is_main(self._group if self._dist else None):
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
