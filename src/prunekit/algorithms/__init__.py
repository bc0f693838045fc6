"""Algorithms on top of the core: the pruner facade and its targets, training-time pruning (masks, optimizer
rebuild, regularizers), learned gates, slice pruning and NetAdapt-style adaptive search."""
from .adaptive import AdaptivePruner
from .learned import LearnedPruning
from .optim import rebuild_optimizer, remember_param_names
from .pruner import Pruner, group_key
from .regularizers import BNSlimming, ChannelReg, GroupLasso, GrowingReg, Regularizer, l2_histograms
from .slices import SlicePruning
from ..plan.targets import ChannelRatio, FlopsTarget, LatencyTarget, ParamsTarget, Target, as_target
from .training import MaskHook, TrainingPruner, keep_masked, masked_to_pruned

__all__ = ["AdaptivePruner", "BNSlimming", "ChannelRatio", "ChannelReg", "FlopsTarget", "GroupLasso", "GrowingReg",
           "LatencyTarget", "LearnedPruning", "MaskHook", "ParamsTarget", "Pruner", "Regularizer", "SlicePruning",
           "Target", "TrainingPruner", "as_target", "group_key", "keep_masked", "l2_histograms", "masked_to_pruned",
           "rebuild_optimizer", "remember_param_names"]
