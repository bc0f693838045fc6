"""``prunekit prune --plot DIR``: layer widths before/after and importance-score histograms (matplotlib, optional)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch

from .common import USAGE, CLIError

MAX_HISTOGRAMS = 36


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or a CLIError saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("--plot needs matplotlib, which is not installed: pip install 'prunekit[viz]' "
                       "(or pip install matplotlib)", USAGE) from None
    return plt


def plot_widths(before: Mapping[str, int], after: Mapping[str, int], path: Path) -> Path:
    """Grouped bars: output width of every conv/linear layer before and after pruning."""
    plt = require_matplotlib()
    names = list(before)
    n = len(names)
    fig, ax = plt.subplots(figsize=(min(40, max(8, 0.25 * n)), 5))
    xs = range(n)
    ax.bar([x - 0.2 for x in xs], [before[k] for k in names], width=0.4, label="before", color="#9ab")
    ax.bar([x + 0.2 for x in xs], [after.get(k, 0) for k in names], width=0.4, label="after", color="#d62")
    ax.set_ylabel("output channels / features")
    ax.set_title("Layer widths before and after pruning")
    if n <= 120:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
    else:
        ax.set_xlabel(f"{n} layers in model order")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scores(scores: Mapping[int, torch.Tensor], plan: Mapping[int, list[int]], titles: Mapping[int, str],
                path: Path) -> Path:
    """One histogram per group (the first MAX_HISTOGRAMS) of its units' importance; the dashed line is the
    highest score among the removed units."""
    plt = require_matplotlib()
    gids = list(scores)[:MAX_HISTOGRAMS]
    cols = min(6, max(1, len(gids)))
    rows = max(1, math.ceil(len(gids) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.1 * rows), squeeze=False)
    for ax in axes.flat[len(gids):]:
        ax.axis("off")
    for ax, gid in zip(axes.flat, gids):
        s = scores[gid].detach().float().cpu()
        ax.hist(s.numpy(), bins=min(30, max(5, s.numel() // 2)), color="#58a")
        dropped = plan.get(gid, [])
        if dropped:
            ax.axvline(float(s[list(dropped)].max()), color="#d62", linestyle="--", linewidth=1)
        ax.set_title(f"{titles.get(gid, gid)}\n{s.numel()} units, {len(dropped)} removed", fontsize=7)
        ax.tick_params(labelsize=6)
    more = len(scores) - len(gids)
    fig.suptitle("Importance scores per group" + (f" (first {len(gids)}, {more} more not shown)" if more else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
