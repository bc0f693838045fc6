"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import subprocess
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
