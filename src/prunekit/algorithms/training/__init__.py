"""Pruning-aware training (SIRC-style): regularize, mask towards a MAC target on an epoch schedule, then
remove the masked units physically and keep the optimizer going.

    pruner = pk.TrainingPruner(model, "pruning_config.json", example_inputs=x, optimizer=opt)
    for epoch in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
            pruner.regularize()          # configured regularizer (adds to .grad)
            opt.step()                   # masked units stay zero by themselves (keep_masked)
        pruner.step(epoch)               # masks more units; at end_epoch removes them for real

Building blocks, usable alone:

* :func:`keep_masked` / :class:`MaskHook` -- masks made by ``pk.mask`` survive optimizer steps without the
  user calling ``pk.apply_masks``: gradients of masked entries are zeroed by tensor hooks (so momentum
  and Adam moments do not grow there) and an optimizer step post-hook re-zeros the masked weights and
  their optimizer state.
* :func:`masked_to_pruned` -- turn a masked model into a physically smaller one (verified by ``pk.prune``).
* :class:`TrainingPruner` -- the schedule, configured by a dict / JSON / YAML file (keys in :data:`CONFIG`).

Under ``DistributedDataParallel`` every decision is identical on all ranks: importance scores are
averaged with ``all_reduce`` before ranking and the resulting plan is broadcast from rank 0.
"""
from __future__ import annotations

from .config import CONFIG, OLD_KEYS, Config, load_config
from .distributed import average_scores, broadcast_object
from .masks import MaskHook, _store, keep_masked, masked_plan, masked_to_pruned, masked_units  # noqa: F401
from .schedule import TrainingPruner, _LayerPruner, _MaskAwareCriterion  # noqa: F401
from ..optim import unwrap

__all__ = ["CONFIG", "Config", "MaskHook", "OLD_KEYS", "TrainingPruner", "average_scores", "broadcast_object",
           "keep_masked", "load_config", "masked_plan", "masked_to_pruned", "masked_units", "unwrap"]
