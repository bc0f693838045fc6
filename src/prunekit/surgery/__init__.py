from .apply import (PruningError, VerificationError, apply_masks, mask, normalize_plan, param_drops, prune,
                    slice_tensor, unmask)

__all__ = ["PruningError", "VerificationError", "apply_masks", "mask", "normalize_plan", "param_drops", "prune",
           "slice_tensor", "unmask"]
