"""Saving, loading and exporting pruned models.

    pk.save(model, "pruned.safetensors")                 # state dict + pruning record, checksummed
    model = pk.load("pruned.safetensors", build_model)   # replay the record on a fresh original model
    pk.load_state_dict_pruned(fresh, state_dict, example_inputs=x)  # plain pruned state dict, no record
    pk.export(model, x, "model.pt2")                     # or format="onnx"; checked after writing
"""
from .checkpoint import Checkpoint, CheckpointError, load, read_checkpoint, save
from .export import ExportError, export
from .statedict import IncompatibleKeys, load_state_dict_pruned

__all__ = ["Checkpoint", "CheckpointError", "ExportError", "IncompatibleKeys", "export", "load",
           "load_state_dict_pruned", "read_checkpoint", "save"]
