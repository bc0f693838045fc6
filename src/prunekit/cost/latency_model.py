"""``pk.LatencyModel``: a measured latency model of the device, per layer, as a function of the kept widths.

    lm = pk.LatencyModel(model, x, backend="eager")          # or "compile", "onnxruntime"; device="cuda"
    lm.predict(graph, {gid: kept_units})                    # predicted ms of the model after a plan
    lm.check()                                              # predicted vs measured whole-model ms

What is measured: every ``Conv1d/2d/3d`` and ``Linear`` of the model (the layers that carry the MACs) is rebuilt
alone at a sparse grid of input widths (output at full width) and of output widths (input at full width),
on an input of the shape it sees in the model (the batch re-sized to ``batch_size``), and timed on the
backend: eager PyTorch, ``torch.compile`` or ONNX Runtime (the layer exported with ``torch.onnx``).  Latency
is a staircase in the channel count (kernels are tiled by 8/16/32 channels), so the grid is the multiples
of ``align`` at ``points`` anchors spread over the width, each measured at ``-1``, itself and ``+1``; a
width between grid points is interpolated linearly between its measured neighbours.  A layer whose input
and output widths both change is predicted as ``t(full) * t(in)/t(full) * t(out)/t(full)`` (separable, as
the MACs are); a depthwise conv has one axis.  What the layers do not account for (norms, activations,
additions, data movement: ``rest_ms``) is the whole-model time minus the layers' time.

Whole-model correction: per-layer timings in isolation miss what the model pays around them (per-op overhead
that does not shrink with the width, fused or re-laid-out tensors), so with a ``graph`` the model is also
measured once uniformly pruned to about half of every prunable group, and the prediction is the affine fit
``scale * layers_ms + offset`` through the two whole-model measurements (full and half width; without a graph:
``offset = 0`` and ``rest_ms`` scaled with the layers).  ``calibration`` holds the fit and its inputs.

Measurements are cached on disk per device (CPU model name and thread count, or GPU name) and backend,
under ``$PRUNEKIT_CACHE/latency`` (default ``~/.cache/prunekit/latency``), keyed by the layer's
configuration and input shape: a second model with the same layers (or the same model again) reuses them.

Every algorithm uses the same object: :class:`prunekit.Pruner` with ``pk.LatencyTarget(r, backend=...)``
(the knapsack planner and ``round_to="auto"``) and :class:`prunekit.AdaptivePruner` (its latency table).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..capture.tape import call_model, eval_mode
from .latency import _percentile, _rebatch, _threads

log = logging.getLogger("prunekit.latency")

BACKENDS = ("eager", "compile", "onnxruntime")
CACHE_FORMAT = "prunekit-latency-cache"
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (onnxruntime missing, torch.compile failing, no CUDA); the message says why."""


# ---------------------------------------------------------------------------------------------- device / cache
def device_name(device: str | torch.device = "cpu", threads: int | None = None) -> str:
    """A stable name of the device timings are valid for: the CPU model and thread count, or the GPU name."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(dev)}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    n = threads if threads is not None else torch.get_num_threads()
    return f"cpu-{cpu}-{n}threads"


def cache_dir() -> Path:
    """``$PRUNEKIT_CACHE/latency`` or ``~/.cache/prunekit/latency``."""
    root = os.environ.get("PRUNEKIT_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "prunekit") / "latency"


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:150]


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Repeated timings of one callable, in ms: median and spread (IQR, min, max)."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def of(cls, times: Sequence[float]) -> "Timing":
        return cls(statistics.median(times), _percentile(times, 25), _percentile(times, 75), min(times),
                   max(times), len(times))

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms (IQR {self.q1_ms:.3f}-{self.q3_ms:.3f}, min {self.min_ms:.3f}, "
                f"max {self.max_ms:.3f}, {self.repeats} runs)")


def _time(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _sync_for(dev: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # noqa: E731


def backend_runner(module: nn.Module, example_inputs: Any, backend: str = "eager", device: str = "cpu",
                   threads: int | None = None, forward_fn: Callable | None = None) -> Callable[[], Any]:
    """A no-argument callable that runs ``module`` on ``example_inputs`` with ``backend`` (built once: the
    compiled module / the ONNX Runtime session).  Raises :class:`BackendUnavailable` with the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown latency backend {backend!r}; use one of {BACKENDS}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"device={device!r} but CUDA is not available here: use device='cpu'")
    if backend == "onnxruntime":
        return _ort_runner(module, example_inputs, dev, threads)
    m = module
    if backend == "compile":
        try:
            # a fresh compile per call: dynamo's recompile limit would otherwise fall back to eager (silently)
            # after a few widths of the same layer class; dynamic=False: each width is its own static kernel
            torch._dynamo.reset()
            m = torch.compile(module, dynamic=False)
            with torch.no_grad():
                call_model(m, example_inputs, forward_fn)
        except Exception as e:  # noqa: BLE001 - inductor needs a working C compiler, triton on GPU, ...
            raise BackendUnavailable(f"torch.compile failed on this machine ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:200] if str(e) else ''}); use backend='eager' or "
                                     "'onnxruntime'") from e

    def run():
        with torch.no_grad():
            return call_model(m, example_inputs, forward_fn)
    return run


def _ort_runner(module: nn.Module, example_inputs: Any, dev: torch.device, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailable("backend='onnxruntime' needs onnxruntime: pip install onnxruntime "
                                 "(or prunekit[export])") from e
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        args, kwargs = tuple(example_inputs), {}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.to("cpu"), args, buf, kwargs=kwargs or None, dynamo=False, opset_version=17)
    except Exception as e:  # noqa: BLE001
        raise BackendUnavailable(f"the model could not be exported to ONNX ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    finally:
        module.to(dev)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    providers = ["CUDAExecutionProvider"] if dev.type == "cuda" else ["CPUExecutionProvider"]
    if dev.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable("onnxruntime here has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    sess = ort.InferenceSession(buf.getvalue(), so, providers=providers)
    names = [i.name for i in sess.get_inputs()]
    flat = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, flat)}
    return lambda: sess.run(None, feed)


def measure(model: nn.Module, example_inputs: Any, backend: str = "eager", device: str = "cpu",
            threads: int | None = None, batch_size: int | None = None, warmup: int = 3, repeats: int = 10,
            forward_fn: Callable | None = None) -> Timing:
    """Whole-model latency on ``backend``: median and spread of ``repeats`` runs after ``warmup`` runs (model in
    eval mode; the training flags and the threads are restored; the model is not changed)."""
    dev = torch.device(device)
    x = example_inputs if batch_size is None else _rebatch(example_inputs, batch_size)
    x = _to(x, dev)
    home = next((p.device for p in model.parameters()), dev)
    with _threads(threads), eval_mode(model), torch.no_grad():
        model.to(dev)
        try:
            run = backend_runner(model, x, backend, device, threads, forward_fn)
            times = _time(run, warmup, repeats, _sync_for(dev))
        finally:
            model.to(home)
    return Timing.of(times)


@dataclass
class Interleaved:
    """Result of :func:`measure_many`: per model a :class:`Timing` of all its runs, and the per-round medians
    (``rounds[r][i]``: round ``r``, model ``i``) that paired ratios come from."""

    timings: list[Timing]
    rounds: list[list[float]]

    def ratio(self, i: int, ref: int = 0) -> float:
        """Latency of model ``i`` relative to model ``ref``: the median over rounds of the ratio within a round
        (drift between rounds cancels)."""
        return statistics.median(r[i] / r[ref] for r in self.rounds if r[ref] > 0)


def measure_many(models: Sequence[nn.Module], example_inputs: Any, backend: str = "eager", device: str = "cpu",
                 threads: int | None = None, batch_size: int | None = None, *, rounds: int = 5, repeats: int = 10,
                 min_round_s: float = 0.05, warmup: int = 3, forward_fn: Callable | None = None) -> Interleaved:
    """Latency of several models measured interleaved, so that a shared machine's drift (clock, other load)
    falls on all of them alike: every runner is built (and warmed up) first, then each of ``rounds`` rounds
    times every model in turn, ``max(ceil(repeats / rounds), runs filling min_round_s)`` runs each after one
    untimed run (with ONNX Runtime, after a 50 ms pause: its idle threads busy-wait and would share the cores).
    Compare models with :meth:`Interleaved.ratio` (paired per round), not with medians measured at different
    times."""
    dev = torch.device(device)
    x = example_inputs if batch_size is None else _rebatch(example_inputs, batch_size)
    x = _to(x, dev)
    sync = _sync_for(dev)
    homes = [next((p.device for p in m.parameters()), dev) for m in models]
    per_round = max(1, math.ceil(repeats / max(1, rounds)))
    settle = 0.05 if backend == "onnxruntime" and len(models) > 1 else 0.0
    with _threads(threads), contextlib.ExitStack() as stack, torch.no_grad():
        for m in models:
            stack.enter_context(eval_mode(m))
        try:
            runners, counts = [], []
            for m in models:
                m.to(dev)
                run = backend_runner(m, x, backend, device, threads, forward_fn)
                t = min(_time(run, warmup, 2, sync))
                runners.append(run)
                counts.append(max(per_round, min(50, math.ceil(min_round_s * 1000.0 / max(t, 1e-3)))))
            times: list[list[float]] = [[] for _ in models]
            meds: list[list[float]] = []
            for _ in range(max(1, rounds)):
                row = []
                for i, (run, n) in enumerate(zip(runners, counts)):
                    if settle:
                        # ONNX Runtime's idle threads busy-wait after a run (its default, kept: it is faster): let
                        # the last session's threads go to sleep before the next is timed, or they share the cores
                        time.sleep(settle)
                    ts = _time(run, 1, n, sync)
                    times[i].extend(ts)
                    row.append(statistics.median(ts))
                meds.append(row)
        finally:
            for m, h in zip(models, homes):
                m.to(h)
    return Interleaved([Timing.of(t) for t in times], meds)


def _to(x: Any, dev: torch.device) -> Any:
    from torch.utils._pytree import tree_map
    return tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, x)


# ---------------------------------------------------------------------------------------------- the model
def width_grid(size: int, align: int = 8, points: int = 8, lo_frac: float = 0.1) -> list[int]:
    """Widths measured for a dim of ``size``: ``points`` multiples of ``align`` spread over
    ``[lo_frac * size, size]``, each with its neighbours -1 and +1, and ``size`` itself (ascending)."""
    if size <= 2 * align or points <= 0:
        return list(range(1, size + 1)) if size <= 32 else sorted({max(1, round(size * k / 16)) for k in
                                                                   range(1, 17)})
    lo = max(align, int(math.ceil(size * lo_frac / align)) * align)
    hi = (size // align) * align
    n = (hi - lo) // align
    anchors = sorted({lo + align * round(n * k / max(1, points - 1)) for k in range(points)})
    out = {size}
    for a in anchors:
        out.update(w for w in (a - 1, a, a + 1) if 1 <= w <= size)
    return sorted(out)


def _interp(curve: Mapping[int, float], w: int) -> float:
    """Piecewise-linear through the measured points (extrapolated proportionally below the smallest)."""
    if w in curve:
        return curve[w]
    xs = sorted(curve)
    if w <= xs[0]:
        return curve[xs[0]] * max(w, 0) / xs[0]
    if w >= xs[-1]:
        return curve[xs[-1]]
    import bisect
    i = bisect.bisect_left(xs, w)
    a, b = xs[i - 1], xs[i]
    return curve[a] + (curve[b] - curve[a]) * (w - a) / (b - a)


def _layer_sig(mod: nn.Module, shape: tuple[int, ...], cin: int, cout: int) -> dict[str, Any]:
    if isinstance(mod, nn.Linear):
        return {"type": "Linear", "in": cin, "out": cout, "bias": mod.bias is not None,
                "shape": list(shape[:-1]) + [cin]}
    groups = mod.groups
    dw = groups == mod.in_channels and groups == mod.out_channels and groups > 1
    return {"type": type(mod).__name__, "in": cin, "out": cout, "k": list(mod.kernel_size), "s": list(mod.stride),
            "p": list(mod.padding) if not isinstance(mod.padding, str) else mod.padding, "d": list(mod.dilation),
            "g": cin if dw else groups, "bias": mod.bias is not None, "shape": [shape[0], cin] + list(shape[2:])}


def _build_layer(sig: Mapping[str, Any], dtype: torch.dtype, dev: torch.device) -> tuple[nn.Module, torch.Tensor]:
    if sig["type"] == "Linear":
        m = nn.Linear(sig["in"], sig["out"], bias=sig["bias"])
    else:
        cls = getattr(nn, sig["type"])
        m = cls(sig["in"], sig["out"], tuple(sig["k"]), stride=tuple(sig["s"]),
                padding=sig["p"] if isinstance(sig["p"], str) else tuple(sig["p"]), dilation=tuple(sig["d"]),
                groups=sig["g"], bias=sig["bias"])
    m = m.to(dev, dtype).eval()
    return m, torch.randn(*sig["shape"], device=dev, dtype=dtype)


@dataclass
class _Layer:
    name: str
    in_full: int
    out_full: int
    depthwise: bool
    calls: int
    full_ms: float
    in_curve: dict[int, float]  # input width -> ms (output at full width)
    out_curve: dict[int, float]  # output width -> ms (input at full width); depthwise: the one curve

    def ms(self, cin: int, cout: int) -> float:
        if self.depthwise:
            return self.calls * _interp(self.out_curve, min(cin, cout))
        t = self.full_ms
        if t <= 0:
            return 0.0
        r_in = _interp(self.in_curve, cin) / t if self.in_curve and cin != self.in_full else 1.0
        r_out = _interp(self.out_curve, cout) / t if self.out_curve and cout != self.out_full else 1.0
        return self.calls * t * r_in * r_out


class LatencyModel:
    """Measured per-layer latency of ``model`` on ``backend`` as a function of kept widths (see the module doc).

    Args:
        model, example_inputs, forward_fn: the model and what it is called with (it is not changed).
        backend: ``"eager"``, ``"compile"`` (``torch.compile``, one static compile per layer width, after
            ``torch._dynamo.reset()``: slow to build, cached; :class:`BackendUnavailable` if it fails here)
            or ``"onnxruntime"`` (CPU, or the CUDA provider with ``device="cuda"``).
        device, threads, batch_size: where the model will run (batch ``None``: as in ``example_inputs``).
        graph: a :class:`prunekit.PruneGraph` of ``model``: only widths its prunable groups change are
            measured (default: every input and output width of every conv / linear).
        align, points: the width grid (:func:`width_grid`).
        warmup, repeats: per timing.  ``measure_fn(module, input) -> ms`` replaces the timing of one layer
            (a deterministic cost model in tests); the whole-model time is then the sum of the layers.
        cache: ``True`` (the default cache folder), a folder, or ``False`` (no disk cache).
        calibrate: with a ``graph``, fit the whole-model correction (:meth:`calibrate`; one more whole-model
            measurement of a uniformly half-pruned copy).
    """

    def __init__(self, model: nn.Module, example_inputs: Any, backend: str = "eager", *, device: str = "cpu",
                 threads: int | None = None, batch_size: int | None = None, graph: Any = None,
                 forward_fn: Callable | None = None, align: int = 8, points: int | None = None,
                 warmup: int = 2, repeats: int | None = None, measure_fn: Callable | None = None,
                 cache: bool | str | Path = True, calibrate: bool = True):
        if backend not in BACKENDS:
            raise ValueError(f"unknown latency backend {backend!r}; use one of {BACKENDS}")
        self.backend, self.device, self.threads, self.batch_size = backend, str(device), threads, batch_size
        self.forward_fn, self.measure_fn = forward_fn, measure_fn
        self.align = align
        self.tol = 0.02  # fast_widths: a narrower width must save more than this fraction of the layers' time
        self.points = points if points is not None else {"eager": 8, "compile": 3, "onnxruntime": 5}[backend]
        self.warmup = warmup
        self.repeats = repeats if repeats is not None else (7 if backend == "eager" else 5)
        self.example_inputs = example_inputs
        self._model = model
        self.device_name = device_name(device, threads) if measure_fn is None else "measure_fn"
        if cache is False or measure_fn is not None:
            self.cache_path = None
        else:
            root = cache_dir() if cache is True else Path(cache)
            self.cache_path = root / f"{_slug(self.device_name)}__{backend}.json"
        self._cache = self._load_cache()
        self._new = 0
        self.measured = 0  # layer timings done (not from the cache) by this object
        t0 = time.perf_counter()
        self.layers: dict[str, _Layer] = {}
        self._build(graph)
        self.base = self.measure_model(model) if measure_fn is None else None
        modeled = self.layers_ms()
        self.base_ms = self.base.median_ms if self.base is not None else modeled
        self.rest_ms = max(0.0, self.base_ms - modeled)
        # prediction = scale * (summed layer ms) + offset: uncalibrated, the rest scales with the layers
        self.scale = 1.0 + (self.rest_ms / modeled if modeled > 0 else 0.0)
        self.offset = 0.0
        self.calibration: dict[str, Any] | None = None
        if calibrate and graph is not None:
            self.calibrate(graph)
        self._save_cache()
        self.build_s = time.perf_counter() - t0
        log.info("latency model (%s, %s): %d layers, %d timings measured, %d from the cache, %.1fs; whole model "
                 "%.3f ms, layers %.3f ms, rest %.3f ms", backend, self.device_name, len(self.layers), self.measured,
                 self.cached_hits, self.build_s, self.base_ms, modeled, self.rest_ms)

    # ------------------------------------------------------------------ cache
    def _load_cache(self) -> dict[str, float]:
        self.cached_hits = 0
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        try:
            d = json.loads(self.cache_path.read_text())
        except ValueError:
            log.warning("latency cache %s is not valid JSON: ignored (it will be rewritten)", self.cache_path)
            return {}
        if d.get("format") != CACHE_FORMAT:
            return {}
        return dict(d.get("layers", {}))

    def _save_cache(self) -> None:
        if self.cache_path is None or not self._new:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": CACHE_FORMAT, "device": self.device_name, "backend": self.backend,
                "torch": torch.__version__, "layers": self._cache}
        fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.cache_path)

    # ------------------------------------------------------------------ measuring
    def _time_layer(self, mod: nn.Module, sig: dict[str, Any], dtype: torch.dtype) -> float:
        key = json.dumps({**sig, "dtype": str(dtype).replace("torch.", ""), "warm": self.warmup,
                          "rep": self.repeats}, sort_keys=True)
        if key in self._cache:
            self.cached_hits += 1
            return self._cache[key]
        dev = torch.device(self.device)
        layer, x = _build_layer(sig, dtype, dev)
        if self.measure_fn is not None:
            ms = float(self.measure_fn(layer, x))
        else:
            with _threads(self.threads), torch.no_grad():
                run = backend_runner(layer, x, self.backend, self.device, self.threads)
                ms = statistics.median(_time(run, self.warmup, self.repeats, _sync_for(dev)))
        self._cache[key] = ms
        self._new += 1
        self.measured += 1
        return ms

    def _build(self, graph: Any) -> None:
        model = self._model
        cut: dict[str, set[int]] | None = None
        if graph is not None:
            cut = {}
            for g in graph.prunable_groups:
                for m in g.members:
                    if m.fqn.endswith(".weight"):
                        cut.setdefault(m.fqn[:-len(".weight")], set()).add(m.dim)
        shapes: dict[str, tuple] = {}
        calls: dict[str, int] = {}
        hooks = []
        for name, mod in model.named_modules():
            if isinstance(mod, _LAYERS) and (cut is None or name in cut):
                def hook(m, args, name=name):
                    calls[name] = calls.get(name, 0) + 1
                    if args and isinstance(args[0], torch.Tensor):
                        shapes.setdefault(name, tuple(args[0].shape))
                hooks.append(mod.register_forward_pre_hook(hook))
        x = self.example_inputs if self.batch_size is None else _rebatch(self.example_inputs, self.batch_size)
        try:
            with eval_mode(model), torch.no_grad():
                call_model(model, x, self.forward_fn)
        finally:
            for h in hooks:
                h.remove()
        for name, shape in shapes.items():
            mod = model.get_submodule(name)
            dtype = mod.weight.dtype
            if isinstance(mod, nn.Linear):
                cin, cout = mod.in_features, mod.out_features
                dw = False
            else:
                cin, cout = mod.in_channels, mod.out_channels
                dw = mod.groups == cin == cout and cin > 1
                if mod.groups > 1 and not dw:
                    continue  # grouped (not depthwise) convs: their time stays in ``rest_ms``
            dims = cut.get(name, {0, 1}) if cut is not None else {0, 1}
            full = self._time_layer(mod, _layer_sig(mod, shape, cin, cout), dtype)
            in_curve, out_curve = {cin: full}, {cout: full}
            if dw:
                for w in width_grid(cout, self.align, self.points):
                    out_curve[w] = self._time_layer(mod, _layer_sig(mod, shape, w, w), dtype)
            else:
                if 1 in dims:
                    for w in width_grid(cin, self.align, self.points):
                        in_curve[w] = self._time_layer(mod, _layer_sig(mod, shape, w, cout), dtype)
                if 0 in dims:
                    for w in width_grid(cout, self.align, self.points):
                        out_curve[w] = self._time_layer(mod, _layer_sig(mod, shape, cin, w), dtype)
            self.layers[name] = _Layer(name, cin, cout, dw, calls.get(name, 1), full,
                                       _monotone(in_curve), _monotone(out_curve))

    def measure_ratio(self, model: nn.Module, reference: nn.Module, repeats: int = 10) -> float:
        """Measured latency of ``model`` relative to ``reference`` on this backend/device/batch, the two
        interleaved (:func:`measure_many`); with a ``measure_fn``, the ratio of the synthetic times."""
        if self.measure_fn is not None:
            return self.measure_model(model).median_ms / max(self.measure_model(reference).median_ms, 1e-12)
        res = measure_many([reference, model], self.example_inputs, self.backend, self.device, self.threads,
                           self.batch_size, repeats=repeats, forward_fn=self.forward_fn)
        return res.ratio(1)

    def measure_model(self, model: nn.Module, warmup: int = 3, repeats: int = 10) -> Timing:
        """The whole model's latency on this backend/device/batch (median and spread)."""
        if self.measure_fn is not None:
            return Timing.of([LatencyModel.predict_widths(self, _widths_of(model, self.layers))])
        return measure(model, self.example_inputs, self.backend, self.device, self.threads, self.batch_size,
                       warmup=warmup, repeats=repeats, forward_fn=self.forward_fn)

    # ------------------------------------------------------------------ predicting
    def layers_ms(self, widths: Mapping[str, tuple[int, int]] | None = None) -> float:
        """Summed predicted time of the measured layers at ``widths`` (name -> (in, out); others full)."""
        widths = widths or {}
        return sum(lay.ms(*widths.get(n, (lay.in_full, lay.out_full))) for n, lay in self.layers.items())

    def predict_widths(self, widths: Mapping[str, tuple[int, int]]) -> float:
        """Predicted whole-model ms when the measured layers have ``widths`` (name -> (in, out))."""
        return max(self.scale * self.layers_ms(widths) + self.offset, 1e-3 * self.base_ms)

    def calibrate(self, graph: Any, fraction: float = 0.5) -> dict[str, Any] | None:
        """Fit the whole-model correction: measure a copy of the model with every prunable group of ``graph``
        cut to about ``fraction`` of its units (multiples of ``align`` where the group is wide) and choose
        ``scale``/``offset`` so that the prediction equals the whole-model measurement at full width and at
        that width.  Returns (and keeps in ``calibration``) the fit and its inputs; None (the model is left
        uncalibrated, with the reason logged) where the copy cannot be built or the layers barely change."""
        plan = {}
        for g in graph.prunable_groups:
            k = g.size * fraction
            k = int(round(k / self.align)) * self.align if g.size >= 4 * self.align else int(round(k))
            k = min(g.size, max(k, getattr(g, "min_keep", 1), 1))
            if k < g.size:
                plan[g.id] = list(range(g.size - k))
        if not plan:
            return None
        try:  # the graph makes the copy (prunekit.PruneGraph.pruned_copy): cost comes before surgery
            trial = graph.pruned_copy(plan, self._model, verify=False)
        except Exception as e:  # noqa: BLE001 - the correction is an improvement, not a requirement
            log.warning("latency model: no whole-model correction (the half-width copy failed: %s: %s)",
                        type(e).__name__, e)
            return None
        half = _widths_of(trial, self.layers)
        l_full, l_half = self.layers_ms(), self.layers_ms(half)
        if l_full <= 0 or l_full - l_half < 0.05 * l_full:
            return None
        before = self.predict_widths(half)
        # the half-width time relative to the full model, measured interleaved (drift cancels)
        m_full = self.base_ms
        m_half = m_full * self.measure_ratio(trial, self._model)
        scale = (m_full - m_half) / (l_full - l_half)
        ref = m_full / l_full  # the uncalibrated proportional scale; the fit stays within a factor 5 of it
        scale = min(max(scale, 0.2 * ref), 5.0 * ref)
        self.scale, self.offset = scale, m_full - scale * l_full
        self.calibration = {"kept_fraction": fraction, "full_ms": m_full, "half_ms": m_half,
                            "layers_full_ms": l_full, "layers_half_ms": l_half, "uncalibrated_half_ms": before,
                            "uncalibrated_error": before / m_half - 1.0 if m_half > 0 else 0.0,
                            "scale": self.scale, "offset_ms": self.offset}
        log.info("latency model: whole-model correction at %.2f width: measured %.3f ms, uncalibrated prediction "
                 "%.3f ms (%+.1f%%); scale %.3f, offset %.3f ms", fraction, m_half, before,
                 100 * self.calibration["uncalibrated_error"], self.scale, self.offset)
        return self.calibration

    def widths(self, graph: Any, kept: Mapping[int, int] | None = None) -> dict[str, tuple[int, int]]:
        """(in, out) width of every measured layer of ``graph``'s model after its groups keep ``kept`` units."""
        kept = kept or {}
        model = getattr(graph, "model_ref", None) or self._model
        cur = _widths_of(model, self.layers)
        out = {n: list(w) for n, w in cur.items()}
        for g in graph.groups:
            k = kept.get(g.id, g.size)
            if k == g.size:
                continue
            for m in g.members:
                n = m.fqn[:-len(".weight")] if m.fqn.endswith(".weight") else None
                if n not in out or m.dim not in (0, 1):
                    continue
                lay = self.layers[n]
                gone = (g.size - k) * span_of(m)
                if lay.depthwise:
                    out[n] = [out[n][0] - gone, out[n][1] - gone]
                    continue
                axis = 1 if m.dim == 0 else 0  # weight dim 0 = output width, dim 1 = input width
                out[n][axis] -= gone
        return {n: (w[0], w[1]) for n, w in out.items()}

    def predict(self, graph: Any, kept: Mapping[int, int] | None = None) -> float:
        """Predicted ms of ``graph``'s model after each group keeps ``kept[group id]`` units (others as they are)."""
        return self.predict_widths(self.widths(graph, kept))

    def _axes(self, graph: Any, group: Any) -> list[tuple[dict[int, float], int, int]]:
        """Per measured layer ``group`` changes: (its measured curve on that axis, the width other groups own
        on that axis (a concatenation), the indices one unit spans)."""
        out = []
        cur = _widths_of(getattr(graph, "model_ref", None) or self._model, self.layers)
        for m in group.members:
            n = m.fqn[:-len(".weight")] if m.fqn.endswith(".weight") else None
            if n not in self.layers or m.dim not in (0, 1):
                continue
            lay = self.layers[n]
            curve = lay.out_curve if (lay.depthwise or m.dim == 0) else lay.in_curve
            span = span_of(m)
            out.append((curve, cur[n][1 if m.dim == 0 else 0] - group.size * span, span))
        return out

    def measured_widths(self, graph: Any, group: Any) -> list[int]:
        """Unit counts of ``group`` at which every measured layer it changes was measured (ascending)."""
        sets = [{(w - other) // span for w in curve if w > other and (w - other) % span == 0
                 and (w - other) // span <= group.size} for curve, other, span in self._axes(graph, group)]
        if not sets:
            return []
        return sorted(set.intersection(*sets))

    def fast_widths(self, graph: Any, group: Any, min_keep: int = 1, aligned: bool = True) -> list[int]:
        """The measured unit counts of ``group`` on the fast side of the staircase: strictly faster (predicted
        whole model, the other groups as they are) than every wider measured count (ascending; always
        includes the current size).

        ``aligned``: only counts that leave every layer the group changes at a multiple of ``align`` channels
        (where the group has such counts).  Layers timed alone miss the layout conversions a whole model pays
        at unaligned widths (oneDNN / ONNX Runtime blocked formats): choosing among every measured width made
        ``round_to="auto"`` up to 1.76x slower than ``round_to=8`` at the same MACs (benchmarks/latency.py)."""
        ws = [w for w in self.measured_widths(graph, group) if w >= min_keep]
        if aligned:
            axes = self._axes(graph, group)
            al = [w for w in ws if all((other + w * span) % self.align == 0 for _, other, span in axes)]
            if al:
                ws = al
        if group.size not in ws:
            ws.append(group.size)
        ws.sort()
        cost = {w: self.predict(graph, {group.id: w}) for w in ws}
        # a step must save more than the noise: ``tol`` of the time of the layers the group changes
        touched = {m.fqn[:-len(".weight")] for m in group.members if m.fqn.endswith(".weight")}
        cur = _widths_of(getattr(graph, "model_ref", None) or self._model, touched & set(self.layers))
        tol = self.tol * sum(self.layers[n].ms(*cur[n]) for n in cur)
        out, best = [], math.inf
        for w in reversed(ws):
            if cost[w] < best - tol or w == group.size:
                out.append(w)
                best = min(best, cost[w])
        return sorted(out)

    def check(self, model: nn.Module | None = None, graph: Any = None, kept: Mapping[int, int] | None = None,
              pruned: nn.Module | None = None) -> dict[str, float]:
        """Predicted vs measured whole-model latency: of ``model`` (default the one measured) as it is, or of
        ``pruned`` (``graph`` + ``kept`` give the prediction).  Returns ``predicted_ms``, ``measured_ms``
        (median), ``q1_ms``/``q3_ms`` and ``error`` (relative: predicted / measured - 1)."""
        target = pruned if pruned is not None else (model or self._model)
        pred = self.predict(graph, kept) if graph is not None else self.predict_widths(
            _widths_of(target, self.layers))
        t = self.measure_model(target)
        return {"predicted_ms": pred, "measured_ms": t.median_ms, "q1_ms": t.q1_ms, "q3_ms": t.q3_ms,
                "error": pred / t.median_ms - 1.0 if t.median_ms > 0 else 0.0}

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device_name, "batch_size": self.batch_size,
                "base_ms": self.base_ms, "rest_ms": self.rest_ms, "scale": self.scale, "offset_ms": self.offset,
                "calibration": self.calibration,
                "layers": {n: {"in": l.in_full, "out": l.out_full, "depthwise": l.depthwise, "calls": l.calls,
                               "full_ms": l.full_ms, "in_curve": l.in_curve, "out_curve": l.out_curve}
                           for n, l in self.layers.items()}}

    def __repr__(self) -> str:
        return (f"LatencyModel(backend={self.backend!r}, device={self.device_name!r}, {len(self.layers)} layers, "
                f"base {self.base_ms:.3f} ms)")


def span_of(member: Any) -> int:
    """Indices of a member's dim that one unit of its group spans (1 for a channel)."""
    return math.prod(member.sizes) // member.sizes[member.pos]


def _monotone(curve: dict[int, float]) -> dict[int, float]:
    """Noise must not make a narrower layer slower than a wider one by more than the noise: a width's time is
    capped by the time of every wider width (the staircase stays: equal times are allowed)."""
    out, best = {}, math.inf
    for w in sorted(curve, reverse=True):
        best = min(best, curve[w])
        out[w] = best
    return dict(sorted(out.items()))


def _widths_of(model: nn.Module, layers: Iterable[str]) -> dict[str, tuple[int, int]]:
    out = {}
    mods = dict(model.named_modules())
    for n in layers:
        m = mods.get(n)
        if m is None:
            continue
        out[n] = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
    return out


def latency_model_for(model: nn.Module, example_inputs: Any, target: Any, **kw: Any) -> LatencyModel:
    """The :class:`LatencyModel` a ``pk.LatencyTarget`` describes (backend, device, threads, batch size)."""
    return LatencyModel(model, example_inputs, getattr(target, "backend", None) or "eager",
                        device=getattr(target, "device", "cpu"), threads=getattr(target, "threads", None),
                        batch_size=getattr(target, "batch_size", None), **kw)


__all__ = ["BACKENDS", "BackendUnavailable", "Interleaved", "LatencyModel", "Timing", "backend_runner", "cache_dir",
           "device_name", "measure", "measure_many", "width_grid", "latency_model_for"]
