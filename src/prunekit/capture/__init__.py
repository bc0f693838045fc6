from .tape import CaptureError, OpRecord, Tape, TNode, TRef, call_model, capture, eval_mode, flatten_outputs, normalize_inputs

__all__ = ["CaptureError", "OpRecord", "Tape", "TNode", "TRef", "call_model", "capture", "eval_mode",
           "flatten_outputs", "normalize_inputs"]
