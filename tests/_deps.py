"""Optional test dependencies that may be installed but unusable with the installed torch."""
from __future__ import annotations

import pytest
import torch


def require_transformers():
    """transformers, or a skip with the reason: not installed, or installed but unable to use this torch
    (transformers 5 needs torch >= 2.6 and disables its PyTorch models on older torch)."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils import is_torch_available
    if not is_torch_available():
        pytest.skip(f"transformers {transformers.__version__} does not support torch {torch.__version__} (it "
                    "disables its PyTorch models); pip install 'transformers<5' to run this test on this torch")
    return transformers
