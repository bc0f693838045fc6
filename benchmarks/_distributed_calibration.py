"""Data-parallel calibration on a tiny random Llama with 1, 2 and 4 CPU ranks (gloo): are the scores the same, and
how long does scoring take per rank count.

    python benchmarks/_distributed_calibration.py            # prints the rows, writes results/distributed_calibration.*
    from _distributed_calibration import calibration_rows    # what benchmarks/scale.py calls

Each rank count runs in freshly spawned processes (one thread each).  The calibration set (``BATCHES`` batches of
``BATCH`` padded sequences) is split round robin over the ranks; every rank scores with ``activation``,
``wanda_sp`` and ``flap`` (the statistics merged across ranks), rank 0's scores are compared with the 1-rank
scores.  ``seconds`` is the slowest rank's wall time for the three scoring calls (process start and model
building excluded); on a loaded or small machine (the ranks share its cores) it is noisy.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

CRITERIA = ("activation", "wanda_sp", "flap")
BATCHES, BATCH, SEQ, VOCAB = 16, 4, 64, 128


def _config():
    import transformers as tf
    return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, attn_implementation="eager")


def _data():
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(BATCHES):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[-1, SEQ - 8 - i % 8:] = 0  # one right-padded sequence per batch
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import transformers as tf
        import prunekit as pk
        from prunekit.plan.importance import get_criterion

        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(_config()).eval()
        graph = pk.analyze(model, {"input_ids": torch.arange(8).reshape(1, 8)})
        mine = _data()[rank::world]
        dist.barrier()
        t0 = time.perf_counter()
        scores = {name: get_criterion(name).scores(model, graph, data=mine) for name in CRITERIA}
        seconds = time.perf_counter() - t0
        times = [None] * world
        dist.all_gather_object(times, seconds)
        if rank == 0:
            torch.save({"scores": scores, "seconds": max(times)}, os.path.join(out_dir, f"world{world}.pt"))
    finally:
        dist.destroy_process_group()


def _run(world: int, out_dir: str, timeout: float = 300.0) -> dict:
    import torch.multiprocessing as mp
    ctx = mp.spawn(_worker, args=(world, _free_port(), out_dir), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    result = os.path.join(out_dir, f"world{world}.pt")
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"distributed calibration with {world} rank(s) did not finish in {timeout:.0f} s")
    except mp.ProcessExitedException as e:
        # rank 0 saves only after every collective completed; a rank killed by a signal after that (seen now and
        # then inside gloo's teardown on a loaded machine) does not change the result
        if not os.path.exists(result) or e.exit_code is None or e.exit_code >= 0:
            raise
        for p in ctx.processes:
            p.join(10)
    return torch.load(result, weights_only=False)


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[c][g].double() - b[c][g].double()).abs().max()) for c in a for g in a[c])


def _scale(a: dict) -> float:
    return max(float(a[c][g].abs().max()) for c in a for g in a[c])


def calibration_rows(ranks=(1, 2, 4)) -> list[dict]:
    """One dict per rank count: ``ranks``, ``seconds`` (slowest rank's scoring time), ``max_abs_diff_vs_1``
    (largest score difference from the 1-rank run over the three criteria), ``equal`` (within 1e-5 of the
    largest score: float64 statistics summed in another order), ``bitwise_equal``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = _run(1, tmp)
        scale = _scale(base["scores"])
        for w in ranks:
            res = base if w == 1 else _run(w, tmp)
            diff = _max_abs_diff(res["scores"], base["scores"])
            bitwise = all(torch.equal(res["scores"][c][g], base["scores"][c][g]) for c in base["scores"]
                          for g in base["scores"][c])
            rows.append({"ranks": w, "seconds": round(float(res["seconds"]), 4), "max_abs_diff_vs_1": diff,
                         "equal": diff <= 1e-5 * scale, "bitwise_equal": bitwise})
    return rows


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench_common import git_state
    rows = calibration_rows()
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    meta = {"model": "LlamaForCausalLM hidden 64, 2 layers, 4 heads (2 kv), vocab 128, random weights",
            "data": f"{BATCHES} batches x {BATCH} sequences x {SEQ} tokens, split round robin over the ranks",
            "criteria": list(CRITERIA), "cpu_count": os.cpu_count(), "code": git_state(), "rows": rows}
    (out / "distributed_calibration.json").write_text(json.dumps(meta, indent=2) + "\n")
    lines = ["# Data-parallel calibration (tiny Llama, gloo CPU ranks)", "",
             f"{meta['model']}; {meta['data']}; criteria {', '.join(CRITERIA)}; code {meta['code']}; "
             f"{meta['cpu_count']} CPUs (ranks share them: times are noisy on a loaded machine).", "",
             "| ranks | seconds | max abs diff vs 1 rank | equal | bitwise |", "|---|---|---|---|---|"]
    lines += [f"| {r['ranks']} | {r['seconds']:.3f} | {r['max_abs_diff_vs_1']:.3g} | {r['equal']} | "
              f"{r['bitwise_equal']} |" for r in rows]
    (out / "distributed_calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
