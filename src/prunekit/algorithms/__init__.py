"""Algorithms on top of the core: the pruner facade and its targets, training-time pruning (masks, optimizer
rebuild, regularizers), learned gates, slice pruning and NetAdapt-style adaptive search."""
from .adaptive import AdaptivePruner
from .depth import DepthPruner, DepthResult
from .distillation import DistillResult, distill, distill_loss
from .learned import GateLosses, LearnedPruner, LearnedPruning
from .optim import rebuild_optimizer, remember_param_names
from .pruner import Pruner, group_key
from .regularizers import BNSlimming, ChannelReg, GroupLasso, GrowingReg, Regularizer, l2_histograms
from .slices import SlicePruner, SlicePruning
from ..plan.targets import ChannelRatio, FlopsTarget, LatencyTarget, ParamsTarget, Target, as_target
from .training import MaskHook, TrainingPruner, keep_masked, masked_to_pruned

__all__ = ["AdaptivePruner", "DepthPruner", "DepthResult", "DistillResult", "distill", "distill_loss", "BNSlimming", "ChannelRatio", "ChannelReg", "FlopsTarget", "GateLosses", "GroupLasso",
           "GrowingReg", "LatencyTarget", "LearnedPruner", "LearnedPruning", "MaskHook", "ParamsTarget", "Pruner",
           "Regularizer", "SlicePruner", "SlicePruning", "Target", "TrainingPruner", "as_target", "group_key",
           "keep_masked", "l2_histograms", "masked_to_pruned", "rebuild_optimizer", "remember_param_names"]
