"""Capture: one forward pass recorded as an ATen-level tape (records, kernels, inputs, views, recorder, trace)."""
from .inputs import call_model, eval_mode, flatten_outputs, normalize_inputs
from .recorder import capture
from .records import CaptureError, OpRecord, Tape, TNode, TRef
from .trace import trace_scalars, trace_shapes
from .views import meta_view, preserved_modules, tensor_view

__all__ = ["CaptureError", "OpRecord", "Tape", "TNode", "TRef", "call_model", "capture", "eval_mode",
           "flatten_outputs", "meta_view", "normalize_inputs", "preserved_modules", "tensor_view", "trace_scalars",
           "trace_shapes"]
