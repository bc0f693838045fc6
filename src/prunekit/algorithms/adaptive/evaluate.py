"""Candidate evaluation for :class:`~prunekit.AdaptivePruner`: what a proposal is (:class:`Candidate`) and how
one is fine-tuned and scored, in this process or in a spawned worker (models travel pickled)."""
from __future__ import annotations

import io
import logging
import math
import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ...capture import call_model, eval_mode, flatten_outputs

log = logging.getLogger("prunekit.adaptive")


@dataclass(frozen=True)
class Candidate:
    """What ``finetune_fn(model, iteration, candidate)`` is told about the proposal it fine-tunes."""

    index: int  # position among this iteration's candidates (also part of its seed)
    name: str  # source module(s) of the group, or the block's module prefix
    groups: tuple[int, ...]  # group ids in this iteration's analysis
    kept: tuple[int, ...]  # units each of those groups keeps
    steps: int | None  # ``short_finetune_steps`` of the pruner (None: finetune_fn decides)
    seed: int


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
