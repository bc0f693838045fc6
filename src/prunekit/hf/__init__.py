"""Hugging Face transformers support (the ``hf`` extra).  Nothing here imports transformers at import time:
transformers' classes are matched by qualified name.

``moe``: transformers' mixture-of-experts blocks registered with :func:`prunekit.register_experts`, so whole
experts are prunable units.
"""
from . import moe  # noqa: F401
