"""``prune_iteratively``: prune along a schedule, fine-tune and evaluate between steps, resume after a crash.

    pruner = pk.Pruner(model, x, "l2", pk.FlopsTarget(0.5))
    model, history = pk.prune_iteratively(pruner, pk.AGP(steps=5), finetune_fn=train_one_epoch,
                                          eval_fn=accuracy, workdir="runs/agp")

Every step ``t = 1 .. n``: ``pruner.step(s_t)`` (in place, verified); lottery-ticket rewinding if the schedule
asks for it; ``finetune_fn(model, t)``; ``eval_fn(model)``; a history entry; with ``workdir``, a checkpoint
of the model (``pk.save``: state dict + pruning record) and a JSON state file, both written atomically; then
``callback(entry)``.

Resuming: call again with the same arguments, a *freshly built original model* (the same architecture, config
and starting weights) in a *new* ``Pruner``, and the same ``workdir``.  The last checkpoint's record is
replayed on the new model, its weights loaded, the history restored, and the run continues with the next
step.  Given a deterministic ``finetune_fn`` (or ``seed=...`` for everything that draws from torch's global
generator) the final model is the same as that of an uninterrupted run.  Optimizer state and anything else
``finetune_fn`` keeps outside the model is the caller's to restore.

Workdir layout: ``state.json`` (format, step count, schedule, target, pruner settings, model fingerprint,
history), ``step_<t>.safetensors`` per finished step (``.pt`` without safetensors), and for lottery
rewinding ``rewind_init.pt`` / ``rewind_early.pt`` (the weights rewound to).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import nn

from ..._callbacks import callback as _callback
from ...io.checkpoint import canonical_json as _canon, check_state, model_fingerprint
from ...runs.progress import metric_value as _metric, progress_bar as _progress_bar
from ...runs.workdir import ResumeError, Workdir, model_info
from ...surgery import RECORD_ATTR, slice_state_dict
from .base import LotteryTicket, Schedule, get_schedule

log = logging.getLogger("prunekit.schedules")

STATE_FILE = "state.json"
FORMAT = "prunekit.iterative"
FORMAT_VERSION = 1

__all__ = ["IterativeResult", "ResumeError", "model_fingerprint", "prune_iteratively"]


class IterativeResult(NamedTuple):
    """What :func:`prune_iteratively` returns; unpacks as ``model, history = ...`` as before."""

    model: nn.Module
    history: list[dict]  # one entry per step (see prune_iteratively)


def _workdir(path: Path) -> Workdir:
    return Workdir(path, FORMAT, version=FORMAT_VERSION, what="a prunekit iterative-pruning", error=ResumeError,
                   state_file=STATE_FILE)


# ---------------------------------------------------------------- helpers
def _snapshot(model: nn.Module) -> dict[str, Any]:
    """The weights to rewind to, with the number of pruning-record steps they already include."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "record_len": len(getattr(model, RECORD_ATTR, None) or [])}


def _save_snapshot(wd: Workdir, name: str, snap: Mapping[str, Any]) -> None:
    wd.write_torch(name, {"state": dict(snap["state"]), "record_len": int(snap["record_len"])})


def _load_snapshot(wd: Workdir, name: str) -> dict[str, Any]:
    obj = wd.read_torch(name, "the weights for lottery-ticket rewinding are missing from the workdir; the workdir "
                              "is incomplete: start over with resume=False or use another workdir")
    return {"state": obj["state"], "record_len": int(obj["record_len"])}


def _rewind(model: nn.Module, snap: Mapping[str, Any]) -> None:
    """Reset the surviving weights (and buffers) to ``snap``, sliced like the pruning done since it was taken."""
    record = getattr(model, RECORD_ATTR, None) or []
    state = slice_state_dict(snap["state"], record[snap["record_len"]:])
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"lottery-ticket rewinding failed: the saved weights do not fit the pruned model ({e}). "
                           "Was the model changed outside the pruner between steps?") from None


def _target_info(target: Any) -> dict[str, Any]:
    return {"type": type(target).__name__, "kind": target.kind, "ratio": float(target.ratio),
            "sparsity": float(target.sparsity)}


def _pruner_info(pruner: Any) -> dict[str, Any]:
    return {"criterion": getattr(pruner.criterion, "name", type(pruner.criterion).__name__),
            "global_pruning": pruner.global_pruning, "round_to": pruner.round_to, "max_ratio": pruner.max_ratio,
            "ignore": list(pruner.ignore), "ratios": dict(pruner.ratios), "prune_outputs": bool(pruner.prune_outputs)}


# ---------------------------------------------------------------- resume
def _check_resume(state: Mapping[str, Any], config: Mapping[str, Any], model: nn.Module,
                  start_record: list, wd: Workdir) -> None:
    wd.check_config(state["config"], config, "Pass the same schedule, steps, target and pruner settings to resume, "
                    "or resume=False to start over, or another workdir.")
    saved = state["model"]
    if _canon(start_record) != _canon(saved["start_record"]):
        n_now, n_then = len(start_record), len(saved["start_record"])
        raise ResumeError(
            f"{wd.path}: pruner.model is already pruned ({n_now} pruning step(s) recorded; the saved run started "
            f"from {n_then}). Resuming replays the saved checkpoint on a freshly built original model: build the "
            "model again (same architecture, config and starting weights) and pass it to a new Pruner.")
    wd.check_model(saved, model, "pruner.model is not the model this run was started with",
                   "Build the same architecture and config, or use another workdir (or resume=False).")


def _restore(pruner: Any, wd: Workdir, name: str, start_len: int) -> None:
    """Rebuild the pruned model from checkpoint ``name`` on ``pruner.model`` (checked before anything changes)."""
    wd.restore(pruner.model, name, start_len)
    pruner.invalidate()  # the cached analysis describes the unpruned model


_RUN_FILES = ("step_*.safetensors", "step_*.pt", "rewind_*.pt")


# ---------------------------------------------------------------- main loop
def prune_iteratively(pruner: Any, schedule: Schedule | str = "linear", finetune_fn: Callable | None = None,
                      eval_fn: Callable | None = None, *, steps: int | None = None,
                      workdir: str | Path | None = None, callback: Callable | None = None, progress: bool = True,
                      resume: bool = True, seed: int | None = None,
                      rewind_state: Mapping[str, torch.Tensor] | None = None) -> IterativeResult:
    """Prune ``pruner.model`` to ``pruner.target`` in steps along ``schedule``; return an
    :class:`IterativeResult` ``(model, history)``.

    Args:
        pruner: a :class:`prunekit.Pruner`; its target's ``sparsity`` is the schedule's final sparsity.
        schedule: a :class:`Schedule` or a name for :func:`get_schedule` (``"linear"``, ``"agp"``, ...).
        finetune_fn: after each pruning step, offered ``(model, step)`` (steps count from 1); it takes what
            it needs: ``f(model)``, ``f(model, step)`` (any name for the second parameter), ``f(model, **kw)``
            or ``f(*args)``; further parameters need a default (``f(model, epochs=1)`` keeps its 1).
            Checked when called: a function that cannot be called so raises ``TypeError`` before any pruning.
        eval_fn: ``eval_fn(model) -> float | dict[str, float]`` after fine-tuning; stored as ``metric``.
            Further parameters need a default (``f(model, batches=10)``); checked like ``finetune_fn``.
        steps: number of pruning steps (default: the schedule's ``steps``; :class:`OneShot` is always one).
        workdir: folder for per-step checkpoints and the resume state (see the module docstring).
        callback: ``callback(entry)`` after each step with a copy of the history entry; returning ``False``
            stops after that step (a later call with the same workdir continues).  Checked like ``finetune_fn``.
        progress: draw a progress bar (rich or tqdm, on stderr) when one of them is installed.
        resume: continue the run saved in ``workdir``; ``False`` discards it and starts over.
        seed: if given, ``torch.manual_seed(seed + step)`` before each step, so random criteria and
            fine-tuning that draw from torch's global generator repeat exactly after a resume.
        rewind_state: for :class:`LotteryTicket` with ``rewind="init"``: the state dict (of the model as
            it is now, e.g. its initialisation before dense training) to rewind to; default: the model's
            weights at the start of this call.

    History entries: ``step``, ``sparsity`` (scheduled), ``macs``, ``params``, ``macs_ratio`` and
    ``params_ratio`` (of the original), ``units_removed``, ``groups_pruned``, ``rewound``, ``metric``
    (``None`` without ``eval_fn``), ``seconds`` (the step's wall time), and ``checkpoint`` with a workdir.
    """
    schedule = get_schedule(schedule)
    finetune = _callback(finetune_fn, "finetune_fn", "prune_iteratively", ("model", "step"))
    evaluate = _callback(eval_fn, "eval_fn", "prune_iteratively", ("model",))
    on_step = _callback(callback, "callback", "prune_iteratively", ("entry",))
    target = pruner.target
    sparsities = schedule.sparsities(target.sparsity, steps)
    n = len(sparsities)
    model = pruner.model
    rewind = schedule.rewind if isinstance(schedule, LotteryTicket) else None
    if rewind == "early" and schedule.rewind_step >= n:
        raise ValueError(f"LotteryTicket(rewind='early', rewind_step={schedule.rewind_step}) needs more than "
                         f"{schedule.rewind_step} steps (got {n}): the weights are saved after step rewind_step's "
                         "fine-tuning and rewound to from the next step on; lower rewind_step or add steps")
    if rewind_state is not None and rewind != "init":
        raise ValueError("prune_iteratively: rewind_state is only used by LotteryTicket(rewind='init')")
    config = {"schedule": {"name": schedule.name, **{k: v for k, v in schedule.params().items() if k != "steps"}},
              "steps": n, "sparsities": sparsities, "target": _target_info(target), "pruner": _pruner_info(pruner),
              "seed": seed}
    start_record = Workdir.record(model)
    wd = _workdir(Path(workdir)) if workdir is not None else None
    history: list[dict] = []
    done = 0
    snaps: dict[str, dict] = {}
    state: dict[str, Any] | None = None
    if wd is not None and wd.has_state():
        if resume:
            state = wd.read_state(corrupt_fix="resume=False starts over")
        else:
            log.warning("prune_iteratively: resume=False, discarding the run saved in %s", wd.path)
            wd.clear(_RUN_FILES)

    if state is not None:
        _check_resume(state, config, model, start_record, wd)
        done = int(state["done"])
        history = list(state["history"])
        if state.get("base_latency") is not None:
            pruner._base_latency = float(state["base_latency"])  # measured on the original model
        if done:
            _restore(pruner, wd, state["checkpoint"], len(start_record))
        pruner.history.extend(state["pruner_history"])
        if rewind == "init":
            snaps["init"] = _load_snapshot(wd, "rewind_init.pt")
        if rewind == "early" and done >= schedule.rewind_step:
            snaps["early"] = _load_snapshot(wd, "rewind_early.pt")
        log.info("prune_iteratively: resuming %s after step %d of %d", wd.path, done, n)
    else:
        if target.kind == "latency":
            _ = pruner.base_latency  # measure the baseline before the model changes
        if rewind == "init":
            if rewind_state is None:
                snaps["init"] = _snapshot(model)
            else:
                check_state("rewind_state", {k: v.shape for k, v in model.state_dict().items()}, rewind_state, True)
                snaps["init"] = {"state": {k: v.detach().clone() for k, v in rewind_state.items()},
                                 "record_len": len(start_record)}
        if wd is not None:
            wd.mkdir()
            if rewind == "init":
                _save_snapshot(wd, "rewind_init.pt", snaps["init"])
            state = wd.new_state(config=config, model=model_info(model, shapes=True, start_record=start_record),
                                 base_latency=pruner._base_latency if target.kind == "latency" else None,
                                 done=0, checkpoint=None, history=[], pruner_history=[])
            wd.write_state(state)

    if done >= n:
        log.info("prune_iteratively: all %d steps already done in %s", n, wd.path)
        return IterativeResult(model, [dict(e) for e in history])

    desc = f"{schedule.name} pruning"
    with _progress_bar(progress, n, done, desc) as advance:
        for t in range(done + 1, n + 1):
            s = sparsities[t - 1]
            t0 = time.perf_counter()
            if seed is not None:
                torch.manual_seed(seed + t)
            pruner.step(s)
            p_entry = pruner.history[-1]
            snap = snaps.get(rewind) if rewind else None
            if snap is not None:
                _rewind(model, snap)
            if finetune is not None:
                finetune(model, t)
            if rewind == "early" and t == schedule.rewind_step:
                snaps["early"] = _snapshot(model)
                if wd is not None:
                    _save_snapshot(wd, "rewind_early.pt", snaps["early"])
            metric = _metric(evaluate(model)) if evaluate is not None else None
            macs, params = int(p_entry["macs"]), int(p_entry["params"])
            entry = {"step": t, "sparsity": s, "macs": macs, "params": params,
                     "macs_ratio": macs / max(1, pruner.base_macs), "params_ratio": params / max(1, pruner.base_params),
                     "units_removed": int(p_entry["units_removed"]), "groups_pruned": int(p_entry["groups_pruned"]),
                     "rewound": snap is not None, "metric": metric, "seconds": time.perf_counter() - t0}
            if wd is not None:
                entry["checkpoint"] = wd.save_checkpoint(model, f"step_{t}.safetensors", {"step": t, "sparsity": s})
            history.append(entry)
            if wd is not None:
                state.update(done=t, checkpoint=entry["checkpoint"], history=history,
                             pruner_history=json.loads(json.dumps(pruner.history[-t:])))
                wd.commit(state, checkpoint=entry["checkpoint"])
            log.info("prune_iteratively step %d/%d: sparsity %.4f, MACs %.4g (%.1f%%), params %.4g, metric %s, %.2fs",
                     t, n, s, macs, 100 * entry["macs_ratio"], params, metric, entry["seconds"])
            advance(f"s={s:.3f}")
            if on_step is not None and on_step(dict(entry)) is False:
                log.info("prune_iteratively: callback stopped the run after step %d of %d", t, n)
                break
    return IterativeResult(model, [dict(e) for e in history])
