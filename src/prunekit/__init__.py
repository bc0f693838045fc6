"""prunekit: structured pruning for any PyTorch model.

    graph = pk.analyze(model, example_inputs)
    pk.prune(model, graph, {group.id: units_to_drop})
"""
from .capture import CaptureError
from .graph import PruneGraph, analyze
from .io import CheckpointError, ExportError, export, load, load_state_dict_pruned, save
from .metrics import LatencyResult, Stats, count, latency
from .spaces import Group
from .surgery import PruningError, VerificationError, apply_masks, mask, prune, unmask
from . import importance
from .importance import Criterion, get_criterion

__version__ = "0.1.0"

__all__ = ["CaptureError", "Group", "PruneGraph", "PruningError", "VerificationError", "analyze", "apply_masks",
           "mask", "prune", "unmask", "__version__"]
__all__ += ["LatencyResult", "Stats", "count", "latency"]
__all__ += ["CheckpointError", "ExportError", "export", "load", "load_state_dict_pruned", "save"]
__all__ += ["Criterion", "get_criterion", "importance"]
from .algorithms import ChannelRatio, FlopsTarget, LatencyTarget, ParamsTarget, Pruner  # noqa: E402

__all__ += ["ChannelRatio", "FlopsTarget", "LatencyTarget", "ParamsTarget", "Pruner"]
from .schedules import AGP, Geometric, Linear, LotteryTicket, OneShot, get_schedule, prune_iteratively  # noqa: E402

__all__ += ["AGP", "Geometric", "Linear", "LotteryTicket", "OneShot", "get_schedule", "prune_iteratively"]
from .algorithms import TrainingPruner, keep_masked, masked_to_pruned, rebuild_optimizer  # noqa: E402

__all__ += ["TrainingPruner", "keep_masked", "masked_to_pruned", "rebuild_optimizer"]
from .algorithms import AdaptivePruner  # noqa: E402

__all__ += ["AdaptivePruner"]
from .algorithms import LearnedPruning, SlicePruning  # noqa: E402

__all__ += ["LearnedPruning", "SlicePruning"]
