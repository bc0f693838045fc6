"""Scale: prune a checkpoint larger than the memory it is given, and analyse the largest configs on meta.

    python benchmarks/scale.py                 # ~3B-parameter random Llama (bf16, ~6 GB on disk), <= ~20 min
    python benchmarks/scale.py --quick         # ~0.3B, a few minutes
    python benchmarks/scale.py --size 7        # billions of parameters (scaled down if the disk is too small)

Writes benchmarks/results/scale.{json,md}.  Steps:

1. **generate**: a random-weight Llama-architecture checkpoint of ``--size`` billion parameters as sharded bf16
   safetensors (``--shard-mb`` per shard), written tensor by tensor (never the whole model in memory); free disk
   is checked first (``shutil.disk_usage``) and the size scaled down with a message if needed.
2. **stream**: ``pk.hf.prune_checkpoint(..., target=ParamsTarget(0.5), criterion="l2", uniform=True)`` in a child
   process whose resident memory is polled (``/proc/PID/status``) and which is killed if it passes the limit
   (``--mem-fraction`` of the checkpoint size; ``resource.setrlimit(RLIMIT_AS)`` is unreliable with torch's
   address-space reservations); peak RSS is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``.
3. **equality**: a smaller copy (same architecture, 4 layers, hidden 512) is pruned by streaming and in memory with
   the same plan; every output tensor must be equal.
4. **analysis on meta**: build + ``pk.analyze`` time and peak RSS (each in its own child process) for Llama-2-7B,
   Llama-3-70B and a 128-expert Qwen3-MoE config (Qwen3-30B-A3B shapes).

``calibration_ranks``: data-parallel calibration with 1/2/4 gloo ranks (``_distributed_calibration.calibration_rows``):
the scores must equal the 1-rank scores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

ANALYSIS_CFGS = {
    "llama-2-7b": ("LlamaConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)),
    "llama-3-70b": ("LlamaConfig", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256)),
    "qwen3-moe-128e": ("Qwen3MoeConfig", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                              num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                                              intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
                                              vocab_size=151936)),
}


def llama_shape(billions: float) -> dict:
    """A Llama config of about ``billions`` parameters (hidden / layers scaled together, head_dim 128)."""
    best = None
    for hidden in range(1024, 8193, 256):
        if hidden % 128:
            continue
        inter = int(math.ceil(hidden * 8 / 3 / 256) * 256)
        vocab = 32000
        per_layer = 4 * hidden * hidden * 0.625 + 3 * hidden * inter  # q, o + k, v at 1/4 (GQA) + MLP
        layers = max(2, round((billions * 1e9 - 2 * vocab * hidden) / per_layer))
        if layers < 2 * hidden / 256:  # keep the usual depth / width proportion
            continue
        best = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 128,
                    num_key_value_heads=max(1, hidden // 512), intermediate_size=inter, vocab_size=vocab)
    return best or dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=2816, vocab_size=32000)


def _params(cfg_kw: dict) -> int:
    import torch
    import transformers as tf
    with torch.device("meta"):
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg_kw))
    return sum(p.numel() for p in m.parameters())


def generate(path: Path, cfg_kw: dict, shard_mb: int, seed: int = 0) -> dict:
    """Write a random-weight Llama checkpoint (bf16 shards + index + config), one tensor at a time."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file
    cfg = tf.LlamaConfig(**cfg_kw, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    with torch.device("meta"):
        meta = tf.LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)
    items = list(meta.state_dict().items())
    shards, cur, cur_bytes = [], [], 0
    for k, t in items:
        n = t.numel() * 2
        if cur and cur_bytes + n > shard_mb * 2**20:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((k, tuple(t.shape)))
        cur_bytes += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k, shape in shard:
            if k.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            else:
                t = torch.randn(shape, generator=gen) * 0.02
            tensors[k] = t.to(torch.bfloat16)
            weight_map[k] = name
            total += t.numel() * 2
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"shards": len(shards), "bytes": total}


def _rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(args: list[str], limit_bytes: int | None, timeout: float) -> dict:
    """Run ``scale.py --child ...`` and poll its RSS; kill it past ``limit_bytes``.  Returns its JSON + peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    # output to files, not pipes: a child that writes more than a pipe buffer would block while we only poll
    out_f, err_f = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=out_f, stderr=err_f,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    polled, killed = 0, False
    while p.poll() is None:
        polled = max(polled, _rss_of(p.pid))
        if limit_bytes is not None and polled > limit_bytes:
            p.kill()
            killed = True
            break
        if time.perf_counter() - t0 > timeout:
            p.kill()
            break
        time.sleep(0.05)
    p.wait()
    out_f.seek(0)
    err_f.seek(0)
    out, err = out_f.read(), err_f.read()
    out_f.close()
    err_f.close()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    polled = max(polled, 1)
    res = {"wall_s": round(time.perf_counter() - t0, 2), "rc": p.returncode, "killed_over_limit": killed,
           "peak_rss_polled_mb": round(polled / 2**20, 1),
           # ru_maxrss of children is the max over all children so far: reported when this child raised it
           "peak_rss_mb": round(ru / 2**20, 1) if ru > before * 1024 else round(polled / 2**20, 1)}
    try:
        res.update(json.loads(out.strip().splitlines()[-1]))
    except Exception:
        res["error"] = (err or out)[-1500:]
    return res


# ----------------------------------------------------------------------------- child jobs
def child(argv: list[str]) -> None:
    import logging
    import warnings
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import torch
    import prunekit as pk
    job = argv[0]
    if job == "stream":
        src, out = argv[1], argv[2]
        t0 = time.perf_counter()
        res = pk.hf.prune_checkpoint(src, out, criterion="l2", target=pk.ParamsTarget(0.5), round_to=64,
                                     uniform=True)
        print(json.dumps({"stream_s": round(time.perf_counter() - t0, 2), "params_before": res.params_before,
                          "params_after": res.params_after, "peak_tensor_mb": round(res.peak_tensor_bytes / 2**20, 1),
                          "largest_shard_mb": round(res.largest_shard_bytes / 2**20, 1),
                          "config_changes": {k: list(v) for k, v in res.changed.items()},
                          "plan": {str(k): v for k, v in res.plan.items()}}))
    elif job == "baseline":  # the interpreter with torch, transformers and prunekit imported
        import transformers  # noqa: F401
        print(json.dumps({"imported": True}))
    elif job == "analyze":
        import transformers as tf
        cls, kw = ANALYSIS_CFGS[argv[1]]
        cfg = getattr(tf, cls)(**kw, use_cache=False)
        cfg._attn_implementation = "eager"
        t0 = time.perf_counter()
        with torch.device("meta"):
            m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()  # checkpoints are bf16
        build = time.perf_counter() - t0
        x = pk.hf.example_inputs(m, 16)
        t0 = time.perf_counter()
        g = pk.analyze(m, x)
        an = time.perf_counter() - t0
        kinds: dict[str, int] = {}
        for gr in g.prunable_groups:
            kinds[gr.unit] = kinds.get(gr.unit, 0) + 1
        print(json.dumps({"params_b": round(sum(p.numel() for p in m.parameters()) / 1e9, 2), "build_s": round(build, 2),
                          "analyze_s": round(an, 2), "groups": len(g.groups), "prunable": len(g.prunable_groups),
                          "prunable_by_unit": kinds, "ops": len(g.tape.ops)}))
    elif job == "equal":
        import transformers as tf
        src, out = Path(argv[1]), Path(argv[2])
        res = pk.hf.prune_checkpoint(src, out / "stream", criterion="l2", target=pk.ParamsTarget(0.5), round_to=64,
                                     uniform=True)
        # in memory in float32 (bf16 values are exact in float32; pk.prune's verification tolerance is for float32)
        ref = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        g = pk.analyze(ref, pk.hf.example_inputs(ref))
        pk.prune(ref, g, res.plan)
        got = tf.AutoModelForCausalLM.from_pretrained(out / "stream", dtype=torch.bfloat16).state_dict()
        a = ref.state_dict()
        equal = set(a) == set(got) and all(torch.equal(a[k].to(torch.bfloat16), got[k]) for k in a)
        print(json.dumps({"tensors": len(a), "equal": bool(equal), "params_after": res.params_after}))


# ----------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~0.3B model (a few minutes)")
    ap.add_argument("--size", type=float, default=None, help="billions of parameters (default 3; --quick 0.3)")
    ap.add_argument("--shard-mb", type=int, default=None, help="shard size in MB (default: size-dependent)")
    ap.add_argument("--mem-fraction", type=float, default=0.5,
                    help="the streaming child is killed past this fraction of the checkpoint size in RSS")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--skip-analysis", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "scale"))
    args = ap.parse_args()
    size = args.size if args.size is not None else (0.3 if args.quick else 3.0)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pk_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    notes = []
    free = shutil.disk_usage(work).free
    need = lambda b: b * 2e9 * 2.2  # bf16 source + pruned output (+ the small copy)
    if need(size) > free * 0.8:
        new = max(0.05, free * 0.8 / 2.2 / 2e9)
        notes.append(f"scaled down from {size}B to {new:.2f}B parameters: {free / 2**30:.1f} GiB free in {work}")
        print(notes[-1], file=sys.stderr)
        size = new
    cfg_kw = llama_shape(size)
    shard_mb = args.shard_mb or (500 if size >= 1 else 100)
    meta = {"size_b_requested": size, "config": cfg_kw, "shard_mb": shard_mb, "workdir": str(work), "notes": notes,
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    result: dict = {"meta": meta}
    try:
        src = work / "src"
        t0 = time.perf_counter()
        gen = generate(src, cfg_kw, shard_mb)
        meta.update(params=_params(cfg_kw), checkpoint_mb=round(gen["bytes"] / 2**20, 1), shards=gen["shards"],
                    generate_s=round(time.perf_counter() - t0, 1))
        limit = int(args.mem_fraction * gen["bytes"])
        base = run_child(["baseline"], None, timeout=300)
        meta["baseline_rss_mb"] = base["peak_rss_polled_mb"]  # python + torch + transformers + prunekit
        base_rss = int(base["peak_rss_polled_mb"] * 2**20)
        floor = base_rss + 2 * shard_mb * 2**20 + 256 * 2**20  # + the meta graph and analysis
        if limit < floor:
            notes.append(f"the memory limit {args.mem_fraction} x checkpoint = {limit / 2**20:.0f} MB is below the "
                         f"interpreter ({base_rss / 2**20:.0f} MB) + 2 shards + 256 MB; raised to that (use a "
                         "larger --size for a meaningful bound)")
            limit = floor
        st = run_child(["stream", str(src), str(work / "out")], limit, timeout=3600)
        st["limit_mb"] = round(limit / 2**20, 1)
        st["rss_fraction_of_checkpoint"] = round(st["peak_rss_mb"] / meta["checkpoint_mb"], 3)
        st["within_limit"] = st.get("rc") == 0 and not st["killed_over_limit"] and st["peak_rss_mb"] * 2**20 <= limit
        st.pop("plan", None)
        result["stream"] = st
        shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
        small = llama_shape(0.05) | {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                                     "num_key_value_heads": 2, "intermediate_size": 1408}
        generate(work / "small", small, 8)
        result["equality"] = run_child(["equal", str(work / "small"), str(work / "small_out")], None, timeout=1200)
        result["equality"]["config"] = small
        if not args.skip_analysis:
            result["analysis"] = {name: run_child(["analyze", name], None, timeout=900) for name in ANALYSIS_CFGS}
        try:  # data-parallel calibration: the same scores with 1, 2 and 4 gloo ranks
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from _distributed_calibration import calibration_rows
            result["calibration_ranks"] = {str(r["ranks"]): r for r in calibration_rows((1, 2, 4))}
        except Exception as e:  # reported, not fatal
            result["calibration_ranks"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m, st = r["meta"], r.get("stream", {})
    lines = ["# Scale: streaming pruning and analysis on meta", "",
             f"Random-weight Llama, {m.get('params', 0) / 1e9:.2f}B parameters, bf16, {m.get('shards')} shards of "
             f"<= {m['shard_mb']} MB ({m.get('checkpoint_mb', 0) / 1024:.2f} GiB on disk); config {m['config']}.", ""]
    lines += [f"Note: {n}" for n in m.get("notes", [])]
    lines += ["| step | figure |", "| --- | --- |",
              f"| generate | {m.get('generate_s')} s |",
              f"| stream prune to ParamsTarget(0.5), l2, uniform, round_to 64 | {st.get('stream_s')} s "
              f"(child wall {st.get('wall_s')} s), params {st.get('params_before')} -> {st.get('params_after')} |",
              f"| peak RSS of the streaming process | {st.get('peak_rss_mb')} MB = {st.get('rss_fraction_of_checkpoint')} "
              f"of the checkpoint; limit {st.get('limit_mb')} MB; within: {st.get('within_limit')} |",
              f"| peak tensor bytes held (instrumented loader) | {st.get('peak_tensor_mb')} MB (largest shard "
              f"{st.get('largest_shard_mb')} MB) |",
              f"| streaming == in-memory prune, same plan (small copy) | {r.get('equality', {}).get('equal')} "
              f"({r.get('equality', {}).get('tensors')} tensors) |", ""]
    if st.get("error"):
        lines += ["Streaming error:", "```", st["error"], "```", ""]
    an = r.get("analysis") or {}
    if an:
        lines += ["Analysis on the meta device (each in a fresh process):", "",
                  "| config | params | build s | analyze s | peak RSS MB | groups (prunable) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, a in an.items():
            lines.append(f"| {name} | {a.get('params_b')}B | {a.get('build_s')} | {a.get('analyze_s')} | "
                         f"{a.get('peak_rss_mb')} | {a.get('groups')} ({a.get('prunable')}) |"
                         + (f" error: {a['error'][-200:]}" if a.get("error") else ""))
        lines.append("")
    cal = r.get("calibration_ranks") or {}
    if cal.get("error"):
        lines += [f"Calibration with 1/2/4 ranks: error {cal['error']}", ""]
    elif cal:
        lines += ["Data-parallel calibration (tiny Llama, activation / wanda_sp / flap, gloo CPU ranks; see "
                  "benchmarks/_distributed_calibration.py):", "",
                  "| ranks | seconds | max abs diff vs 1 rank | equal |", "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v.get('seconds')} | {v.get('max_abs_diff_vs_1')} | {v.get('equal')} |" for k, v in cal.items()]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
