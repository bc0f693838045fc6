"""Example inputs and outputs: normalising inputs, calling the model, flattening outputs, eval mode."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        raise ValueError("example_inputs is required: pass a tensor, a tuple of inputs, or a dict of keyword "
                         "inputs that the model's forward accepts (e.g. torch.randn(1, 3, 224, 224))")
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def call_model(model: nn.Module, example_inputs: Any, forward_fn: Callable | None = None):
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    args, kwargs = normalize_inputs(example_inputs)
    return model(*args, **kwargs)


# fields a transformers ``ModelOutput`` returns without being asked for, beside the main output: the encoder's last
# hidden state of an encoder-decoder model (the logits depend on it) and the KV cache.  They are not model outputs for
# prunekit (not pinned, not compared by verification).  Fields a user asks for (``output_hidden_states=True``,
# ``output_attentions=True``) and the main outputs (logits, last_hidden_state, pooler_output, loss) stay outputs; a
# forward_fn returning a field makes it an output again.
HF_AUXILIARY_OUTPUTS = frozenset({"encoder_last_hidden_state", "past_key_values"})


def _is_hf_model_output(x: Any) -> bool:
    return any(c.__name__ == "ModelOutput" and c.__module__.startswith("transformers.") for c in type(x).__mro__)


def flatten_outputs(out: Any) -> tuple[list[torch.Tensor], list[str]]:
    """Flatten a model output (tensor, tuple, dict, dataclass-like) into tensors with paths.  Of a transformers
    ``ModelOutput``, the auxiliary fields in :data:`HF_AUXILIARY_OUTPUTS` are left out."""
    res: list[torch.Tensor] = []
    paths: list[str] = []

    def rec(x, path):
        if isinstance(x, torch.Tensor):
            res.append(x)
            paths.append(path or "output")
        elif isinstance(x, dict):
            skip = HF_AUXILIARY_OUTPUTS if _is_hf_model_output(x) else ()
            for k, v in x.items():
                if k not in skip:
                    rec(v, f"{path}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                rec(v, f"{path}[{i}]")
        elif hasattr(x, "to_tuple"):
            rec(x.to_tuple(), path)
    rec(out, "")
    return res, paths


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Temporarily put every submodule in eval mode, restoring each flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, f in flags:
            m.training = f




def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")
