"""Pruning schedules (one-shot, linear, AGP, lottery ticket, geometric) and ``prune_iteratively``.

    schedule = pk.AGP(steps=5)                     # or pk.get_schedule("agp", steps=5)
    schedule.sparsities(0.5)                       # cumulative sparsity after each step, ends at 0.5
    model, history = pk.prune_iteratively(pruner, schedule, finetune_fn, eval_fn, workdir="run")
"""
from .base import AGP, SCHEDULES, Geometric, Linear, LotteryTicket, OneShot, Schedule, get_schedule
from .iterative import IterativeResult, ResumeError, model_fingerprint, prune_iteratively

__all__ = ["AGP", "Geometric", "IterativeResult", "Linear", "LotteryTicket", "OneShot", "ResumeError", "SCHEDULES", "Schedule",
           "get_schedule", "model_fingerprint", "prune_iteratively"]
