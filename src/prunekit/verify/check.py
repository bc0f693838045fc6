"""The post-prune check: after every removal the example input runs again and is compared with the
reference (the original with the removed units zeroed, for exact groups; output shapes for the rest)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from ..capture import call_model, eval_mode, flatten_outputs


class PruningError(RuntimeError):
    """A plan could not be applied; the model was left unchanged."""


class VerificationError(PruningError):
    """The pruned model did not reproduce the masked original; the model was restored."""



def run_outputs(model: nn.Module, graph, state: dict | None = None) -> list[torch.Tensor]:
    """The flattened outputs of one forward on the graph's example inputs, in eval mode without grad;
    ``state`` (fqn -> tensor) is swapped in for the run (the masked reference of exact groups)."""
    with eval_mode(model), torch.no_grad():
        if state:
            with _reparametrize_module(model, state, tie_weights=False, strict=False):
                out = call_model(model, graph.example_inputs, graph.forward_fn)
        else:
            out = call_model(model, graph.example_inputs, graph.forward_fn)
    return flatten_outputs(out)[0]


def compare_outputs(ref: list[torch.Tensor], out: list[torch.Tensor], rtol: float, atol: float,
                    outputs_may_shrink: bool = False) -> str | None:
    """Why ``out`` does not match ``ref`` (count, shapes, values to ``rtol``/``atol`` scaled by the largest
    reference value), or None; ``outputs_may_shrink``: an output may lose channels (``prune_outputs=True``).
    An infinite ``rtol`` or ``atol`` checks count and shapes only (inexact groups): ``allclose`` with an
    infinite ``rtol`` is False wherever the output is exactly 0 (``inf * 0`` is NaN), e.g. after a ReLU."""
    values = math.isfinite(rtol) and math.isfinite(atol)
    if len(ref) != len(out):
        return f"the model now returns {len(out)} tensors instead of {len(ref)}"
    for i, (a, b) in enumerate(zip(ref, out)):
        if outputs_may_shrink and a.shape != b.shape and a.dim() == b.dim():
            continue  # prune_outputs=True: this output was allowed to lose channels
        if a.shape != b.shape:
            return f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        if values and a.is_floating_point() and a.device.type != "meta":
            scale = float(a.abs().max()) if a.numel() else 1.0
            if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol * max(1.0, scale)):
                err = float((a.float() - b.float()).abs().max())
                return f"output {i} differs from the masked original by up to {err:.3g} (scale {scale:.3g})"
    return None


def check_finite(ref: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    """Raise :class:`VerificationError` if the pruned model produces non-finite values the original did not."""
    for o in out:
        if o.is_floating_point() and o.device.type != "meta" and not torch.isfinite(o).all():
            if all(torch.isfinite(r).all() for r in ref if r.is_floating_point()):
                raise VerificationError("pruned model produces non-finite values")
