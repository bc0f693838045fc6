"""Compatibility module: the capture package was split by concern (issue 12).

records (tape data model) · kernels (meta-kernel cache) · inputs (example inputs/outputs) · views (meta/real views
of a model) · recorder (the dispatch-mode recorder, SDPA/MHA markers, capture) · trace (shape/scalar traces).
Import from ``prunekit.capture`` instead; this module re-exports every name it used to define.
"""
# ruff: noqa: F401
from .records import CaptureError, OpRecord, TNode, TRef, Tape, _collect_refs, log
from .kernels import _LEAF_OK, _META_CACHE, _META_CACHE_MAX, _NoKey, _OPINFO, _OpInfo, _SKIP, _meta_call, _op_info, _sig
from .inputs import HF_AUXILIARY_OUTPUTS, _is_hf_model_output, _model_device, call_model, eval_mode, flatten_outputs, normalize_inputs
from .views import _ATOMS, _MISSING, _MODULE_KEYS, _SNAP_DEPTH, _fc, _meta_attr, _meta_inputs, _no_mha_fastpath, _real_attr, _swapped_state, meta_view, preserved_modules, tensor_view
from .recorder import _MHA_ARGS, _Recorder, _SDPAMarker, _SDPA_SCALE_ARGS, _capture_once, capture, module_stack_hooks
from .trace import _SDPAScales, _ShapeTrace, _out_shapes, trace_scalars, trace_shapes
