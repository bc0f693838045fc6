"""Importance criteria: score the units of pruning groups (higher = more important).

    crit = pk.importance.get_criterion("l2", reduction="mean", normalize="mean")
    scores = crit.scores(model, graph)              # {group id: tensor [group.size]}
    taylor = get_criterion("taylor").scores(model, graph, data=loader, loss_fn=my_loss)

Names: ``l1``, ``l2``, ``fpgm``, ``taylor``, ``taylor_act``, ``bn_scale``, ``lamp``, ``random``,
``hessian``, and the calibration criteria ``activation`` (Minitron), ``wanda_sp``, ``flap`` (one no-grad pass
of activation statistics over ``data=``; see :mod:`.calibration`).  All criteria are group-level: every parameter slice a group owns (producers, consumers,
norms, free parameters) can take part; see :class:`Criterion` for the shared options.
"""
from __future__ import annotations

from typing import Any

from .base import Criterion, DataCriterion, grad_sandbox, member_role, normalize_scores, unit_view
from .calibration import FLAP, Activation, CalibrationCriterion, WandaSP, collect_input_stats
from .gradient import Hessian, Taylor, TaylorAct
from .weight import FPGM, L1, L2, LAMP, BNScale, Random

CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (L1, L2, FPGM, Taylor, TaylorAct, BNScale, LAMP, Random,
                                                           Hessian, Activation, WandaSP, FLAP)}
_ALIASES = {"l1norm": "l1", "l2norm": "l2", "magnitude": "l2", "taylorfoweight": "taylor", "bn": "bn_scale",
            "slim": "bn_scale", "fisher": "hessian", "obd": "hessian", "minitron": "activation",
            "wanda": "wanda_sp", "wandasp": "wanda_sp"}


def get_criterion(name_or_obj: str | Criterion | type[Criterion], **kw: Any) -> Criterion:
    """A criterion from its name (``CRITERIA`` keys, case-insensitive, a few aliases such as ``"l2norm"``),
    a :class:`Criterion` subclass (instantiated with ``kw``) or an instance (returned as is; ``kw`` not allowed).
    """
    if isinstance(name_or_obj, Criterion):
        if kw:
            raise TypeError(f"get_criterion() got options {sorted(kw)} for an already built {name_or_obj!r}")
        return name_or_obj
    if isinstance(name_or_obj, type) and issubclass(name_or_obj, Criterion):
        return name_or_obj(**kw)
    if isinstance(name_or_obj, str):
        key = name_or_obj.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key in CRITERIA:
            return CRITERIA[key](**kw)
        raise ValueError(f"unknown importance criterion {name_or_obj!r}; choose one of {sorted(CRITERIA)}")
    raise TypeError(f"get_criterion() expects a name, a Criterion subclass or instance, got "
                    f"{type(name_or_obj).__name__}")


__all__ = ["CRITERIA", "Activation", "BNScale", "CalibrationCriterion", "Criterion", "DataCriterion", "FLAP", "FPGM",
           "Hessian", "L1", "L2", "LAMP", "Random", "WandaSP", "collect_input_stats", "Taylor",
           "TaylorAct", "get_criterion", "grad_sandbox", "member_role", "normalize_scores", "unit_view"]
