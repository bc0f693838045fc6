"""Pieces shared by the ``prunekit`` commands: the error type, progress spinners, number formatting."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator

from ..cost.count import human  # the one number formatter (cli reports use it from here)

USAGE = 2  # exit code for a wrong command line / config file / model form (argparse uses 2 as well)
FAILURE = 1  # exit code for a run that could not be done (model failed to load, target unreachable, ...)


class CLIError(Exception):
    """A problem the user can fix; printed as one line on stderr (no traceback unless --debug)."""

    def __init__(self, message: str, code: int = USAGE):
        super().__init__(message)
        self.code = code


class Steps:
    """Times the steps of a command and, when enabled, shows a rich spinner per step on stderr.

    Disabled (timings only) with ``--quiet``, ``--json``, when stderr is not a terminal, or when
    ``rich`` is not installed.
    """

    def __init__(self, enabled: bool):
        self.times: dict[str, float] = {}
        self.console = None
        if enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
            except ImportError:
                return
            self.console = Console(stderr=True)

    @contextlib.contextmanager
    def __call__(self, key: str, label: str, spinner: bool = True) -> Iterator[None]:
        """``spinner=False`` for a step that draws its own progress bar (rich allows one live display)."""
        t0 = time.perf_counter()
        if self.console is None or not spinner:
            yield
        else:
            with self.console.status(f"{label}..."):
                yield
        dt = time.perf_counter() - t0
        self.times[key] = round(dt, 3)
        if self.console is not None:
            self.console.print(f"[green]\u2713[/green] {label} [dim]({dt:.2f} s)[/dim]", highlight=False)


def before_after(label: str, before: float, after: float, fmt=human, width: int = 8) -> str:
    """``MACs:    1.82 G => 0.47 G (25.8%)`` where the percentage is after / before."""
    pct = f" ({100.0 * after / before:.1f}%)" if before else ""
    return f"{(label + ':').ljust(width)} {fmt(before)} => {fmt(after)}{pct}"
