"""prunekit: structured pruning for any PyTorch model.

    graph = pk.analyze(model, example_inputs)
    pk.prune(model, graph, {group.id: units_to_drop})

or, with a criterion and a target:

    pk.Pruner(model, example_inputs, "l2", pk.FlopsTarget(0.5)).prune()
"""
from . import importance
from .algorithms import (AdaptivePruner, ChannelRatio, FlopsTarget, LatencyTarget, LearnedPruning, ParamsTarget,
                         Pruner, SlicePruning, TrainingPruner, keep_masked, masked_to_pruned, rebuild_optimizer)
from .capture import CaptureError
from .graph import PruneGraph, analyze
from .importance import Criterion, get_criterion
from .io import CheckpointError, ExportError, export, load, load_state_dict_pruned, save
from .metrics import LatencyResult, Stats, count, latency
from .schedules import AGP, Geometric, Linear, LotteryTicket, OneShot, get_schedule, prune_iteratively
from .spaces import Group
from .surgery import PruningError, VerificationError, apply_masks, mask, prune, unmask

__version__ = "0.1.0"

__all__ = [
    # core pipeline
    "CaptureError", "Group", "PruneGraph", "PruningError", "VerificationError", "analyze", "apply_masks", "mask",
    "prune", "unmask",
    # measuring, saving, exporting
    "LatencyResult", "Stats", "count", "latency", "CheckpointError", "ExportError", "export", "load",
    "load_state_dict_pruned", "save",
    # criteria, targets, the pruner, schedules
    "Criterion", "get_criterion", "importance", "ChannelRatio", "FlopsTarget", "LatencyTarget", "ParamsTarget",
    "Pruner", "AGP", "Geometric", "Linear", "LotteryTicket", "OneShot", "get_schedule", "prune_iteratively",
    # training-time pruning, learned gates, slices, adaptive search
    "TrainingPruner", "keep_masked", "masked_to_pruned", "rebuild_optimizer", "LearnedPruning", "SlicePruning",
    "AdaptivePruner",
    "__version__",
]
