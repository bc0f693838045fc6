"""``pk.latency``: wall-clock time of a forward pass, per batch size.

Each measurement runs the model in eval mode under ``torch.no_grad`` (the training flags of all
submodules are restored afterwards), optionally with a temporary number of CPU threads (restored
afterwards), after ``warmup`` untimed runs; CUDA work is synchronised before and after every
timed run.  The model is moved to ``device`` only for the measurement and moved back, so it is
never left on another device.
"""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..capture import call_model, eval_mode

log = logging.getLogger("prunekit.metrics")


@dataclass
class LatencyStats:
    """Timings of one batch size, in milliseconds per forward pass."""

    batch_size: int | None
    median_ms: float
    mean_ms: float
    std_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    times_ms: list[float] = field(default_factory=list)


@dataclass
class LatencyResult:
    """Result of :func:`latency`: one :class:`LatencyStats` per batch size."""

    device: str
    threads: int  # torch CPU threads during the measurement
    warmup: int
    results: list[LatencyStats]

    @property
    def median_ms(self) -> float:
        """Median of the first (or only) batch size."""
        return self.results[0].median_ms

    def __getitem__(self, batch_size: int) -> LatencyStats:
        for r in self.results:
            if r.batch_size == batch_size:
                return r
        raise KeyError(f"no measurement for batch size {batch_size}: measured "
                       f"{[r.batch_size for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    def __str__(self) -> str:
        head = ("batch", "median ms", "mean ms", "std ms", "p10 ms", "p90 ms", "repeats")
        rows = [head] + [("-" if r.batch_size is None else str(r.batch_size), f"{r.median_ms:.3f}",
                          f"{r.mean_ms:.3f}", f"{r.std_ms:.3f}", f"{r.p10_ms:.3f}", f"{r.p90_ms:.3f}",
                          str(r.repeats)) for r in self.results]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"latency on {self.device}" + (f", {self.threads} threads" if self.threads else "")
                 + f", {self.warmup} warm-up runs"]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths)))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _rebatch(x: Any, n: int) -> Any:
    """Every tensor input with a batch dim re-batched to ``n`` along dim 0 (repeating its rows)."""
    def one(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == n:
            return t
        if t.shape[0] == 0:
            raise ValueError("cannot re-batch an input with batch size 0: give at least one example")
        reps = -(-n // t.shape[0])
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:n]
    return tree_map(one, x)


def _first_batch(x: Any) -> int | None:
    flat, _ = tree_flatten(x)
    for t in flat:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return int(t.shape[0])
    return None


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device):
    devs = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if any(d.type == "meta" for d in devs):
        raise ValueError(f"latency() needs real weights, but {type(model).__name__} has tensors on the meta "
                         "device: build or load the model with real weights first")
    if len(devs) > 1:
        raise ValueError(f"latency() cannot move a model whose tensors are on several devices ({sorted(map(str, devs))}): "
                         "put the whole model on one device first")
    home = next(iter(devs)) if devs else device
    same = home.type == device.type and (device.index is None or home.index == device.index)
    if same:
        yield
        return
    log.info("latency: moving %s from %s to %s for the measurement (moved back afterwards)",
             type(model).__name__, home, device)
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"threads must be a positive number of CPU threads, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def latency(model: nn.Module, example_inputs: Any, device: str | torch.device = "cpu",
            batch_sizes: Sequence[int] | None = None, threads: int | None = None, warmup: int = 3,
            repeats: int = 10, forward_fn: Callable | None = None) -> LatencyResult:
    """Measure the forward latency of ``model`` on ``example_inputs``.

    ``batch_sizes``: measure each of these batch sizes, re-batching every tensor input along
    dim 0 (rows repeated); None measures the inputs as given.  ``threads``: CPU threads to use
    during the measurement (restored afterwards).  ``warmup`` untimed runs, then ``repeats`` timed
    runs per batch size.  ``forward_fn(model, inputs)`` customises the call.  Returns a
    :class:`LatencyResult` with median, mean, std, p10 and p90 in milliseconds.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"latency() expects an nn.Module, got {type(model).__name__}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"latency() needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("latency(device='cuda') but CUDA is not available here: use device='cpu'")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # noqa: E731
    sizes: list[int | None] = list(batch_sizes) if batch_sizes else [None]
    if any(b is not None and b < 1 for b in sizes):
        raise ValueError(f"batch sizes must be positive, got {list(batch_sizes or [])}")
    inputs = tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, example_inputs)
    results = []
    with _on_device(model, dev), _threads(threads), eval_mode(model), torch.no_grad():
        used_threads = torch.get_num_threads()
        for bs in sizes:
            x = inputs if bs is None else _rebatch(inputs, bs)
            for _ in range(warmup):
                call_model(model, x, forward_fn)
            times = []
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                call_model(model, x, forward_fn)
                sync()
                times.append((time.perf_counter() - t0) * 1000.0)
            results.append(LatencyStats(
                batch_size=bs if bs is not None else _first_batch(x), median_ms=statistics.median(times),
                mean_ms=statistics.fmean(times), std_ms=statistics.stdev(times) if len(times) > 1 else 0.0,
                p10_ms=_percentile(times, 10), p90_ms=_percentile(times, 90), repeats=repeats, times_ms=times))
            log.debug("latency %s bs=%s: median %.3f ms", type(model).__name__, results[-1].batch_size,
                      results[-1].median_ms)
    return LatencyResult(device=str(dev), threads=used_threads, warmup=warmup, results=results)
