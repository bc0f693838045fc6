"""Algorithms on top of the core: the pruner facade and its targets (schedules, regularizers, learned gates and
NetAdapt build on the same pieces)."""
from .pruner import Pruner, group_key
from .targets import ChannelRatio, FlopsTarget, LatencyTarget, ParamsTarget, Target, as_target

__all__ = ["ChannelRatio", "FlopsTarget", "LatencyTarget", "ParamsTarget", "Pruner", "Target", "as_target", "group_key"]
from .optim import rebuild_optimizer, remember_param_names  # noqa: E402
from .regularizers import BNSlimming, ChannelReg, GroupLasso, GrowingReg, Regularizer, l2_histograms  # noqa: E402
from .training import MaskHook, TrainingPruner, keep_masked, masked_to_pruned  # noqa: E402

__all__ += ["BNSlimming", "ChannelReg", "GroupLasso", "GrowingReg", "MaskHook", "Regularizer", "TrainingPruner",
            "keep_masked", "l2_histograms", "masked_to_pruned", "rebuild_optimizer", "remember_param_names"]
from .adaptive import AdaptivePruner  # noqa: E402

__all__ += ["AdaptivePruner"]
from .learned import LearnedPruning  # noqa: E402
from .slices import SlicePruning  # noqa: E402

__all__ += ["LearnedPruning", "SlicePruning"]
