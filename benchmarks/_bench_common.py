"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_state() -> str:
    """Short HEAD hash, flagged when src/ has uncommitted changes (so results name the code they measured)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (src/ has uncommitted changes)" if dirty else "")
    except Exception:
        return "?"


def import_torch_pruning():
    """The torch_pruning module from the environment or from ``$TP_PATH`` (a ``pip install --target`` folder),
    or None when it is not installed."""
    if os.environ.get("TP_PATH"):
        sys.path.insert(0, os.environ["TP_PATH"])
    try:
        import torch_pruning
    except ImportError:
        return None
    return torch_pruning
