"""``pk.hf.perplexity``: held-out perplexity of a causal LM, to compare a model before and after pruning."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["perplexity"]


def _batches(token_batches: Any, batch_size: int) -> Iterable[dict]:
    if isinstance(token_batches, torch.Tensor):
        if token_batches.dim() != 2:
            raise ValueError(f"perplexity: a tensor of token ids must be (N, L), got shape {tuple(token_batches.shape)}")
        token_batches = list(token_batches.split(batch_size))
    for b in token_batches:
        if isinstance(b, torch.Tensor):
            yield {"input_ids": b if b.dim() == 2 else b.unsqueeze(0)}
        elif isinstance(b, dict) and "input_ids" in b:
            yield b
        else:
            raise TypeError("perplexity: batches must be (N, L) tensors of token ids or dicts with input_ids "
                            f"(and attention_mask), got {type(b).__name__}")


@torch.no_grad()
def perplexity(model: nn.Module, token_batches: Any, *, batch_size: int = 8) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over ``token_batches``.

    ``token_batches``: an ``(N, L)`` tensor of token ids (split into ``batch_size`` rows), or an iterable of
    such tensors or of dicts with ``input_ids`` and optionally ``attention_mask`` (padding positions, mask 0,
    are neither predicted nor counted).  Every token after the first of each row is predicted from the ones
    before it (one forward per batch, no KV cache).  The model's train/eval mode is restored.
    """
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for b in _batches(token_batches, batch_size):
            ids = b["input_ids"]
            mask = b.get("attention_mask")
            kw = {"attention_mask": mask} if mask is not None else {}
            out = model(input_ids=ids, use_cache=False, **kw)
            logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1].float()
            target = ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            if mask is not None:
                keep = mask[:, 1:].reshape(-1).bool()
                nll = nll[keep]
            total += float(nll.sum())
            count += nll.numel()
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("perplexity: no token to predict (rows need at least 2 unmasked tokens)")
    return math.exp(total / count)
