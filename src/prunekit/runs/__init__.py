"""Long runs: the resumable workdir (atomic JSON state, checkpoints, resume checks) that every long-running
algorithm uses (``prune_iteratively``, ``AdaptivePruner``, ``TrainingPruner`` checkpoints).

Imports only io and surgery, so schedules and algorithms can use it."""
from .workdir import ResumeError, Workdir, model_info, read_torch, write_torch

__all__ = ["ResumeError", "Workdir", "model_info", "read_torch", "write_torch"]
