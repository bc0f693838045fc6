"""``torch.distributed`` helpers shared by the criteria, the search and the training-time pruners.

Every helper is an identity (or the single-process answer) when ``torch.distributed`` is not initialised, so
code calls them unconditionally.  ``group`` everywhere is a process group (``None``: the default group).

The ``distributed`` option of the criteria and pruners is resolved by :func:`active`: ``None`` (default) means
"use the default group when ``torch.distributed`` is initialised", ``False`` opts out (each rank on its own),
``True`` requires an initialised process group, and a process group object selects that group.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


def initialized() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized()


def active(option: Any = None) -> tuple[bool, Any]:
    """``(use collectives, group)`` for a ``distributed=`` option (see the module docstring)."""
    if option is False:
        return False, None
    if not initialized():
        if option is True or (option is not None and option is not False):
            raise RuntimeError("distributed=True (or a process group) needs torch.distributed.init_process_group(...) "
                               "first (e.g. run under torchrun); pass distributed=False to work on this process alone")
        return False, None
    group = None if option in (None, True) else option
    return world_size(group) > 1, group


def world_size(group: Any = None) -> int:
    return torch.distributed.get_world_size(group) if initialized() else 1


def rank(group: Any = None) -> int:
    return torch.distributed.get_rank(group) if initialized() else 0


def is_main(group: Any = None) -> bool:
    """True on the rank that writes files (rank 0 of ``group``), and without ``torch.distributed``."""
    return rank(group) == 0


def global_rank(group: Any, group_rank: int) -> int:
    """The global rank of ``group``'s rank ``group_rank`` (collectives name sources by global rank)."""
    if group is None:
        return group_rank
    return torch.distributed.get_global_rank(group, group_rank)


def _device(group: Any = None) -> torch.device:
    backend = torch.distributed.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_gather_tensor(t: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on every rank), in rank order, on the CPU."""
    if hasattr(t, "full_tensor"):  # computed from FSDP2-sharded parameters: this rank's full value first
        t = t.full_tensor()
    dev = _device(group)
    x = t.to(dev).contiguous()
    out = [torch.empty_like(x) for _ in range(world_size(group))]
    torch.distributed.all_gather(out, x, group=group)
    return [o.cpu() for o in out]


def all_reduce_sum(t: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum of ``t`` over ranks, in a fixed order (gathered, then added in rank order), so the result is
    bit-identical on every rank whatever the backend's reduction order."""
    parts = all_gather_tensor(t, group)
    acc = parts[0].clone()
    for p in parts[1:]:
        acc += p
    return acc


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    out: list[Any] = [None] * world_size(group)
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """``obj`` as ``group``'s rank ``src`` has it, on every rank of ``group``."""
    if world_size(group) == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=global_rank(group, src), group=group)
    return box[0]


def barrier(group: Any = None) -> None:
    if world_size(group) > 1:
        torch.distributed.barrier(group=group)


def share(items: Sequence[Any], group: Any = None) -> list[Any]:
    """This rank's share of ``items``: every ``world``-th item starting at this rank (round robin)."""
    w, r = world_size(group), rank(group)
    return [x for i, x in enumerate(items) if i % w == r]


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with FSDP2-sharded entries (``DTensor``) gathered into full CPU tensors: what an
    unsharded copy of the model loads before it is pruned (every rank must call it: gathering is collective)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


__all__ = ["full_state_dict", "active", "all_gather_object", "all_gather_tensor", "all_reduce_sum", "barrier", "broadcast_object",
           "global_rank", "initialized", "is_main", "rank", "share", "world_size"]
