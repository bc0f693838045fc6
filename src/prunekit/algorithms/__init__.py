"""Algorithms on top of the core: the pruner facade and its targets (schedules, regularizers, learned gates and
NetAdapt build on the same pieces)."""
from .pruner import Pruner, group_key
from .targets import ChannelRatio, FlopsTarget, LatencyTarget, ParamsTarget, Target, as_target

__all__ = ["ChannelRatio", "FlopsTarget", "LatencyTarget", "ParamsTarget", "Pruner", "Target", "as_target", "group_key"]
