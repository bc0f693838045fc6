"""Deprecated: the op rules now live in :mod:`prunekit.analysis.ops` (one spec per op: channel rule, MACs formula
and zeroing behaviour, in one registry).  ``RULES`` stays as a view of the registry's rules, keyed by the name
the capture records as ``OpRecord.packet`` (``"conv2d"``; ``"ns.name"`` outside aten)."""
from __future__ import annotations

from .ops import FieldView
from .ops._common import arg, norm_dim as _nd, norm_dims as _dims  # noqa: F401  (old helper names)

RULES = FieldView("rule")
