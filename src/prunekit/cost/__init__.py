"""Cost: MACs/FLOPs per op (one formula table), parameter counts, latency measurement."""
from .count import ModuleStats, Stats, count
from .flops import MACS, op_macs
from .latency import LatencyResult, LatencyStats, latency
from .latency_model import BackendUnavailable, LatencyModel, Timing

__all__ = ["MACS", "BackendUnavailable", "LatencyModel", "Timing", "LatencyResult", "LatencyStats", "ModuleStats", "Stats", "count", "latency", "op_macs"]
