"""Verify: the dry run before pruning (``dryrun``) and the check after it (``check``), in one package."""
from .check import PruningError, VerificationError, check_finite, compare_outputs, run_outputs

__all__ = ["PruningError", "VerificationError", "check_finite", "compare_outputs", "run_outputs"]
