from .apply import (MASKS_ATTR, RECORD_ATTR, PruningError, VerificationError, apply_masks, mask, normalize_plan, param_drops, prune,
                    module_attr, pruned_copy, replay_record, slice_state_dict,
                    slice_tensor, unmask)

__all__ = ["MASKS_ATTR", "RECORD_ATTR", "module_attr", "pruned_copy", "replay_record", "slice_state_dict", "PruningError", "VerificationError", "apply_masks", "mask", "normalize_plan", "param_drops", "prune",
           "slice_tensor", "unmask"]
