"""What long runs share besides their workdir: a progress bar and eval results as plain numbers."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch

__all__ = ["metric_value", "progress_bar"]


def metric_value(value: Any) -> float | dict[str, float] | None:
    """``eval_fn``'s result (a number, a one-element tensor or a dict of them) as JSON-able numbers."""
    def num(v: Any, what: str) -> float:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"eval_fn must return a number or a dict of numbers; {what} is {type(v).__name__}")
        return float(v)
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): num(v, f"value {k!r}") for k, v in value.items()}
    return num(value, "the result")


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, done: int, desc: str) -> Iterator[Callable[[str], None]]:
    """An ``advance(text)`` function drawing a bar with rich (on stderr) or tqdm when installed, else nothing."""
    if enabled:
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            pass
        else:
            cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*cols, console=Console(stderr=True)) as bar:
                task = bar.add_task(desc, total=total, completed=done)
                yield lambda text: bar.update(task, advance=1, description=f"{desc} {text}")
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=total, initial=done, desc=desc)
            try:
                def advance(text: str) -> None:
                    bar.set_postfix_str(text)
                    bar.update(1)
                yield advance
            finally:
                bar.close()
            return
    yield lambda text: None
