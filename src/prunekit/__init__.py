"""prunekit: structured pruning for any PyTorch model.

    graph = pk.analyze(model, example_inputs)
    pk.prune(model, graph, {group.id: units_to_drop})

or, with a criterion and a target:

    pk.Pruner(model, example_inputs, "l2", pk.FlopsTarget(0.5)).prune()
"""
from .plan import importance
from .algorithms import (AdaptivePruner, ChannelRatio, FlopsTarget, LatencyTarget, LearnedPruner, LearnedPruning,
                         ParamsTarget, Pruner, SlicePruner, SlicePruning, TrainingPruner, keep_masked, masked_to_pruned,
                         rebuild_optimizer)
from .algorithms import DepthPruner, DepthResult, DistillResult, distill
from .capture import CaptureError
from .graph import PruneGraph, analyze
from .plan.importance import Criterion, get_criterion
from .io import CheckpointError, ExportError, export, load, load_state_dict_pruned, save
from .cost import LatencyResult, Stats, count, latency
from .cost.latency_model import BackendUnavailable, LatencyModel, measure_many
from .plan.schedules import AGP, Geometric, Linear, LotteryTicket, OneShot, get_schedule, prune_iteratively
from .analysis import Group
from .analysis.ops.registry import register_op, unregister_op
from .analysis.modules import ModuleSpec, register_module, unregister_module
from .analysis.experts import ExpertSpec, register_experts, unregister_experts
from . import hf  # noqa: F401  (registers transformers' MoE blocks by name; imports no transformers)
from . import detection  # noqa: F401  (ultralytics / torchvision detector conventions; imports neither)
from .surgery import PruningError, VerificationError, apply_masks, mask, prune, unmask

from ._version import __version__  # noqa: E402

__all__ = [
    # core pipeline
    "CaptureError", "Group", "PruneGraph", "PruningError", "VerificationError", "analyze", "apply_masks", "mask",
    "prune", "unmask",
    # teaching prunekit an op
    "register_op", "unregister_op",
    # extending: teach prunekit a custom layer
    "ModuleSpec", "register_module", "unregister_module", "ExpertSpec", "register_experts", "unregister_experts",
    # measuring, saving, exporting
    "LatencyResult", "Stats", "count", "latency", "LatencyModel", "measure_many", "BackendUnavailable", "CheckpointError", "ExportError", "export", "load",
    "load_state_dict_pruned", "save",
    # criteria, targets, the pruner, schedules
    "Criterion", "get_criterion", "importance", "ChannelRatio", "FlopsTarget", "LatencyTarget", "ParamsTarget",
    "Pruner", "AGP", "Geometric", "Linear", "LotteryTicket", "OneShot", "get_schedule", "prune_iteratively",
    # training-time pruning, learned gates, slices, adaptive search
    "TrainingPruner", "keep_masked", "masked_to_pruned", "rebuild_optimizer", "LearnedPruner", "SlicePruner",
    "AdaptivePruner", "LearnedPruning", "SlicePruning",  # deprecated names of LearnedPruner, SlicePruner
    # depth pruning, recovery
    "DepthPruner", "DepthResult", "DistillResult", "distill",
    "__version__",
]


def _old_module_paths() -> None:
    """Deprecated module paths of the first layout (``prunekit.spaces``, ``.metrics``, ``.importance``,
    ``.schedules``, ``.algorithms.targets``) keep importing: they name the moved modules."""
    import importlib
    import sys
    old = {"spaces": "analysis", "spaces.core": "analysis.spaces", "spaces.rules": "analysis.rules",
           "spaces.graph": "analysis.analyzer", "metrics": "cost", "metrics.flops": "cost.flops",
           "metrics.count": "cost.count", "metrics.latency": "cost.latency", "importance": "plan.importance",
           "importance.base": "plan.importance.base", "importance.weight": "plan.importance.weight",
           "importance.gradient": "plan.importance.gradient", "schedules": "plan.schedules",
           "schedules.base": "plan.schedules.base", "schedules.iterative": "plan.schedules.iterative",
           "algorithms.targets": "plan.targets"}
    for o, n in old.items():
        mod = sys.modules.setdefault(f"{__name__}.{o}", importlib.import_module(f"{__name__}.{n}"))
        parent, _, leaf = o.rpartition(".")
        if parent and not hasattr(sys.modules[f"{__name__}.{parent}"], leaf):
            setattr(sys.modules[f"{__name__}.{parent}"], leaf, mod)  # ``import prunekit.spaces.core`` resolves


_old_module_paths()


def _hf_after_prune(model) -> None:
    """After a prune: a transformers model's config follows its modules (``prunekit.hf.sync_config``).
    Nothing happens unless transformers is already imported (the core never imports it)."""
    import sys
    tf = sys.modules.get("transformers")
    if tf is None:
        return
    try:
        base = tf.PreTrainedModel
    except Exception:  # transformers disabled its PyTorch models (too old a torch)
        return
    if isinstance(model, base):
        from .hf import after_prune
        after_prune(model)


from .surgery import register_post_prune_hook as _register_post_prune_hook  # noqa: E402

_register_post_prune_hook(_hf_after_prune)


def __getattr__(name: str):
    if name == "hf":  # ``pk.hf``: imported on first use (it imports transformers)
        import importlib
        return importlib.import_module(f"{__name__}.hf")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
