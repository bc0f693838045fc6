"""LLM pruning quality: held-out perplexity of a small trained Llama (GQA) pruned to 80% / 50% of its parameters.

    python benchmarks/llm_quality.py            # full run -> benchmarks/results/llm_quality.{json,md}
    python benchmarks/llm_quality.py --quick    # smoke run on a tiny, briefly trained model (seconds)

Corpus and dense model: ``_llm_corpus.py`` (Python documentation sources from the Debian package python3.11-doc,
installed here with apt-get when missing; byte-level tokens; the model is trained once and cached).
For each kept fraction: every calibration criterion (activation, wanda_sp, flap, taylor) and magnitude (l2), width
only, each with and without FLAP bias compensation; depth only (block influence); width + depth (one block, then
the width to the target); Torch-Pruning 1.6.1's LLM recipe (examples/LLMs/prune_llm.py settings: group
MagnitudeImportance(p=2, group_reduction="mean"), uniform ratio, whole heads, ratio searched to hit the same
params kept; run in a subprocess with PYTHONPATH=/tmp/tpt). Every model is then distilled from the dense teacher
for the same budget (pk.distill, fixed steps). Noise: perplexity range over 4 disjoint quarters of the test
windows, and 3 distillation seeds for the best method at each fraction.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _llm_corpus as C  # noqa: E402

TP_PATH = os.environ.get("TP_PATH", "/tmp/tpt")
CRITERIA = ["l2", "activation", "wanda_sp", "flap", "taylor"]
QUICK_CONFIG = dict(C.CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)


def ensure_corpus() -> None:
    try:
        C.corpus_dir()
        return
    except FileNotFoundError:
        pass
    apt = shutil.which("apt-get")
    if apt is None:
        sys.exit("llm_quality: the corpus (Debian package python3.11-doc) is missing and apt-get is not available; "
                 "install the Python 3.11 documentation sources under /usr/share/doc/python3.11/html/_sources")
    print("llm_quality: installing the corpus: apt-get install -y python3.11-doc", file=sys.stderr)
    cmd = [apt, "install", "-y", "python3.11-doc"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        cmd = ["sudo", "-n", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True)
    try:
        C.corpus_dir()
    except FileNotFoundError:
        sys.exit(f"llm_quality: could not install python3.11-doc (apt-get exit {r.returncode}: "
                 f"{(r.stderr or r.stdout).strip()[-300:]}); run as root: apt-get install -y python3.11-doc")


def ppl_stats(model, test: torch.Tensor) -> dict:
    import prunekit as pk
    q = [pk.hf.perplexity(model, part) for part in test.chunk(4)]
    return {"ppl": pk.hf.perplexity(model, test), "ppl_quarters_min": min(q), "ppl_quarters_max": max(q)}


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


def batches_of(w: torch.Tensor, rows: int = 8) -> list:
    return [{"input_ids": b} for b in w.split(rows)]


# ---------------------------------------------------------------------------------------------- methods
def prune_width(model, x, calib, criterion: str, frac: float, bias: bool, params0: int | None = None):
    import prunekit as pk
    params0 = params0 or nparams(model)
    r = min(1.0, frac * params0 / nparams(model))
    data = calib if criterion != "l2" or bias else None
    p = pk.Pruner(model, x, criterion, pk.ParamsTarget(r), data=data, global_pruning=criterion == "flap",
                  bias_compensation=bias)
    p.prune()
    return model


def prune_depth(model, x, calib, frac: float | None = None, n_blocks: int | None = None):
    import prunekit as pk
    dp = pk.DepthPruner(model, x, data=calib, n_blocks=n_blocks,
                        target=None if n_blocks else pk.ParamsTarget(frac), progress=False)
    return dp.prune()


def tp_prune(model, frac: float, workdir: Path) -> tuple[object, dict]:
    """Torch-Pruning's recipe in a subprocess (its own PYTHONPATH); the ratio is searched to hit ``frac``."""
    src, dst = workdir / "tp_in.pt", workdir / "tp_out.pt"
    torch.save(model, src)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TP_PATH, os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, __file__, "--tp-worker", str(src), str(dst), str(frac)], env=env,
                           capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise RuntimeError("Torch-Pruning worker did not finish in 300 s (seen here: a loop in "
                           "DependencyGraph.get_all_groups on this transformers' Llama)") from None
    if r.returncode != 0:
        raise RuntimeError(f"Torch-Pruning worker failed: {r.stderr.strip()[-800:]}")
    out = torch.load(dst, weights_only=False)
    return out["model"], out["info"]


def tp_worker(src: str, dst: str, frac: float) -> None:
    import torch_pruning as tp
    base = torch.load(src, weights_only=False)
    p0 = nparams(base)
    ids = torch.randint(0, base.config.vocab_size, (1, 64))

    def run(ratio: float):
        m = copy.deepcopy(base)
        num_heads = {}
        for mod in m.modules():
            if hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):
                num_heads[mod.q_proj] = m.config.num_attention_heads
                num_heads[mod.k_proj] = m.config.num_key_value_heads
                num_heads[mod.v_proj] = m.config.num_key_value_heads
        pruner = tp.pruner.BasePruner(m, example_inputs=ids, importance=tp.importance.GroupMagnitudeImportance(
            p=2, group_reduction="mean"), pruning_ratio=ratio, ignored_layers=[m.lm_head], num_heads=num_heads,
            prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, global_pruning=False,
            round_to=None, output_transform=lambda out: out.logits if hasattr(out, "logits") else out[0])
        pruner.step()
        hd = m.config.head_dim if getattr(m.config, "head_dim", None) else m.config.hidden_size // m.config.num_attention_heads
        for mod in m.modules():
            if hasattr(mod, "q_proj") and hasattr(mod, "k_proj"):
                mod.num_key_value_groups = mod.q_proj.out_features // mod.k_proj.out_features
        m.config.head_dim = hd
        m.config.hidden_size = m.model.embed_tokens.weight.shape[1]
        m.config.num_attention_heads = m.model.layers[0].self_attn.q_proj.out_features // hd
        m.config.num_key_value_heads = m.model.layers[0].self_attn.k_proj.out_features // hd
        m.config.intermediate_size = m.model.layers[0].mlp.gate_proj.out_features
        return m

    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):  # bisection on the uniform ratio for the params kept
        mid = (lo + hi) / 2
        m = run(mid)
        kept = nparams(m) / p0
        if best is None or abs(kept - frac) < abs(best[1] - frac):
            best = (mid, kept, m)
        if kept > frac:
            lo = mid
        else:
            hi = mid
    ratio, kept, m = best
    with torch.no_grad():
        m(input_ids=ids)
    torch.save({"model": m, "info": {"pruning_ratio": ratio, "params_kept": kept, "tp_version": tp.__version__}}, dst)


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, few steps, one fraction")
    ap.add_argument("--out", default=str(HERE / "results"), help="directory for llm_quality.{json,md}")
    ap.add_argument("--distill-steps", type=int, default=None)
    ap.add_argument("--tp-worker", nargs=3, metavar=("IN", "OUT", "FRAC"), help=argparse.SUPPRESS)
    ap.add_argument("--rerender", metavar="JSON", help="recompute targets + markdown of an existing result file")
    a = ap.parse_args(argv)
    if a.rerender:
        rerender(a.rerender)
        return 0
    if a.tp_worker:
        tp_worker(a.tp_worker[0], a.tp_worker[1], float(a.tp_worker[2]))
        return 0
    import prunekit as pk
    ensure_corpus()
    t0 = time.perf_counter()
    data = C.splits()
    if a.quick:
        torch.manual_seed(0)
        dense = C.build_model(QUICK_CONFIG)
        opt = torch.optim.AdamW(dense.parameters(), lr=3e-3)
        train = C.to_tensor(data["train"][:200_000])
        for _ in range(30):
            idx = torch.randint(0, len(train) - 65, (8,))
            ids = torch.stack([train[i:i + 64] for i in idx.tolist()])
            loss = dense(input_ids=ids, labels=ids, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        dense.eval()
        info = {"quick": True, "params": nparams(dense), "config": QUICK_CONFIG}
        seq, n_calib, n_test, fracs, steps, seeds = 64, 8, 8, [0.5], a.distill_steps or 3, [0]
        criteria, distill_rows = ["l2", "flap"], 8
    else:
        dense, info = C.dense_model(log=lambda s: print(s, file=sys.stderr))
        seq, n_calib, n_test, fracs, steps, seeds = C.TRAIN["seq"], 64, 128, [0.8, 0.5], a.distill_steps or 150, [0, 1, 2]
        criteria, distill_rows = CRITERIA, 256
    calib_w = C.windows(C.to_tensor(data["calib"]), seq, n_calib)
    test = C.windows(C.to_tensor(data["test"]), seq, n_test)
    distill_w = C.windows(C.to_tensor(data["calib"]), seq, distill_rows, stride=seq // 2)
    calib, distill_data = batches_of(calib_w), batches_of(distill_w)
    x = {"input_ids": calib_w[:1]}
    p0 = nparams(dense)
    dense_ppl = ppl_stats(dense, test)
    rows = []

    def recover(model, seed: int):
        torch.manual_seed(seed)
        pk.distill(model, dense, distill_data, steps=steps, lr=1e-3, temperature=1.0, progress=False, seed=seed)
        return ppl_stats(model.eval(), test)

    with tempfile.TemporaryDirectory() as tmp:
        for frac in fracs:
            methods = [(f"width {c}" + (" +bias" if b else ""), "width", c, b) for c in criteria for b in (False, True)]
            methods += [("depth (block influence)", "depth", None, False),
                        ("width flap + depth 1 block", "both", "flap", False), ("Torch-Pruning recipe", "tp", None, False)]
            for name, kind, crit, bias in methods:
                row = {"kept_target": frac, "method": name}
                t1 = time.perf_counter()
                try:
                    m = copy.deepcopy(dense)
                    if kind == "width":
                        prune_width(m, x, calib, crit, frac, bias)
                    elif kind == "depth":
                        row["removed"] = prune_depth(m, x, calib, frac=frac).removed
                    elif kind == "both":
                        row["removed"] = prune_depth(m, x, calib, n_blocks=1).removed
                        prune_width(m, x, calib, crit, frac, bias, params0=p0)
                    else:
                        m, row["tp"] = tp_prune(m, frac, Path(tmp))
                    row["params_kept"] = nparams(m) / p0
                    row.update({f"{k}": v for k, v in ppl_stats(m.eval(), test).items()})
                    row["distilled"] = recover(copy.deepcopy(m), seeds[0])
                    row["_model"] = m
                except Exception as e:  # a failed method is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row["seconds"] = round(time.perf_counter() - t1, 1)
                print(f"[{time.perf_counter() - t0:.0f} s] {frac:.0%} {name}: "
                      f"{row.get('ppl', row.get('error'))}", file=sys.stderr)
                rows.append(row)
            ok = [r for r in rows if r["kept_target"] == frac and "distilled" in r]
            if ok and len(seeds) > 1:  # seed spread of the recovery step for the best method
                best = min(ok, key=lambda r: r["distilled"]["ppl"])
                best["distilled_seeds"] = {s: recover(copy.deepcopy(best["_model"]), s)["ppl"] for s in seeds}
            for r in ok:
                r.pop("_model", None)
    for r in rows:
        r.pop("_model", None)
    targets = compute_targets(rows, dense_ppl, fracs)
    result = {"quick": a.quick, "dense": {**info, **dense_ppl}, "distill_steps": steps,
              "distill": {"lr": 1e-3, "temperature": 1.0, "rows": int(distill_w.shape[0]), "seq": seq},
              "calib_windows": int(calib_w.shape[0]), "test_windows": int(test.shape[0]), "seeds": seeds,
              "rows": rows, "targets": targets, "seconds": round(time.perf_counter() - t0, 1),
              "torch": torch.__version__}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "llm_quality_quick" if a.quick else "llm_quality"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def compute_targets(rows: list, dense_ppl: dict, fracs) -> dict:
    """The issue's targets per kept fraction.  The Torch-Pruning baseline is its own recipe when the worker ran;
    when it failed (Torch-Pruning 1.6.1 hangs in ``get_all_groups`` on transformers 5 Llama models), the same
    recipe -- group L2 magnitude, mean over the group, no calibration, no recovery -- run by prunekit
    (``width l2``) stands in, and ``tp_baseline`` says which one was used."""
    targets = {}
    for frac in fracs:
        fr = [r for r in rows if r["kept_target"] == frac and "ppl" in r]
        tp_row = next((r for r in fr if r["method"].startswith("Torch-Pruning")), None)
        baseline = "Torch-Pruning 1.6.1"
        if tp_row is None:
            tp_row = next((r for r in fr if r["method"] == "width l2"), None)
            tp_err = next((r.get("error", "") for r in rows if r["kept_target"] == frac
                           and r["method"].startswith("Torch-Pruning")), "")
            baseline = ("its recipe (group L2 magnitude, no calibration) run by prunekit ('width l2'): Torch-Pruning "
                        f"itself failed ({tp_err[:120]})")
        # only methods that reached the target count (depth alone may not get there on a few-layer model)
        ours = [r for r in fr if not r["method"].startswith("Torch-Pruning") and r["params_kept"] <= frac + 0.02]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["ppl"])
        bestd = min(ours, key=lambda r: r["distilled"]["ppl"])
        t = {"best_no_recovery": best["method"], "best_ppl": best["ppl"],
             "best_distilled": bestd["method"], "best_distilled_ppl": bestd["distilled"]["ppl"]}
        if tp_row:
            t["tp_baseline"] = baseline
            t["tp_ppl"] = tp_row["ppl"]
            inc_ours, inc_tp = best["ppl"] - dense_ppl["ppl"], tp_row["ppl"] - dense_ppl["ppl"]
            t["increase_ratio_vs_tp"] = inc_ours / inc_tp if inc_tp > 0 else None
            if abs(frac - 0.8) < 1e-9:
                t["target_half_of_tp_increase_met"] = bool(inc_tp > 0 and inc_ours <= 0.5 * inc_tp)
        t["distilled_vs_dense"] = bestd["distilled"]["ppl"] / dense_ppl["ppl"]
        if abs(frac - 0.5) < 1e-9:
            t["target_within_1.5x_dense_met"] = t["distilled_vs_dense"] <= 1.5
        targets[f"{frac:.0%}"] = t
    return targets


def rerender(path: str) -> None:
    """Recompute the targets and the markdown of an existing ``llm_quality.json`` (no model is run)."""
    p = Path(path)
    r = json.loads(p.read_text())
    fracs = sorted({row["kept_target"] for row in r["rows"]}, reverse=True)
    r["targets"] = compute_targets(r["rows"], r["dense"], fracs)
    p.write_text(json.dumps(r, indent=2, default=str))
    p.with_suffix(".md").write_text(markdown(r))
    print(markdown(r))


def markdown(r: dict) -> str:
    d = r["dense"]
    lines = [f"# LLM quality ({'quick smoke run' if r['quick'] else 'full'})", "",
             f"Dense: {d['params']:,} params, held-out ppl {d['ppl']:.3f} (quarters {d['ppl_quarters_min']:.3f}-"
             f"{d['ppl_quarters_max']:.3f}); distill budget {r['distill_steps']} steps; {r['test_windows']} test "
             f"windows; {r['seconds']:.0f} s", "",
             "| kept | method | params kept | ppl (quarters) | after distill |", "| --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['kept_target']:.0%} | {row['method']} | - | error: {row['error'][:80]} | - |")
            continue
        seeds = row.get("distilled_seeds")
        dd = f"{row['distilled']['ppl']:.3f}" + (f" (seeds {', '.join(f'{v:.3f}' for v in seeds.values())})"
                                                 if seeds else "")
        lines.append(f"| {row['kept_target']:.0%} | {row['method']} | {row['params_kept']:.3f} | {row['ppl']:.3f} "
                     f"({row['ppl_quarters_min']:.2f}-{row['ppl_quarters_max']:.2f}) | {dd} |")
    lines += ["", "Targets: " + json.dumps(r["targets"], default=str)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
