"""``pk.distill``: recover a pruned model by knowledge distillation from the unpruned one.

    teacher = copy.deepcopy(model).eval()          # before pruning
    pk.Pruner(model, x, "l2", pk.ParamsTarget(0.5)).prune()
    result = pk.distill(model, teacher, batches, steps=500, lr=1e-4, eval_fn=perplexity, eval_every=100,
                        workdir="runs/kd")         # rerun the same call to resume after a crash

The loss of every step is a weighted sum of

* ``kl_weight`` x KL(teacher || student) of the output distributions at ``temperature`` T (x T^2, so the
  gradient scale does not depend on T), averaged over every position that is not padding (the batch's
  ``attention_mask`` when it has one): logits of classifiers ``(N, C)`` and of language models
  ``(N, L, V)`` alike;
* ``hidden_weight`` x a hidden-state loss: for each ``(student_module, teacher_module)`` pair in
  ``hidden_layers`` (module names; default for transformers models: their ``hidden_states`` outputs), the
  mean squared error between the student's output, mapped to the teacher's width by a learned linear
  projection where pruning changed it, and the teacher's, divided by the teacher's mean square (scale-free);
* ``task_weight`` x the student's own loss (``out.loss``: a transformers model given ``labels``).

Batches are what the models take: a tensor (``model(x)``), a tuple (``model(*x)``) or a dict of keyword
inputs (``model(**x)``); ``data`` is cycled when it has fewer batches than ``steps`` (it must then be
iterable more than once: a list or a DataLoader, not a generator).

Resuming: with ``workdir``, every ``checkpoint_every`` steps the student's weights, the optimizer's and the
projections' state and the history are written atomically; calling again with the same arguments and a student
of the same architecture (pruned the same way) continues from the last checkpoint, skipping the batches
already used, so a deterministic run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._callbacks import callback as _callback
from ..runs.progress import metric_value, progress_bar
from ..runs.workdir import ResumeError, Workdir, model_info

log = logging.getLogger("prunekit.distill")

__all__ = ["DistillResult", "distill", "distill_loss"]

FORMAT = "prunekit.distill"
_CKPT = "distill.pt"


@dataclass
class DistillResult:
    """What :func:`distill` returns: the student (trained in place) and one history entry per logged step."""

    student: nn.Module
    history: list[dict] = field(default_factory=list)  # step, loss, kl, hidden, task, lr, seconds[, metric]
    steps: int = 0  # optimizer steps done in total (including those of a resumed run)

    def __iter__(self) -> Iterator[Any]:  # student, history = pk.distill(...)
        return iter((self.student, self.history))


# ---------------------------------------------------------------------------------------------- pieces
def _call(model: nn.Module, batch: Any, **extra: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    return model(batch, **extra)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"distill: cannot find the logits in the model's output ({type(out).__name__}); pass "
                    "output_fn=lambda out: <the logits tensor>")


def _token_mask(batch: Any, logits: torch.Tensor) -> torch.Tensor | None:
    """The batch's attention_mask when it matches the logits' leading (N, L) dims, else None (every position)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), torch.Tensor) and logits.dim() == 3:
        m = batch["attention_mask"]
        if tuple(m.shape) == tuple(logits.shape[:2]):
            return m.to(torch.bool)
    return None


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)) over the last dim, averaged over positions
    (those where ``mask`` is True, when given)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distill: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape: the output layer must keep its width "
                         "(do not prune the classes / vocabulary)")
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)  # per position
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * t * t


class _Hidden:
    """Hidden states of named modules (forward hooks) or of transformers' ``output_hidden_states``."""

    def __init__(self, model: nn.Module, names: Sequence[str] | None):
        self.names, self.hooks, self.values = names, [], {}
        if names is None:
            return
        modules = dict(model.named_modules())
        for n in names:
            if n not in modules:
                raise ValueError(f"distill: hidden_layers names {n!r}, which is not a module of "
                                 f"{type(model).__name__} (e.g. {', '.join(list(modules)[1:4])})")
            self.hooks.append(modules[n].register_forward_hook(self._hook(n)))

    def _hook(self, name: str) -> Callable:
        def hook(mod, args, out):
            self.values[name] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def collect(self, out: Any) -> list[torch.Tensor]:
        if self.names is None:
            hs = getattr(out, "hidden_states", None)
            if hs is None:
                raise ValueError("distill: hidden_weight > 0 needs hidden_layers=[(student_module, teacher_module), "
                                 "...] (or a transformers model, whose hidden_states are used)")
            return list(hs)
        vals = [self.values.pop(n) for n in self.names]
        return vals

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _cycle(data: Iterable, skip: int) -> Iterator[Any]:
    """Batches of ``data`` forever (restarting it when exhausted), after skipping ``skip`` of them."""
    if isinstance(data, Iterator):
        raise TypeError("distill: data is an iterator (it can be read once); pass a list of batches or a DataLoader "
                        "so it can be cycled and skipped on resume")
    n = 0
    while True:
        empty = True
        for batch in data:
            empty = False
            if n >= skip:
                yield batch
            n += 1
        if empty:
            raise ValueError("distill: data has no batches")


def _config(**kw: Any) -> dict[str, Any]:
    return {k: (list(map(list, v)) if k == "hidden_layers" and v is not None else v) for k, v in kw.items()}


# ---------------------------------------------------------------------------------------------- main
def distill(student: nn.Module, teacher: nn.Module, data: Iterable, steps: int, *, temperature: float = 2.0,
            kl_weight: float = 1.0, hidden_weight: float = 0.0,
            hidden_layers: Sequence[tuple[str, str]] | None = None, task_weight: float = 0.0, lr: float = 1e-4,
            weight_decay: float = 0.0, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
            grad_clip: float | None = 1.0, output_fn: Callable[[Any], torch.Tensor] | None = None,
            eval_fn: Callable | None = None, eval_every: int | None = None, log_every: int = 10,
            workdir: str | Path | None = None, checkpoint_every: int = 50, resume: bool = True,
            callback: Callable | None = None, progress: bool = True, seed: int | None = None) -> DistillResult:
    """Train ``student`` for ``steps`` optimizer steps to match ``teacher`` on ``data`` (see the module docstring).

    Args:
        student: the (pruned) model, trained in place; its train/eval mode is restored at the end.
        teacher: the reference (unpruned) model; run in eval mode without gradients, never changed.
        data: batches (tensor / tuple / dict of keyword inputs), cycled; a list or DataLoader.
        steps: optimizer steps in total (a resumed run does the rest).
        temperature: softmax temperature T of the KL term.
        kl_weight, hidden_weight, task_weight: weights of the KL, hidden-state and task (``out.loss``) terms.
        hidden_layers: ``[(student_module_name, teacher_module_name), ...]`` for the hidden-state term; default
            (``None``) for transformers models: every ``hidden_states`` output.
        lr, weight_decay: of the default optimizer, AdamW; ``optimizer(params)`` builds another.
        grad_clip: max gradient norm (None: no clipping).
        output_fn: ``output_fn(out) -> logits`` (default: ``out.logits``, ``out["logits"]``, the tensor or its
            first element).
        eval_fn: ``eval_fn(model) -> number | dict`` every ``eval_every`` steps and after the last one; stored as
            ``metric`` in the history (model in eval mode while it runs).
        log_every: steps between history entries (losses averaged over them).
        workdir, checkpoint_every, resume: resumable run (see the module docstring); ``resume=False`` starts over.
        callback: ``callback(entry)`` after each history entry; returning ``False`` stops (resumable).
        progress: a progress bar (rich or tqdm) when installed.
        seed: ``torch.manual_seed(seed + step)`` before each step (dropout etc. repeat after a resume).

    Returns:
        :class:`DistillResult` ``(student, history)``; ``history[i]``: ``step``, ``loss``, ``kl``, ``hidden``,
        ``task``, ``lr``, ``seconds``, and ``metric`` where evaluated.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("distill(student, teacher, data, steps): student and teacher must be nn.Modules")
    if student is teacher:
        raise ValueError("distill: student and teacher are the same module; keep a copy of the model before pruning "
                         "(teacher = copy.deepcopy(model)) and pass that as the teacher")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"distill: steps must be a positive int, got {steps!r}")
    if temperature <= 0:
        raise ValueError(f"distill: temperature must be > 0, got {temperature}")
    if min(kl_weight, hidden_weight, task_weight) < 0 or kl_weight + hidden_weight + task_weight == 0:
        raise ValueError("distill: kl_weight, hidden_weight and task_weight must be >= 0 and not all 0")
    if hidden_layers is not None and not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in hidden_layers):
        raise ValueError("distill: hidden_layers must be a list of (student_module_name, teacher_module_name) pairs")
    evaluate = _callback(eval_fn, "eval_fn", "distill", ("model",))
    on_entry = _callback(callback, "callback", "distill", ("entry",))
    eval_every = eval_every or steps
    get_logits = output_fn or _logits
    config = _config(steps=steps, temperature=float(temperature), kl_weight=float(kl_weight),
                     hidden_weight=float(hidden_weight), hidden_layers=hidden_layers, task_weight=float(task_weight),
                     lr=float(lr), weight_decay=float(weight_decay), grad_clip=grad_clip, log_every=log_every,
                     eval_every=eval_every, seed=seed, optimizer=getattr(optimizer, "__qualname__", None))

    use_hidden = hidden_weight > 0
    s_names = [p[0] for p in hidden_layers] if hidden_layers is not None else None
    t_names = [p[1] for p in hidden_layers] if hidden_layers is not None else None
    s_hidden = _Hidden(student, s_names) if use_hidden else None
    t_hidden = _Hidden(teacher, t_names) if use_hidden else None
    extra = {"output_hidden_states": True} if use_hidden and hidden_layers is None else {}
    projections = nn.ModuleList()  # built at the first step, once the widths are known
    opt: torch.optim.Optimizer | None = None

    def make_optimizer() -> torch.optim.Optimizer:
        params = [p for p in student.parameters() if p.requires_grad] + list(projections.parameters())
        if optimizer is not None:
            return optimizer(params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    wd = Workdir(workdir, FORMAT, what="a prunekit distillation", error=ResumeError) if workdir is not None else None
    done, history = 0, []
    saved = None
    if wd is not None and wd.has_state():
        if resume:
            state = wd.read_state(corrupt_fix="resume=False starts over")
            wd.check_config(state["config"], config, "Pass the same steps, weights, lr and temperature to resume, "
                            "or resume=False to start over, or another workdir.")
            wd.check_model(state["model"], student, "the student is not the model this run was started with",
                           "Build and prune the student the same way, or use another workdir (or resume=False).")
            done, history = int(state["done"]), list(state["history"])
            if done:
                saved = wd.read_torch(_CKPT, "the checkpoint is missing from the workdir; start over with "
                                             "resume=False or use another workdir")
            log.info("distill: resuming %s after step %d of %d", wd.path, done, steps)
        else:
            log.warning("distill: resume=False, discarding the run saved in %s", wd.path)
            wd.clear([_CKPT])
    if wd is not None and not wd.has_state():
        wd.mkdir()
        wd.write_state(wd.new_state(config=config, model=model_info(student, shapes=True), done=0, history=[]))

    device = next((p.device for p in student.parameters()), torch.device("cpu"))
    was_training, t_was_training = student.training, teacher.training
    teacher.eval()
    batches = _cycle(data, done)
    acc: dict[str, float] = {"loss": 0.0, "kl": 0.0, "hidden": 0.0, "task": 0.0}
    n_acc, t_log = 0, time.perf_counter()

    def save(step: int) -> None:
        if wd is None:
            return
        wd.write_torch(_CKPT, {"student": student.state_dict(), "optimizer": opt.state_dict() if opt else None,
                               "projections": projections.state_dict(), "step": step,
                               "projection_shapes": [None if isinstance(p, nn.Identity) else
                                                     [p.in_features, p.out_features] for p in projections]})
        state = wd.new_state(config=config, model=model_info(student, shapes=True), done=step, history=history)
        wd.write_state(state)

    if saved is not None:  # the checkpoint's weights, projections and optimizer state, before the next step
        _build_projections(projections, saved.get("projection_shapes") or [], device)
        opt = make_optimizer()
        _load_saved(student, projections, opt, saved)
    try:
        with progress_bar(progress, steps, done, "distilling") as advance:
            for step in range(done + 1, steps + 1):
                if seed is not None:
                    torch.manual_seed(seed + step)
                batch = _to(next(batches), device)
                with torch.no_grad():
                    t_out = _call(teacher, batch, **extra)
                student.train()
                s_out = _call(student, batch, **extra)
                s_logits, t_logits = get_logits(s_out), get_logits(t_out)
                terms = {"kl": distill_loss(s_logits, t_logits.detach(), temperature, _token_mask(batch, s_logits))
                         if kl_weight else s_logits.new_zeros(())}
                if use_hidden:
                    sh, th = s_hidden.collect(s_out), [h.detach() for h in t_hidden.collect(t_out)]
                    if len(sh) != len(th):
                        raise ValueError(f"distill: the student gives {len(sh)} hidden states, the teacher {len(th)}: "
                                         "pass hidden_layers=[(student_module, teacher_module), ...] to pair them")
                    if not len(projections):
                        _build_projections(projections, [None if a.shape[-1] == b.shape[-1] else
                                                         (a.shape[-1], b.shape[-1]) for a, b in zip(sh, th)], device)
                    terms["hidden"] = sum(F.mse_loss(proj(a).float(), b.float()) / b.float().pow(2).mean().clamp_min(1e-12)
                                          for proj, a, b in zip(projections, sh, th)) / len(sh)
                else:
                    terms["hidden"] = s_logits.new_zeros(())
                task = getattr(s_out, "loss", None) if task_weight else None
                if task_weight and task is None:
                    raise ValueError("distill: task_weight > 0 needs a model output with .loss (pass labels in the "
                                     "batch of a transformers model)")
                terms["task"] = task if task is not None else s_logits.new_zeros(())
                loss = kl_weight * terms["kl"] + hidden_weight * terms["hidden"] + task_weight * terms["task"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"distill: the loss is {loss.item()} at step {step}; lower lr "
                                             f"(now {lr}) or the temperature")
                if opt is None:
                    opt = make_optimizer()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
                opt.step()
                for k in acc:
                    acc[k] += float((loss if k == "loss" else terms[k]).detach())
                n_acc += 1
                last = step == steps
                if step % log_every == 0 or last or step % eval_every == 0:
                    entry = {"step": step, **{k: v / n_acc for k, v in acc.items()},
                             "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t_log}
                    if evaluate is not None and (step % eval_every == 0 or last):
                        student.eval()
                        entry["metric"] = metric_value(evaluate(student))
                    history.append(entry)
                    log.info("distill step %d/%d: loss %.4g (kl %.4g, hidden %.4g, task %.4g)%s", step, steps,
                             entry["loss"], entry["kl"], entry["hidden"], entry["task"],
                             f", metric {entry['metric']}" if "metric" in entry else "")
                    acc = dict.fromkeys(acc, 0.0)
                    n_acc, t_log = 0, time.perf_counter()
                    if step % checkpoint_every == 0 or last:
                        save(step)
                    if on_entry is not None and on_entry(dict(entry)) is False:
                        save(step)
                        log.info("distill: callback stopped the run after step %d of %d", step, steps)
                        return DistillResult(student, [dict(e) for e in history], step)
                elif step % checkpoint_every == 0:
                    save(step)
                advance(f"loss={float(loss.detach()):.4g}")
        return DistillResult(student, [dict(e) for e in history], steps if done < steps else done)
    finally:
        for h in (s_hidden, t_hidden):
            if h is not None:
                h.remove()
        student.train(was_training)
        teacher.train(t_was_training)


def _build_projections(projections: nn.ModuleList, shapes: Sequence, device: torch.device) -> None:
    """One module per hidden-state pair: Identity where the widths match, else a learned Linear(in, out)."""
    for shape in shapes:
        projections.append(nn.Identity() if shape is None else
                           nn.Linear(int(shape[0]), int(shape[1]), bias=False).to(device))


def _load_saved(student: nn.Module, projections: nn.ModuleList, opt: torch.optim.Optimizer, saved: Mapping) -> None:
    try:
        student.load_state_dict(saved["student"])
        projections.load_state_dict(saved["projections"])
        if saved.get("optimizer") is not None:
            opt.load_state_dict(saved["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ResumeError(f"distill: the saved checkpoint does not fit this student ({e}); start over with "
                          "resume=False or use another workdir") from None


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch

