"""DistributedDataParallel helpers of :class:`~prunekit.TrainingPruner`: every rank takes the same decision
(scores averaged with ``all_reduce``, plans broadcast from rank 0); identities without ``torch.distributed``."""
from __future__ import annotations

from typing import Any

import torch


def _dist_world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def average_scores(scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """All-reduce (mean) per-group scores across ranks when ``torch.distributed`` is initialised."""
    # scores computed from FSDP2-sharded parameters are DTensors: gather them (every rank takes part)
    scores = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in scores.items()}
    world = _dist_world()
    if world == 1 or not scores:
        return scores
    keys = sorted(scores)
    flat = torch.cat([scores[k].float().reshape(-1) for k in keys])
    backend = torch.distributed.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buf = flat.to(dev)
    torch.distributed.all_reduce(buf)
    buf = (buf / world).cpu()
    out, pos = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = buf[pos:pos + n].reshape(scores[k].shape)
        pos += n
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (identity without ``torch.distributed``)."""
    if _dist_world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
