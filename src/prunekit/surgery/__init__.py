"""Surgery: the one slicing routine -- physical removal, masks, rollback, pruning records."""
from .apply import (MASKS_ATTR, RECORD_ATTR, PruningError, VerificationError, apply_masks, mask, module_attr,
                    normalize_plan, param_drops, prune, pruned_copy, replay_record, slice_state_dict, slice_tensor,
                    trial, unmask)

__all__ = ["MASKS_ATTR", "RECORD_ATTR", "PruningError", "VerificationError", "apply_masks", "mask", "module_attr",
           "normalize_plan", "param_drops", "prune", "pruned_copy", "replay_record", "slice_state_dict",
           "slice_tensor", "trial", "unmask"]
