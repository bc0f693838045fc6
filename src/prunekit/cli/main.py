"""The ``prunekit`` command: list models, analyse a model's channel groups, prune it to a target.

Every model is built offline with random weights (seeded by --seed), so the numbers are about the
architecture: MACs, parameters, which channels can go and whether removing them is exact.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from .common import FAILURE, CLIError, Steps
from .models import FORMS, FORMS_HELP, LoadedModel, list_models, load_model, parse_shape
from .report import (analyze_report, analyze_text, changed_layers as _changed_layers, prune_report,
                     prune_text as _prune_text, snapshot as _snapshot, widths as _widths)
from .report import pinned_groups as _pinned, pinned_text as _pinned_text, versions as _versions  # noqa: F401 (old names)
from ..analysis.analyzer import module_label

EPILOG = f"""MODEL forms: {FORMS_HELP}.
Exit codes: 0 done; 1 the run failed (model did not build, target unreachable, pruning failed);
2 wrong usage (options, config file, model form). Add --debug for a traceback."""


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from ..plan.importance import CRITERIA

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", help="no progress spinners on stderr")
    common.add_argument("--verbose", "-v", action="store_true", help="show prunekit's INFO log on stderr")
    common.add_argument("--debug", action="store_true", help="print tracebacks for errors")

    model_opts = argparse.ArgumentParser(add_help=False)
    model_opts.add_argument("model", nargs="?", metavar="MODEL", help=FORMS_HELP)
    model_opts.add_argument("--input-shape", metavar="SHAPE",
                            help="example input shape, e.g. 1,3,224,224 (default: the timm model's own input size, "
                                 "1,3,224,224 for images, 1,128 token ids for hf: models); ignored when a "
                                 "file.py:fn returns its own example inputs")
    model_opts.add_argument("--seed", type=int, default=0, help="seed for the random weights and inputs (default 0)")
    model_opts.add_argument("--json", action="store_true", help="print the report as JSON on stdout (nothing else)")
    model_opts.add_argument("--config", metavar="FILE",
                            help="YAML or JSON file of options (keys = option names, e.g. flops_target: 0.5, "
                                 "ignore: [head]); options on the command line override it")

    # the module docstring is reST (double backticks); --help shows plain text
    p = argparse.ArgumentParser(prog="prunekit", description=__doc__.replace("``", ""), epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    kw = dict(allow_abbrev=False, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    subs = {}

    s = sub.add_parser("list-models", parents=[common], help="list timm and torchvision models by name pattern", **kw,
                       description="List the timm and torchvision models prunekit can build (random weights). "
                                   "Other MODEL forms: hf:CONFIG_DIR_OR_JSON, hf:MODEL_TYPE[,key=value...] "
                                   "and path/to/file.py:fn.")
    s.add_argument("pattern", nargs="?", help="fnmatch pattern such as 'resnet*'; without a wildcard, a substring")
    s.add_argument("--json", action="store_true", help="print {source: [names]} as JSON")
    subs["list-models"] = s

    s = sub.add_parser("analyze", parents=[model_opts, common], help="show a model's channel groups and costs", **kw,
                       description="Capture the model once, find every group of channels that must be pruned "
                                   "together, and say which are prunable and why the others are pinned.")
    s.add_argument("--groups", action="store_true", help="also list each prunable group's source and dependent "
                                                         "modules")
    subs["analyze"] = s

    s = sub.add_parser("prune", parents=[model_opts, common], help="prune a model to a channel ratio or FLOPs target",
                       **kw, description="Rank units with an importance criterion, remove them, verify the result "
                                         "and report every changed layer and the MACs/params before and after.")
    t = s.add_mutually_exclusive_group()
    t.add_argument("--ratio", type=float, metavar="R",
                   help="fraction of the units removed, in [0, 1): per group, or of all units with --global")
    t.add_argument("--flops-target", type=float, metavar="F",
                   help="fraction of the FLOPs KEPT, in (0, 1]: 0.5 halves the FLOPs")
    t.add_argument("--params-target", type=float, metavar="P",
                   help="fraction of the parameters KEPT, in (0, 1]: 0.5 halves the parameter count")
    t.add_argument("--latency-target", type=float, metavar="L",
                   help="fraction of the measured latency KEPT, in (0, 1], on --latency-backend at --latency-batch: "
                        "a latency model of this machine is measured (cached) and the budget filled by importance "
                        "per ms saved")
    s.add_argument("--global", dest="global_pruning", action="store_true",
                   help="rank units across all groups (scores normalised per group) instead of the same ratio per "
                        "group")
    s.add_argument("--round-to", type=_round_to, default=1, metavar="N|auto",
                   help="kept widths are a multiple of N (channels, head_dim and heads x head_dim); 'auto': per "
                        "group, only widths on the fast side of the latency staircase measured on --latency-backend "
                        "(a latency model of this machine, cached)")
    s.add_argument("--uniform", action="store_true",
                   help="every repeated block (layers.N.*) keeps the same widths, so a transformers config can "
                        "describe the result")
    s.add_argument("--save-pretrained", metavar="DIR",
                   help="hf: models: write DIR as transformers writes it (prunekit.hf.save_pretrained); with "
                        "uniform widths plain from_pretrained(DIR) loads it, otherwise prunekit.hf.from_pretrained")
    s.add_argument("--streaming", action="store_true",
                   help="hf:DIR checkpoints: prune the safetensors shards without loading the model "
                        "(prunekit.hf.prune_checkpoint; needs --save-pretrained OUT)")
    s.add_argument("--max-ratio", type=float, default=1.0, metavar="R",
                   help="remove at most this fraction of any group, in (0, 1] (one unit always stays)")
    s.add_argument("--ignore", nargs="+", default=[], metavar="PATTERN",
                   help="module names or fnmatch patterns (e.g. head 'layer4.*') whose output channels are kept")
    s.add_argument("--criterion", default="l2", metavar="NAME",
                   help=f"importance criterion: {', '.join(sorted(CRITERIA))} (default l2). The data-driven ones "
                        "(taylor, taylor_act, hessian) run here on RANDOM inputs with RANDOM labels: a smoke run of "
                        "the pipeline only, whose ranking means nothing; use the Python API with real data")
    s.add_argument("--data-batches", type=int, default=2, metavar="N",
                   help="random batches for the data-driven criteria (default 2)")
    s.add_argument("--calib", metavar="FILE.txt",
                   help="hf: causal LMs: calibration text, tokenized with the model directory's tokenizer if it has "
                        "one, else byte-level (id = byte %% vocab); cut into --calib-samples windows of --seq-len "
                        "tokens for the data criteria (activation, wanda_sp, flap, taylor), --bias-compensation and "
                        "--depth; its last tenth is held out for the perplexity before/after in the report")
    s.add_argument("--calib-samples", type=int, default=128, metavar="N",
                   help="calibration windows taken from --calib (default 128)")
    s.add_argument("--seq-len", type=int, default=512, metavar="L", help="tokens per --calib window (default 512)")
    s.add_argument("--depth", type=int, default=0, metavar="K",
                   help="hf: models: first remove the K decoder blocks of least block influence on the --calib "
                        "data (prunekit.DepthPruner), then prune the width; a params/FLOPs target counts the whole "
                        "result (the width is pruned to what the target leaves after the depth step)")
    s.add_argument("--bias-compensation", action="store_true",
                   help="FLAP bias compensation: the mean contribution of removed channels (on the --calib data) "
                        "becomes a bias of o_proj / down_proj")
    s.add_argument("--save", metavar="DIR", help="write DIR/model.safetensors (prunekit.save) and DIR/report.json")
    s.add_argument("--report", metavar="PATH", help="write the JSON report (the --json content) to PATH")
    s.add_argument("--plot", metavar="DIR", help="write DIR/widths.png and DIR/scores.png (needs matplotlib: "
                                                 "pip install 'prunekit[viz]')")
    s.add_argument("--latency", action="store_true",
                   help="measure latency before and after on --latency-backend at --latency-batch (median and spread "
                        "over repeats)")
    s.add_argument("--latency-backend", default="eager", choices=["eager", "compile", "onnxruntime"],
                   help="where latency is measured and modelled: eager PyTorch, torch.compile or ONNX Runtime "
                        "(default eager, CPU)")
    s.add_argument("--latency-batch", type=int, default=None, metavar="N",
                   help="batch size of the latency measurement (default: the input's batch size)")
    subs["prune"] = s
    return p, subs


# ---------------------------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subs = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(name)s: %(levelname)s: %(message)s")
    cmd = {"list-models": cmd_list_models, "analyze": cmd_analyze, "prune": cmd_prune}[args.cmd]
    try:
        return cmd(args, subs[args.cmd], argv[argv.index(args.cmd) + 1:])
    except CLIError as e:
        if args.debug:
            traceback.print_exc()
        print(f"prunekit {args.cmd}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"prunekit {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a library error: its message says what went wrong and what to do
        if args.debug:
            traceback.print_exc()
        print(f"prunekit {args.cmd}: error: {_message(e)}\n(run again with --debug for the traceback)",
              file=sys.stderr)
        return FAILURE


def _message(e: BaseException) -> str:
    import prunekit as pk
    own = (ValueError, pk.PruningError, pk.CaptureError, pk.CheckpointError)
    return str(e) if isinstance(e, own) and str(e) else f"{type(e).__name__}: {e}"


def _emit(report: dict, as_json: bool, text: list[str]) -> None:
    print(json.dumps(report, indent=2, default=str) if as_json else "\n".join(text))


# ---------------------------------------------------------------------------------------------- list-models
def cmd_list_models(args, parser, argv) -> int:
    found = list_models(args.pattern)
    if not found:
        raise CLIError("neither timm nor torchvision is installed: pip install 'prunekit[timm]'", FAILURE)
    other = ["hf:CONFIG_DIR_OR_JSON", "hf:MODEL_TYPE[,key=value...]", "path/to/file.py:fn"]
    if args.json:
        print(json.dumps({**found, "other_forms": other}, indent=2))
        return 0
    for src, names in found.items():
        for n in names:
            print(f"{src}:{n}")
    total = sum(len(v) for v in found.values())
    counts = ", ".join(f"{len(v)} {k}" for k, v in found.items())
    print(f"{total} models ({counts}). Other MODEL forms: {', '.join(other)}.", file=sys.stderr)
    return 0 if total else FAILURE


# ---------------------------------------------------------------------------------------------- shared steps
def _prepare(args, parser, argv) -> tuple[dict[str, str], tuple[int, ...] | None]:
    """Merge --config into args; check the options every model command shares."""
    sources = {}
    if args.config:
        from .config import apply_config
        sources = apply_config(parser, args, argv, args.config)
    args._sources = sources
    if not args.model:
        hint = " (--ignore takes every word after it: put MODEL before --ignore)" if getattr(args, "ignore", None) \
            else ""
        raise CLIError(f"no MODEL given{hint}; use one of: {', '.join(FORMS)}")
    shape = parse_shape(args.input_shape, _where(args, "input_shape")) if args.input_shape else None
    return sources, shape


def _where(args, dest: str) -> str:
    """How the user named an option: ``--round-to``, or ``'round_to' in cfg.yaml``."""
    key = getattr(args, "_sources", {}).get(dest)
    if key is not None:
        return f"{key!r} in {args.config}"
    return "--" + {"global_pruning": "global"}.get(dest, dest).replace("_", "-")


def _load(args, shape, steps: Steps) -> LoadedModel:
    import torch
    torch.manual_seed(args.seed)
    with steps("build", f"building {args.model}"):
        try:
            return load_model(args.model, shape)
        except CLIError:
            raise
        except Exception as e:
            raise CLIError(f"could not build {args.model!r}: {type(e).__name__}: {e}", FAILURE) from e


# ---------------------------------------------------------------------------------------------- analyze
def cmd_analyze(args, parser, argv) -> int:
    import prunekit as pk

    _, shape = _prepare(args, parser, argv)
    steps = Steps(enabled=not (args.quiet or args.json))
    lm = _load(args, shape, steps)
    with steps("analyze", "analyzing channel groups"):
        graph = pk.analyze(lm.model, lm.example_inputs)
    with steps("count", "counting MACs and parameters"):
        stats = pk.count(graph)
        proportion = graph.prunable_proportion
    report = analyze_report(args, lm, graph, stats, proportion, steps.times)
    text = analyze_text(args, lm, graph, report)
    _emit(report, args.json, text)
    return 0


# ---------------------------------------------------------------------------------------------- prune
def _check_prune_options(args) -> Any:
    """Range checks, naming the option (or config key) at fault; returns the target."""
    import prunekit as pk
    from ..plan.importance import CRITERIA

    given = [d for d in ("ratio", "flops_target", "params_target", "latency_target")
             if getattr(args, d, None) is not None]
    if not given:
        raise CLIError("prune needs a target: --ratio R (fraction of units removed), --flops-target F "
                       "(fraction of FLOPs kept), --params-target P (fraction of parameters kept) or "
                       "--latency-target L (fraction of the measured latency kept)")
    if len(given) > 1:  # only possible through a config file
        raise CLIError(f"give either {' or '.join(_where(args, d) for d in given)}, not "
                       f"{'both' if len(given) == 2 else 'several'}")
    checks = [
        ("ratio", args.ratio is None or 0.0 <= args.ratio < 1.0, "must be in [0, 1) (the fraction of units removed)"),
        ("flops_target", args.flops_target is None or 0.0 < args.flops_target <= 1.0,
         "must be in (0, 1] (the fraction of FLOPs kept)"),
        ("params_target", args.params_target is None or 0.0 < args.params_target <= 1.0,
         "must be in (0, 1] (the fraction of parameters kept)"),
        ("latency_target", args.latency_target is None or 0.0 < args.latency_target <= 1.0,
         "must be in (0, 1] (the fraction of the measured latency kept)"),
        ("latency_batch", args.latency_batch is None or args.latency_batch >= 1, "must be a positive integer"),
        ("max_ratio", 0.0 < args.max_ratio <= 1.0, "must be in (0, 1]"),
        ("round_to", args.round_to == "auto" or (isinstance(args.round_to, int) and args.round_to >= 1),
         "must be a positive integer or 'auto'"),
        ("data_batches", args.data_batches >= 1, "must be a positive integer"),
        ("calib_samples", args.calib_samples >= 1, "must be a positive integer"),
        ("seq_len", args.seq_len >= 2, "must be an integer >= 2"),
        ("depth", args.depth >= 0, "must be a non-negative integer (decoder blocks removed)"),
    ]
    for dest, ok, what in checks:
        if not ok:
            raise CLIError(f"{_where(args, dest)} {what}, got {getattr(args, dest)}")
    name = args.criterion.strip().lower().replace("-", "_")
    try:
        args.criterion_obj = pk.get_criterion(name)
    except ValueError:
        raise CLIError(f"{_where(args, 'criterion')}: unknown criterion {args.criterion!r}; choose one of "
                       f"{', '.join(sorted(CRITERIA))}") from None
    if args.ratio is not None:
        return pk.ChannelRatio(args.ratio)
    if args.params_target is not None:
        return pk.ParamsTarget(args.params_target)
    if args.latency_target is not None:
        return pk.LatencyTarget(args.latency_target, backend=args.latency_backend, batch_size=args.latency_batch)
    return pk.FlopsTarget(args.flops_target)


def _round_to(text: str):
    """``--round-to``: a positive integer or ``auto`` (kept as given when already parsed, e.g. from a config)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, float) and text.is_integer():  # 8.0 in a YAML/JSON config
        return int(text)
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}") from None


def _random_data(model, x, n: int):
    """Random batches shaped like ``x`` with random labels, and a loss: for a smoke run of data criteria."""
    import torch
    import torch.nn.functional as F
    from torch.utils._pytree import tree_map

    from ..capture import call_model, flatten_outputs

    def first_float(out):
        ts = [t for t in flatten_outputs(out)[0] if t.is_floating_point()]
        if not ts:
            raise CLIError("data-driven criteria need a floating-point model output; use --criterion l2", FAILURE)
        return ts[0]

    def rand_like(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn_like(t)
        if t.dtype == torch.bool:
            return t.clone()
        return torch.randint_like(t, 0, max(2, int(t.max()) + 1))

    with torch.no_grad():
        out = first_float(call_model(model, x))
    classes = out.shape[-1] if out.dim() == 2 else None
    batches = [(tree_map(rand_like, x), torch.randint(0, classes, (out.shape[0],)) if classes else None)
               for _ in range(n)]

    def loss_fn(m, batch):
        xb, yb = batch
        o = first_float(call_model(m, xb))
        return F.cross_entropy(o, yb) if yb is not None else o.float().pow(2).mean()
    return batches, loss_fn


def _output_shapes(model, x) -> list[list[int]]:
    import torch

    from ..capture import call_model, flatten_outputs
    from ..analysis.conventions import default_forward_fn
    with torch.no_grad():  # the model's predictions (a convention's forward_fn: YOLO's raw head outputs, no feats)
        return [list(t.shape) for t in flatten_outputs(call_model(model, x, default_forward_fn(model)))[0]]


def _measure_latency(args, model, x, reference=None):
    """Latency on --latency-backend at --latency-batch: a :class:`prunekit.cost.latency_model.Timing`; with a
    ``reference`` (the unpruned copy), the (before, after) timings of the two measured interleaved."""
    from ..cost.latency_model import BackendUnavailable, measure, measure_many
    try:
        if reference is not None:
            res = measure_many([reference, model], x, args.latency_backend, batch_size=args.latency_batch,
                               rounds=5, repeats=10)
            return res.timings[0], res.timings[1]
        return measure(model, x, args.latency_backend, batch_size=args.latency_batch, repeats=10)
    except BackendUnavailable as e:
        raise CLIError(f"--latency-backend {args.latency_backend}: {e}", FAILURE) from e


REFERENCE_COPY_MAX_BYTES = 2 << 30  # --latency keeps an unpruned copy up to this size, to time before/after together


def _reference_copy(model):
    """A deep copy of the unpruned model to time interleaved with the pruned one (drift on a shared machine falls on
    both alike), or None where the model is larger than REFERENCE_COPY_MAX_BYTES or cannot be copied."""
    import copy
    size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if size > REFERENCE_COPY_MAX_BYTES:
        return None
    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a model deepcopy refuses is timed before and after instead
        return None


def cmd_prune(args, parser, argv) -> int:
    import prunekit as pk

    sources, shape = _prepare(args, parser, argv)
    target = _check_prune_options(args)
    if getattr(args, "streaming", False):
        return _prune_streaming(args, target)
    if args.plot:
        from .plot import require_matplotlib
        require_matplotlib()  # fail before the work, not after
    steps = Steps(enabled=not (args.quiet or args.json))
    lm = _load(args, shape, steps)
    model, x = lm.model, lm.example_inputs
    hf_model = _is_hf_model(model)
    if args.save_pretrained and not hf_model:
        raise CLIError(f"--save-pretrained needs a transformers model (hf:...), {args.model} is a "
                       f"{type(model).__name__}; use --save DIR", FAILURE)
    names = [n for n, _ in model.named_modules()]
    unmatched = [p for p in args.ignore if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        print(f"prunekit prune: warning: --ignore {' '.join(unmatched)} matches no module of {args.model} "
              f"(module names look like {', '.join(n for n in names[1:4])})", file=sys.stderr)
    crit = args.criterion_obj
    data = loss_fn = None
    calib = _calibration(args, lm, crit, hf_model)
    if calib is not None:
        from .llm import ProgressData, bars_enabled
        data = ProgressData(calib.batches, "calibration", bars_enabled(args)) if crit.needs_data or \
            args.bias_compensation else None
    elif crit.needs_data:
        print(f"prunekit prune: warning: criterion {crit.name!r} is scored on {args.data_batches} RANDOM batches "
              "with random labels: a smoke run only; use the Python API with real data for a real ranking",
              file=sys.stderr)
        data, loss_fn = _random_data(model, x, args.data_batches)

    snap, widths_before = _snapshot(model), _widths(model)
    shapes_before = _output_shapes(model, x)
    ppl_before = depth = stats_original = None
    if calib is not None and calib.held_out is not None:
        with steps("perplexity_before", "held-out perplexity (before)"):
            ppl_before = pk.hf.perplexity(model, calib.held_out)
    if args.depth:
        # depth first (block influence of the dense model, as ShortGPT / Minitron score it), then the width of
        # what is left, so the width criteria see the blocks that stay; the target counts the whole result
        from .llm import ProgressData, bars_enabled
        with steps("count_original", "counting MACs and parameters"):
            stats_original = pk.count(model, x)
        with steps("depth", f"removing {args.depth} blocks (block influence)", spinner=False):
            try:
                dp = pk.DepthPruner(model, x, data=ProgressData(calib.batches, "block influence", False),
                                    n_blocks=args.depth, criterion="block_influence", progress=bars_enabled(args))
                depth = dp.prune()
            except ValueError as e:
                raise CLIError(f"--depth {args.depth}: {e}", FAILURE) from e
        target = _width_target(args, target, stats_original, pk.count(model, x))
    with steps("analyze", "analyzing channel groups"):
        pruner = pk.Pruner(model, x, crit, target, global_pruning=args.global_pruning, round_to=args.round_to,
                           max_ratio=args.max_ratio, ignore=args.ignore, data=data, loss_fn=loss_fn,
                           uniform=args.uniform, bias_compensation=args.bias_compensation)
        graph = pruner.graph
    with steps("count_before", "counting MACs and parameters"):
        stats_before = pk.count(graph)
        proportion = pruner.prunable_proportion
    lat_before = reference = None
    interleaved = False
    timed = args.latency or args.latency_target is not None  # a latency target is always checked by measuring
    if timed:
        reference = _reference_copy(model)
        if reference is None:
            with steps("latency_before", "measuring latency (before)"):
                lat_before = _measure_latency(args, model, x)
    scores = None
    if args.plot:
        with steps("score", f"scoring units ({crit.name})"):
            scores = pruner.scores()
    with steps("plan", f"scoring ({crit.name}) and planning {target}", spinner=data is None or calib is None):
        try:
            plan = pruner.plan()
        except ValueError as e:
            raise CLIError(str(e), FAILURE) from e
    kept_units = pruner.summary(plan)
    n_units = sum(len(u) for u in plan.values())
    with steps("prune", f"removing {n_units} units from {len(plan)} groups (verified by prunekit.prune)"):
        pk.prune(model, graph, plan)
    with steps("verify", "checking the pruned model and counting"):
        shapes_after = _output_shapes(model, x)
        if shapes_after != shapes_before:
            raise CLIError(f"the pruned model's output shapes changed: {shapes_before} -> {shapes_after}", FAILURE)
        stats_after = pk.count(model, x)
    lat_after = None
    if timed:
        if reference is None:
            with steps("latency_after", "measuring latency (after)"):
                lat_after = _measure_latency(args, model, x)
        else:
            with steps("latency", "measuring latency (before and after, interleaved)"):
                lat_before, lat_after = _measure_latency(args, model, x, reference)
            reference, interleaved = None, True
    ppl_after = None
    if ppl_before is not None:
        with steps("perplexity_after", "held-out perplexity (after)"):
            ppl_after = pk.hf.perplexity(model, calib.held_out)

    report = prune_report(args, lm, target=target, criterion=crit, shape=shape, sources=sources, graph=graph,
                          plan=plan, stats_before=stats_before, stats_after=stats_after, proportion=proportion,
                          changed=_changed_layers(snap, model), output_shapes=shapes_after,
                          timings=steps.times, latency_before=lat_before, latency_after=lat_after,
                          latency_interleaved=interleaved,
                          kept_units=kept_units)
    if stats_original is not None:  # --depth: before = the model as loaded
        report["before"] = {"macs": stats_original.macs, "flops": stats_original.flops,
                            "params": stats_original.params, **{k: v for k, v in report["before"].items()
                                                                if k == "latency_ms"}}
        report["kept"] = {k: (report["after"][k] / v if v else None) for k, v in report["before"].items()}
    report["options"].update(calib=args.calib, calib_samples=args.calib_samples if calib else None,
                             seq_len=args.seq_len if calib else None, depth=args.depth,
                             bias_compensation=args.bias_compensation)
    report["calibration"] = calib.info() if calib else None
    report["depth"] = None if depth is None else {"removed": depth.removed, "blocks_before": depth.blocks_before,
                                                  "blocks_after": depth.blocks_after,
                                                  "scores": depth.scores, "width_target": repr(target)}
    report["perplexity"] = None if ppl_before is None else {
        "before": ppl_before, "after": ppl_after, "held_out_windows": int(calib.held_out.shape[0]),
        "seq_len": calib.seq_len}
    if hf_model:
        report["hf"] = _hf_report(model, args.save_pretrained)
    if args.plot:
        from .plot import plot_scores, plot_widths
        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        titles = {g.id: f"group {g.id} " + module_label(g.source[0] if g.source else g.modules[0]) for g in graph.groups}
        report["plots"] = [str(plot_widths(widths_before, _widths(model), out / "widths.png")),
                           str(plot_scores(scores, plan, titles, out / "scores.png"))]
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        report["saved"] = str(pk.save(model, out / "model.safetensors"))
        if lm.kind == "ultralytics":  # also ultralytics' own checkpoint form (YOLO("DIR/model.pt") loads it)
            from ..detection.ultralytics import save_checkpoint
            report["saved_ultralytics"] = str(save_checkpoint(model, out / "model.pt"))
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=2, default=str))
    _emit(report, args.json, _prune_text(args, lm, report, target))
    return 0


def _prune_streaming(args, target) -> int:
    """``prunekit prune hf:DIR --streaming --save-pretrained OUT``: prunekit.hf.prune_checkpoint."""
    import torch
    import prunekit as pk
    from pathlib import Path
    src = (args.model or "")[3:] if (args.model or "").startswith("hf:") else None
    if not src or not (Path(src) / "config.json").is_file():
        raise CLIError(f"--streaming needs a checkpoint directory hf:DIR (config.json + safetensors shards), got "
                       f"{args.model!r}")
    if not args.save_pretrained:
        raise CLIError("--streaming writes the pruned checkpoint to --save-pretrained OUT; give OUT")
    if args.round_to == "auto" or target.kind == "latency":
        raise CLIError("--streaming plans without the weights in memory, so nothing can be timed: use an integer "
                       "--round-to and --params-target/--flops-target/--ratio (or prune in memory without --streaming)")
    crit = args.criterion_obj
    data = None
    if crit.needs_data:
        print(f"prunekit prune: warning: criterion {crit.name!r} is scored on {args.data_batches} RANDOM token "
              "batches: a smoke run only; use prunekit.hf.prune_checkpoint(..., data=...) with real text",
              file=sys.stderr)
        cfg = json.loads((Path(src) / "config.json").read_text())
        vocab = int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size") or 2)
        gen = torch.Generator().manual_seed(args.seed)
        data = [{"input_ids": torch.randint(0, vocab, (1, 64), generator=gen)} for _ in range(args.data_batches)]
    res = pk.hf.prune_checkpoint(src, args.save_pretrained, criterion=crit, target=target, round_to=args.round_to,
                                 uniform=args.uniform, global_pruning=args.global_pruning, data=data,
                                 max_ratio=args.max_ratio, ignore=args.ignore or None)
    report = {"model": args.model, "streaming": True, "out": str(res.out_dir), "params_before": res.params_before,
              "params_after": res.params_after, "params_kept": res.params_after / max(1, res.params_before),
              "config_changes": {k: list(v) for k, v in res.changed.items()}, "per_layer_widths": res.per_layer,
              "peak_tensor_bytes": res.peak_tensor_bytes, "largest_shard_bytes": res.largest_shard_bytes,
              "groups_pruned": len(res.plan)}
    text = [f"{args.model}: streamed {res.params_before:,} -> {res.params_after:,} parameters "
            f"({report['params_kept']:.1%} kept) into {res.out_dir}",
            f"peak tensors held {res.peak_tensor_bytes / 2**20:.1f} MB (largest shard "
            f"{res.largest_shard_bytes / 2**20:.1f} MB)"]
    text += [f"config {k}: {a} -> {b}" for k, (a, b) in res.changed.items()]
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    _emit(report, args.json, text)
    return 0


def _calibration(args, lm, crit, hf_model: bool):
    """The --calib windows (or None), after the checks that name the option at fault."""
    causal = hf_model and hasattr(lm.model, "get_output_embeddings") and lm.model.get_output_embeddings() is not None
    if args.calib is None:
        if hf_model and crit.needs_data:
            raise CLIError(f"criterion {crit.name!r} needs calibration text: add --calib FILE.txt (or use "
                           "--criterion l2)")
        for dest, on in (("depth", args.depth), ("bias_compensation", args.bias_compensation)):
            if on:
                raise CLIError(f"{_where(args, dest)} needs calibration text: add --calib FILE.txt")
        return None
    if not causal:
        raise CLIError(f"{_where(args, 'calib')} needs a transformers causal LM (hf:DIR), {args.model} is a "
                       f"{type(lm.model).__name__}", FAILURE)
    from .llm import load_calibration
    vocab = int(lm.model.config.vocab_size)
    return load_calibration(args.calib, args.model, vocab, args.calib_samples, args.seq_len)


def _width_target(args, target, original, now):
    """The width target after the depth step, so that the whole result meets the user's target."""
    import prunekit as pk
    if args.params_target is None and args.flops_target is None:
        return target  # a channel ratio applies to the width as it is
    kind, goal = ("params", args.params_target) if args.params_target is not None else ("flops", args.flops_target)
    r = goal * getattr(original, kind) / max(getattr(now, kind), 1)
    if r >= 1.0:
        logging.getLogger("prunekit.cli").info("--depth alone meets the %s target; the width is kept", kind)
        r = 1.0
    return pk.ParamsTarget(r) if kind == "params" else pk.FlopsTarget(r)


def _is_hf_model(model) -> bool:
    tf = sys.modules.get("transformers")
    try:
        return tf is not None and isinstance(model, tf.PreTrainedModel)
    except Exception:
        return False


def _hf_report(model, save_dir: str | None) -> dict[str, Any]:
    """The pruned transformers model's config values (and where it was saved with pk.hf.save_pretrained)."""
    import prunekit as pk
    if save_dir:
        out = Path(save_dir)
        try:
            pk.hf.save_pretrained(model, out, overwrite=out.is_dir() and (out / "config.json").is_file())
        except pk.hf.HFSaveError as e:
            raise CLIError(str(e), FAILURE) from None
    sync = pk.hf.sync_config(model)
    return {"config": sync.values, "changed": {k: list(v) for k, v in pk.hf.changes(model).items()},
            "per_layer": sync.per_layer, "saved_pretrained": save_dir,
            "plain_from_pretrained": None if not save_dir else not (Path(save_dir) / "prunekit.json").exists()}


if __name__ == "__main__":
    sys.exit(main())
