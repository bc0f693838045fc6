"""Latency budgets for :class:`~prunekit.AdaptivePruner`: the per-layer :class:`LatencyTable` (measured once per
model, device and thread count, cached as JSON) and the budgeted quantity of a proposal."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ...capture import call_model, eval_mode
from ...io.checkpoint import model_fingerprint
from ...io.checkpoint import canonical_json as _canon, write_json as _write_json
from .candidates import _gkey, _group_name
from .state import FORMAT_VERSION, LATENCY_FILE, TABLE_FORMAT, WorkdirError

log = logging.getLogger("prunekit.adaptive")


class LatencyTable:
    """Per-layer latency as a function of width, for predicting a pruned model's latency.

    ``layers[key]`` (``key``: a group's identity, stable across re-analyses) holds the group's original
    ``size``, the kept ``fractions`` it was timed at (descending, starting at 1.0) and ``ms``: the summed
    time of the modules the group touches at each width.  Predicted latency = ``baseline_ms`` minus the
    savings of every group, each interpolated linearly between grid points (extrapolated linearly below
    the smallest fraction, never past zero time).  Savings are made monotone in the cut.
    """

    def __init__(self, baseline_ms: float, layers: Mapping[str, Mapping[str, Any]], key: Mapping[str, Any]):
        self.baseline_ms = float(baseline_ms)
        self.layers = {k: dict(v) for k, v in layers.items()}
        self.key = dict(key)
        for v in self.layers.values():  # noise must not make a larger cut look slower
            ms = list(v["ms"])
            for i in range(1, len(ms)):
                ms[i] = min(ms[i], ms[i - 1])
            v["ms"] = ms

    def saving(self, key: str, kept: int) -> float:
        """Milliseconds saved when the group ``key`` keeps ``kept`` of its original units."""
        lay = self.layers.get(key)
        if lay is None:
            return 0.0
        f = kept / lay["size"]
        fr, ms = lay["fractions"], lay["ms"]
        if f >= fr[0]:
            return 0.0
        for i in range(1, len(fr)):
            if f >= fr[i]:
                t = ms[i - 1] + (ms[i] - ms[i - 1]) * (fr[i - 1] - f) / (fr[i - 1] - fr[i])
                return ms[0] - t
        if len(fr) < 2:
            return 0.0
        slope = (ms[-2] - ms[-1]) / (fr[-2] - fr[-1])
        t = max(0.0, ms[-1] - slope * (fr[-1] - f))
        return ms[0] - t

    def predict(self, sizes: Mapping[str, int]) -> float:
        """Predicted latency (ms) of the model whose groups keep ``sizes`` (key -> units); others unpruned."""
        return self.baseline_ms - sum(self.saving(k, n) for k, n in sizes.items())

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_ms": self.baseline_ms, "layers": self.layers, "key": self.key}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyTable":
        return cls(d["baseline_ms"], d["layers"], d.get("key", {}))

    def __repr__(self) -> str:
        return f"LatencyTable({len(self.layers)} layers, baseline {self.baseline_ms:.3f} ms)"


def _module_inputs(model: nn.Module, names: Iterable[str], inputs: Any, forward_fn: Callable | None
                   ) -> dict[str, tuple]:
    """Positional inputs of the first call of each named module during one forward."""
    seen: dict[str, tuple] = {}
    hooks = []
    for name in names:
        def hook(mod, args, name=name):
            seen.setdefault(name, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, inputs, forward_fn)
    finally:
        for h in hooks:
            h.remove()
    return seen



class LatencyBudget:
    """The quantity part of :class:`~prunekit.AdaptivePruner` (a mixin): FLOPs and parameters from the captured
    graph, latency from the :class:`LatencyTable`."""

    def _value(self, graph, kept: Mapping[int, int] | None = None) -> float:
        """The budgeted quantity of the current model after ``kept`` (group id -> units kept)."""
        kept = kept or {}
        if self.kind == "flops":
            return float(graph.macs_kept(kept))
        if self.kind == "params":
            return float(graph.params_kept(kept))
        return self.table.predict({_gkey(g): kept.get(g.id, g.size) for g in graph.groups})

    @property
    def latency_model(self):
        """The :class:`prunekit.LatencyModel` the latency table comes from (LatencyTarget budgets)."""
        if self._latency_model is None:
            from ...cost.latency_model import LatencyModel
            backend, batch = self._lm_spec
            self._latency_model = LatencyModel(self.model, self.example_inputs, backend, device=self.device,
                                               threads=self.threads, batch_size=batch, graph=self._pruner.graph,
                                               forward_fn=self.forward_fn)
        return self._latency_model

    def _latency_ms(self, model: nn.Module, inputs: Any, whole: bool) -> float:
        if whole and getattr(self, "_use_lm", False):
            return float(self.latency_model.measure_model(model, repeats=self.latency_repeats).median_ms)
        if self.measure_fn is not None:
            return float(self._measure(model, inputs))
        from ..cost import latency
        fwd = self.forward_fn if whole else None
        return float(latency(model, inputs, device=self.device, threads=self.threads, repeats=self.latency_repeats,
                             forward_fn=fwd).median_ms)

    # ------------------------------------------------------------------ latency table
    def _table_key(self) -> dict[str, Any]:
        extra = {"latency_model": list(self._lm_spec)} if getattr(self, "_use_lm", False) else {}
        return {**extra, "fingerprint": model_fingerprint(self.model), "device": self.device,
                "threads": self.threads if self.threads is not None else torch.get_num_threads(),
                "grid": self.latency_grid,
                "measure": getattr(self.measure_fn, "__qualname__", type(self.measure_fn).__name__)
                if self.measure_fn is not None else "prunekit.latency"}

    def _table_path(self) -> Path | None:
        src = self._latency_source
        if isinstance(src, (str, Path)):
            return Path(src)
        return self.workdir / LATENCY_FILE if self.workdir is not None and src is None else None

    def _ensure_table(self) -> LatencyTable:
        if self.table is not None:
            return self.table
        key = self._table_key()
        skey = _canon(key)
        path = self._table_path()
        cache: dict[str, Any] = {"format": TABLE_FORMAT, "format_version": FORMAT_VERSION, "tables": {}}
        if path is not None and path.is_file():
            try:
                cache = json.loads(path.read_text())
            except ValueError as e:
                raise WorkdirError(f"{path}: the latency table file is not valid JSON ({e}); delete it to measure "
                                   "again") from None
            if cache.get("format") != TABLE_FORMAT:
                raise WorkdirError(f"{path}: not a prunekit latency table (format {cache.get('format')!r}); "
                                   "pass another latency_table path")
            if skey in cache.get("tables", {}):
                self.table = LatencyTable.from_dict(cache["tables"][skey])
                log.info("latency table for %s reused from %s", key["device"], path)
                return self.table
        self.table = self.measure_table()
        if path is not None:
            cache.setdefault("tables", {})[skey] = self.table.to_dict()
            _write_json(path, cache)
        return self.table

    def measure_table(self) -> LatencyTable:
        """Time every eligible group's modules at each width of ``latency_grid`` (the model is not changed)."""
        t0 = time.perf_counter()
        model, x = self.model, self.example_inputs
        graph = self._pruner.graph
        if getattr(self, "_use_lm", False):
            return self._table_from_model(graph)
        baseline = self._latency_ms(model, x, whole=True)
        layers: dict[str, dict] = {}
        for slot in self._pruner._slots():
            g = slot.group
            names = [m for m in g.modules if m]
            ms, fracs = [], []
            for f in self.latency_grid:
                keep = max(1, int(round(f * g.size)))
                if fracs and keep >= g.size:
                    continue
                trial = model if keep >= g.size else self._pruned_copy(graph, {g.id: list(range(g.size - keep))},
                                                                       verify=False)
                args = _module_inputs(trial, names, x, self.forward_fn)
                ms.append(sum(self._latency_ms(trial.get_submodule(n), args[n], whole=False)
                              for n in names if n in args))
                fracs.append(keep / g.size)
            layers[_gkey(g)] = {"name": _group_name(g), "size": g.size, "fractions": fracs, "ms": ms}
        table = LatencyTable(baseline, layers, self._table_key())
        log.info("latency table: %d layers x %d widths measured on %s in %.2fs (baseline %.3f ms)", len(layers),
                 len(self.latency_grid), self.device, time.perf_counter() - t0, baseline)
        return table

    def _table_from_model(self, graph) -> LatencyTable:
        """The table predicted by :attr:`latency_model`: each group's whole-model latency at each grid width
        (the other groups unpruned); its savings are what the latency model predicts."""
        lm = self.latency_model
        layers: dict[str, dict] = {}
        for slot in self._pruner._slots():
            g = slot.group
            ms, fracs = [], []
            for f in self.latency_grid:
                keep = max(1, int(round(f * g.size)))
                if fracs and keep >= g.size:
                    continue
                ms.append(lm.predict(graph, {g.id: keep}))
                fracs.append(keep / g.size)
            layers[_gkey(g)] = {"name": _group_name(g), "size": g.size, "fractions": fracs, "ms": ms}
        log.info("latency table: %d layers predicted by %r", len(layers), lm)
        return LatencyTable(lm.base_ms, layers, self._table_key())
