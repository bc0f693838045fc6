"""Surgery: the one slicing routine -- physical removal, masks, rollback, pruning records."""
from .apply import (MASKS_ATTR, RECORD_ATTR, PruningError, VerificationError, apply_masks, mask, module_attr,
                    normalize_plan, param_drops, prune, pruned_copy, register_post_prune_hook, replay_record,
                    run_post_prune_hooks, unregister_post_prune_hook, slice_state_dict, slice_tensor,
                    trial, unmask)

__all__ = ["MASKS_ATTR", "RECORD_ATTR", "PruningError", "VerificationError", "apply_masks", "mask", "module_attr",
           "normalize_plan", "param_drops", "prune", "pruned_copy", "register_post_prune_hook", "replay_record",
           "run_post_prune_hooks", "unregister_post_prune_hook", "slice_state_dict",
           "slice_tensor", "trial", "unmask"]
