"""Export a (pruned) model for deployment without its source code, and check the exported file."""
from __future__ import annotations

import importlib.util
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..capture import call_model, eval_mode, flatten_outputs, normalize_inputs
from .checkpoint import PathLike, atomic_path

log = logging.getLogger("prunekit.io")


class ExportError(RuntimeError):
    """Exporting failed, or the exported file does not reproduce the model; nothing was written."""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _mismatch(ref: list[torch.Tensor], out: list[torch.Tensor], rtol: float, atol: float) -> str | None:
    if len(ref) != len(out):
        return f"it returns {len(out)} outputs instead of {len(ref)}"
    for i, (a, b) in enumerate(zip(ref, out)):
        if tuple(a.shape) != tuple(b.shape):
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_floating_point():
            scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
            if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol * scale):
                return f"output {i} differs by up to {float((a.float() - b.float()).abs().max()):.3g}"
        elif not torch.equal(a, b.to(a.dtype)):
            return f"output {i} differs"
    return None


def _export_torch(model: nn.Module, args: tuple, kwargs: dict, tmp: Path, kw: dict) -> Callable:
    ep = torch.export.export(model, args, kwargs, **kw)
    torch.export.save(ep, str(tmp))

    def run() -> Any:
        return flatten_outputs(torch.export.load(str(tmp)).module()(*args, **kwargs))[0]
    return run


def _export_onnx(model: nn.Module, args: tuple, kwargs: dict, tmp: Path, kw: dict) -> Callable | None:
    kw = dict(kw)
    # the dynamo-based exporter (torch's default) needs onnxscript; the TorchScript one works without it
    kw.setdefault("dynamo", _has("onnxscript"))
    params = inspect.signature(torch.onnx.export).parameters
    if kw["dynamo"] and "external_data" in params:  # torch >= 2.6
        kw.setdefault("external_data", False)  # one self-contained file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
        if kwargs and "kwargs" not in params:
            # torch < 2.5 has no kwargs= parameter: a trailing dict in args holds the keyword inputs
            torch.onnx.export(model, (*args, dict(kwargs)), str(tmp), **kw)
        elif kwargs:
            torch.onnx.export(model, args, str(tmp), kwargs=kwargs, **kw)
        else:
            torch.onnx.export(model, args, str(tmp), **kw)
    if not _has("onnx"):
        log.warning("onnx is not installed: %s was written but not checked (pip install onnx onnxruntime)", tmp)
        return None
    import onnx
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto)
    inputs = [t.detach().cpu().numpy() for t in flatten_outputs((args, kwargs))[0]]
    names = [i.name for i in proto.graph.input if i.name not in {init.name for init in proto.graph.initializer}]
    if len(names) != len(inputs):
        log.warning("ONNX graph has %d inputs for %d example tensors; checked the graph only", len(names), len(inputs))
        return None
    feed = dict(zip(names, inputs))
    if _has("onnxruntime"):
        import onnxruntime as ort
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        return lambda: [torch.as_tensor(o) for o in sess.run(None, feed)]
    from onnx.reference import ReferenceEvaluator  # pure-Python fallback: slow but dependency-free
    return lambda: [torch.as_tensor(o) for o in ReferenceEvaluator(proto).run(None, feed)]


_FORMATS = {"torch.export": _export_torch, "onnx": _export_onnx}


def export(model: nn.Module, example_inputs: Any, path: PathLike, format: str = "torch.export", *,
           check: bool = True, rtol: float = 1e-3, atol: float = 1e-4, **kw: Any) -> Path:
    """Export ``model`` (in eval mode) to ``path`` and check that the file reproduces the model's outputs.

    ``format="torch.export"`` writes a ``torch.export`` program (``.pt2``; load it with
    ``torch.export.load(path).module()``); ``format="onnx"`` writes an ONNX file (the dynamo exporter when
    ``onnxscript`` is installed, the TorchScript one otherwise; ``pip install prunekit[export]`` for all
    extras).  ``kw`` is passed to ``torch.export.export`` / ``torch.onnx.export``.

    With ``check=True`` the written file is loaded back and run on ``example_inputs`` (ONNX: with
    onnxruntime, or onnx's reference evaluator) and compared with the model to ``rtol``/``atol`` (atol
    scaled by the output's magnitude).  The file is written to a temporary and moved into place only after
    the check passes, so on :class:`ExportError` nothing is left at ``path``.
    """
    if format not in _FORMATS:
        raise ValueError(f"unknown export format {format!r}; use one of {sorted(_FORMATS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export() expects an nn.Module, got {type(model).__name__}")
    path = Path(path)
    args, kwargs = normalize_inputs(example_inputs)
    with eval_mode(model):
        with torch.no_grad():
            ref = flatten_outputs(call_model(model, example_inputs))[0]
        with atomic_path(path) as tmp:
            try:
                run = _FORMATS[format](model, args, kwargs, tmp, kw)
            except Exception as e:  # noqa: BLE001 - exporters raise many types; report them uniformly
                raise ExportError(f"{format} export of {type(model).__name__} failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}") from e
            if check and run is not None:
                with torch.no_grad():
                    msg = _mismatch(ref, run(), rtol, atol)
                if msg:
                    raise ExportError(f"the {format} file does not reproduce the model: {msg}; nothing was written")
    log.info("exported %s to %s", type(model).__name__, path)
    return path
