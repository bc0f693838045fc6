"""The workdir of :class:`~prunekit.AdaptivePruner`: file names, the resumable state (a
:class:`prunekit.runs.Workdir`), per-iteration checkpoints and the logs (``log.jsonl``, ``log.md``)."""
from __future__ import annotations

import json
import logging
from typing import Any

from ...runs.workdir import ResumeError
from ...surgery import RECORD_ATTR

log = logging.getLogger("prunekit.adaptive")

STATE_FILE = "state.json"
LOG_FILE = "log.jsonl"
TABLE_FILE = "log.md"
RECORD_FILE = "record.json"
FINAL_FILE = "final.safetensors"
LATENCY_FILE = "latency_table.json"
FORMAT = "prunekit.adaptive"
TABLE_FORMAT = "prunekit.latency_table"
FORMAT_VERSION = 1


class WorkdirError(ResumeError):
    """The workdir holds a run that does not fit this call (another model, other settings, a pruned model)."""


class Persistence:
    """The workdir part of :class:`~prunekit.AdaptivePruner` (a mixin): state, resume, checkpoints, logs."""

    def _state(self) -> dict[str, Any]:
        return self._wd.new_state(config=self.config(), model=self._model_info, base=self.base,
                                  iteration=self.iteration, goal=self.goal, done=self.done,
                                  checkpoint=self._checkpoint, history=self.history, final=self.final)

    def _resume(self) -> bool:
        """Restore the run saved in the workdir, if any; True if it had finished."""
        wd = self._wd
        if not wd.has_state():
            return False
        state = wd.read_state()
        wd.check_model(state["model"], self.model, "the saved run was started from a different model",
                       "Resuming needs a freshly built original model of the same architecture and config; or use "
                       "another workdir.")
        wd.check_config(state["config"], self.config(), "Pass the same settings to resume, or use another workdir.")
        self.base, self.goal, self.iteration = state["base"], state["goal"], int(state["iteration"])
        self.history, self.done, self._checkpoint = list(state["history"]), bool(state["done"]), state["checkpoint"]
        self.final = dict(state.get("final") or {})
        if self._checkpoint:
            wd.restore(self.model, self._checkpoint)
            self._pruner.invalidate()
        wd.write_text(LOG_FILE, "".join(json.dumps(e) + "\n" for e in self.history))
        log.info("AdaptivePruner: %s %s after iteration %d", "finished run in" if self.done else "resuming", wd.path,
                 self.iteration)
        return self.done

    def _writes(self) -> bool:
        """Whether this process writes the workdir (rank 0 of the search's group, or no distributed search)."""
        from ...runs.distributed import is_main
        return not getattr(self, "_dist", False) or is_main(self._group)

    def _resume_shared(self) -> bool:
        """:meth:`_resume` on the writing rank; the other ranks of a distributed search receive its outcome
        (schedule state, pruning record and weights), so ranks need no shared file system."""
        if not getattr(self, "_dist", False):
            return self._resume()
        from ...runs.distributed import broadcast_object
        from ...surgery import replay_record
        done = self._resume() if self._writes() else None
        keys = ("base", "goal", "iteration", "history", "done", "_checkpoint", "final")
        box = None
        if self._writes():
            box = {"done": done, "state": {k: getattr(self, k, None) for k in keys},
                   "record": getattr(self.model, RECORD_ATTR, None) or [],
                   "weights": self.model.state_dict() if self.iteration else None}
        box = broadcast_object(box, src=0, group=self._group)
        if not self._writes():
            for k, v in box["state"].items():
                setattr(self, k, v)
            if box["weights"] is not None:
                replay_record(self.model, box["record"])
                self.model.load_state_dict(box["weights"])
                self._pruner.invalidate()
        return bool(box["done"])

    def _save_iteration(self, entry: dict) -> None:
        if not self._writes():
            name = FINAL_FILE if self.done else f"iter_{self.iteration:04d}.safetensors"
            self._checkpoint = name  # what rank 0 wrote (the state stays identical on every rank)
            return
        wd = self._wd
        old = self._checkpoint
        name = FINAL_FILE if self.done else f"iter_{self.iteration:04d}.safetensors"
        self._checkpoint = wd.save_checkpoint(self.model, name, {"iteration": self.iteration, "done": self.done})
        wd.write_json(RECORD_FILE, getattr(self.model, RECORD_ATTR, None) or [])
        wd.commit(self._state(), checkpoint=self._checkpoint, previous=old)
        if entry is not None:
            wd.append_line(LOG_FILE, entry)
        wd.write_text(TABLE_FILE, self.log_table())

    def log_table(self) -> str:
        """The history as a markdown table (what ``workdir/log.md`` holds)."""
        unit = {"flops": "MACs", "params": "params", "latency": "ms (predicted)"}[self.kind]
        lines = ["# AdaptivePruner log\n",
                 f"budget: {self.kind} kept {self.ratio:g} of {self.base:.6g} {unit}; criterion "
                 f"{self._pruner.criterion.name}; granularity {self.granularity}; delta_crop {self.delta_crop:g}; "
                 f"round_to {self.round_to}\n",
                 "| iter | budget | chosen | metric | MACs | params | latency pred / meas (ms) | candidates "
                 "(metric; * chosen, - skipped) | s |",
                 "|---:|---:|---|---:|---:|---:|---|---|---:|"]
        for e in self.history:
            cands = ", ".join(f"{c['name']}: " + ("-" if c["metric"] is None else f"{c['metric']:.4g}")
                              + ("*" if c["index"] == e["chosen"] else "") for c in e["candidates"])
            lat = "-" if e.get("latency_predicted") is None else \
                f"{e['latency_predicted']:.3f} / {e.get('latency_measured') or float('nan'):.3f}"
            lines.append(f"| {e['iteration']} | {e['budget_ratio']:.2%} | {e['chosen_name']} | {e['metric']:.4g} | "
                         f"{e['macs']:.4g} | {e['params']:.4g} | {lat} | {cands} | {e['seconds']:.2f} |")
        if self.done:
            lines.append(f"\ndone: {self.final}")
        return "\n".join(lines) + "\n"
