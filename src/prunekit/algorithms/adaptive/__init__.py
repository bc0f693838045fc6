"""``pk.AdaptivePruner``: NetAdapt-style search, one group (or block) per iteration, with short fine-tuning.

    ap = pk.AdaptivePruner(model, x, pk.FlopsTarget(0.5), finetune_fn=train_a_little, eval_fn=accuracy,
                           workdir="runs/adapt", round_to=8)
    model = ap.run()

Every iteration lowers the budget by ``delta_crop`` of the ORIGINAL model's quantity (FLOPs, parameters or
latency).  Each candidate -- one prunable group, or one block of consecutive groups that share a module
prefix -- proposes the smallest cut of its lowest-ranked units that brings the whole model under the
iteration's budget.  The cut is computed, not tried: FLOPs and parameters from the captured graph
(``macs_kept`` / ``params_kept``), latency from a per-layer latency table measured once on the target device.
Candidates that cannot meet the budget on their own are skipped.  Every proposal is a pruned copy of the
model, fine-tuned briefly by ``finetune_fn(copy, iteration, candidate)`` (or the part of these arguments that
the function takes, see :mod:`prunekit._callbacks`) and scored by ``eval_fn(copy)``
(higher is better); the best proposal (ties: the lowest candidate index) becomes the model.  When the budget
is met, groups whose width is not a multiple of ``round_to`` are rounded down, and ``final_finetune_fn`` runs.

The model passed in is pruned in place (and returned), like :class:`prunekit.Pruner`.

Workdir (all files written atomically after every iteration):

* ``state.json``: settings, model fingerprint, iteration count, current budget, history, ``done`` flag;
* ``iter_<n>.safetensors`` (``pk.save``: weights + pruning record; the previous one is removed) and
  ``final.safetensors`` when the search has finished; ``record.json``: the pruning record;
* ``log.jsonl``: one JSON line per iteration (budget, every candidate with its metric, MACs, params and
  predicted latency, the choice, seconds; measured latency for latency budgets); ``log.md``: the same as a table;
* ``latency_table.json``: per-layer latency tables, keyed by model fingerprint + device + threads.

Resuming: call :meth:`AdaptivePruner.run` again with a freshly built ORIGINAL model (same architecture and
config) and the same settings and workdir.  The last checkpoint's record is replayed on the model and its
weights loaded; the search continues with the next iteration, and a finished search returns at once.
Candidate evaluation is seeded (``seed + iteration * 1000 + candidate index``), so an interrupted and
resumed run ends where an uninterrupted one does, and ``workers > 1`` (spawned CPU processes, one thread
each) chooses the same candidates as ``workers=1``.
"""
from __future__ import annotations

from ...io.checkpoint import model_fingerprint
# the module's former contents, for old imports (``from prunekit.algorithms.adaptive import ...``)
from .candidates import _gkey, _group_name  # noqa: F401
from .config import _KINDS, parse_budget  # noqa: F401
from .evaluate import Candidate, _evaluate, _worker_init  # noqa: F401
from .latency import LatencyTable
from .search import AdaptivePruner
from .state import (FINAL_FILE, FORMAT, FORMAT_VERSION, LATENCY_FILE, LOG_FILE, RECORD_FILE,  # noqa: F401
                    STATE_FILE, TABLE_FILE, TABLE_FORMAT, WorkdirError)

__all__ = ["AdaptivePruner", "Candidate", "LatencyTable", "WorkdirError", "model_fingerprint"]
