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


def run_json_child(cmd: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run a benchmark child process (Torch-Pruning runs there: it hangs or crashes on some graphs) and return
    (the last JSON line it printed, "") or (None, why: "hang (no result in N s)" / "crashed (exit N): stderr tail")."""
    import json
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"hang (no result in {timeout} s)"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = p.stderr.strip().splitlines()[-1][:200] if p.stderr.strip() else ""
        return None, f"crashed (exit {p.returncode}): {tail}"
    return json.loads(lines[-1]), ""
