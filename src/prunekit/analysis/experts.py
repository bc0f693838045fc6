"""Mixture-of-experts blocks: whole experts as prunable units (``group.unit == "expert"``).

Why a module-level hook.  The channel analysis follows *values* through ops; an expert is chosen by the
*indices* a router's ``topk`` returns, so nothing in the dataflow ties the router's rows to the experts'
slices of the stacked 3-D parameters (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``).
What ties them is the block's design, so it is stated here, per block class, like a
:class:`~prunekit.analysis.modules.ModuleSpec` states a layer's size attributes:

* :func:`register_experts` (``pk.register_experts``) names a MoE block class (the class itself, or its
  qualified name ``"package.module.Class"`` so registering never imports the package: transformers' blocks
  are registered by name in :mod:`prunekit.hf.moe` and matched over the MRO like ``isinstance``);
* before the op rules run, :func:`prepare` gives every registered block one *expert space* of size E
  (tagged ``"expert"``) as the layout of the router's rows (every router parameter/buffer whose leading dim
  is E: weight, bias, score-correction bias) and of the leading dim of every stacked expert parameter; the
  size attribute the forward reads (``num_experts`` on the router and on the experts module) follows it;
* the op rules that consume routing (``topk``, ``nonzero``, ``select``, ``one_hot``/``histc`` sized by the
  expert count, ``_grouped_mm``'s groups, see :mod:`prunekit.analysis.ops.routing`) carry an expert space
  through instead of pinning it, and mark it *mixed*: removing an expert changes routing (top-k over fewer
  logits), so an expert group is never ``exact`` -- it is verified like every other inexact group (the
  pruned model must run with unchanged output shapes and finite values).  Anything else that touches the
  expert dim still pins it (a reshape of the router logits into expert groups, an unknown op), and the dry
  run pins it when the forward hard-codes the count.

Expert FFN neurons (the ``I`` dim) are channels of the stacked parameters, found by the ordinary rules
(``_grouped_mm``, or ``select`` + ``mm`` in the eager loop): one group per block, *shared across experts*
(unit ``j`` removes neuron ``j`` from every expert) -- stacked 3-D parameters cannot hold ragged widths.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import spaces as C

__all__ = ["ExpertSpec", "register_experts", "unregister_experts", "experts_spec_of", "prepare", "routed",
           "expert_layout"]

EXPERT_MIX = "removing an expert changes routing (top-k over fewer router logits): not zero-invariant"


@dataclass(frozen=True)
class ExpertSpec:
    """How one MoE block class holds its experts.

    Args:
        router: name of the child module that scores the experts (its parameters and buffers whose leading
            dim is the number of experts are the experts' router rows: ``weight [E, H]``, a bias ``[E]``).
        experts: name of the child module holding the stacked expert parameters (leading dim E), e.g.
            transformers' ``MixtralExperts`` with ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``.
        count_attr: the int attribute, on the router and on the experts module, that says how many experts
            there are and that the forward reads (``histc(bins=self.num_experts)``,
            ``one_hot(num_classes=self.num_experts + 1)``); surgery sets it to the kept count.
        top_k_attr: the router's attribute holding how many experts each token uses: at least that many
            must be kept (``graph.min_keep``).
    """

    router: str = "gate"
    experts: str = "experts"
    count_attr: str = "num_experts"
    top_k_attr: str | None = "top_k"


_REGISTRY: dict[Any, ExpertSpec] = {}
_LOCK = threading.Lock()


def _key(cls: type | str) -> Any:
    if isinstance(cls, str):
        if "." not in cls:
            raise ValueError(f"register_experts({cls!r}): give the class or its qualified name "
                             "'package.module.ClassName'")
        return cls
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_experts expects an nn.Module subclass or its qualified name, got {cls!r}")
    return cls


def register_experts(cls: type | str, spec: ExpertSpec | None = None, *, replace: bool = False,
                     **fields) -> ExpertSpec:
    """Teach prunekit a mixture-of-experts block class, so whole experts become prunable units.

    ``cls``: the block class (its router and experts are children) or its qualified name
    (``"transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock"``), matched over the MRO of each
    module's class, so the package is never imported to register.  ``spec`` or keyword fields: see
    :class:`ExpertSpec`.  A class registered twice raises unless ``replace=True``."""
    key = _key(cls)
    spec = spec if spec is not None else ExpertSpec(**fields)
    if not isinstance(spec, ExpertSpec):
        raise TypeError(f"register_experts: spec must be an ExpertSpec, got {type(spec).__name__}")
    with _LOCK:
        if key in _REGISTRY and not replace:
            raise ValueError(f"{key!r} is already registered as a mixture-of-experts block; pass replace=True")
        _REGISTRY[key] = spec
    return spec


def unregister_experts(cls: type | str) -> ExpertSpec:
    """Remove a registration made with :func:`register_experts` (KeyError when there is none)."""
    with _LOCK:
        return _REGISTRY.pop(_key(cls))


def experts_spec_of(module: nn.Module | None) -> ExpertSpec | None:
    """The :class:`ExpertSpec` of ``module``'s class (by class or qualified name over its MRO), or None."""
    if module is None or not _REGISTRY:
        return None
    for c in type(module).__mro__:
        spec = _REGISTRY.get(c) or _REGISTRY.get(f"{c.__module__}.{c.__qualname__}")
        if spec is not None:
            return spec
    return None


def _leading(mod: nn.Module, prefix: str, n: int) -> list[str]:
    """Names of ``mod``'s own floating parameters/buffers whose leading dim is ``n``."""
    out = []
    for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
        if t is not None and t.dim() >= 1 and t.shape[0] == n and (t.is_floating_point() or t.is_complex()):
            out.append(f"{prefix}.{name}" if prefix else name)
    return out


def prepare(A) -> dict[str, Any]:
    """Give every registered MoE block of the analysed model its expert space (see the module docstring).

    Called by the :class:`~prunekit.analysis.analyzer.Analyzer` before the op rules run.  Returns
    ``{module name: expert layout}`` for the router and experts modules of every block (the rules of
    :mod:`prunekit.analysis.ops.routing` look the executing module up there), and records the least number
    of experts each block must keep in ``A.min_keep_spaces`` ([(space, n)])."""
    found: dict[str, Any] = {}
    for name, block in list(A.modules.items()):
        spec = experts_spec_of(block)
        if spec is None:
            continue
        try:
            router = block.get_submodule(spec.router)
            experts = block.get_submodule(spec.experts)
        except AttributeError:
            continue
        n = getattr(experts, spec.count_attr, None)
        if type(n) is not int or n < 2 or getattr(router, spec.count_attr, n) != n:
            continue
        pre = f"{name}." if name else ""
        rname, ename = pre + spec.router, pre + spec.experts
        fqns = _leading(router, rname, n) + _leading(experts, ename, n)
        nids = [A.param_nid[f] for f in fqns if f in A.param_nid]
        if not any(f.startswith(ename + ".") and f in A.param_nid for f in fqns):
            continue  # the experts' parameters were not captured (a block not run on this input)
        lay = C.fresh(n)
        C.tag(lay, "expert")
        C.mix(lay, f"{rname}: {EXPERT_MIX}")
        for nid in nids:
            A.layouts[nid][0] = lay
        for mod in (rname, ename):
            if type(getattr(A.modules.get(mod), spec.count_attr, None)) is int:
                A.bind(mod, spec.count_attr, lay)
            found[mod] = lay
        k = getattr(router, spec.top_k_attr, None) if spec.top_k_attr else None
        if type(k) is int and k > 1:
            A.min_keep_spaces.append((C.leaves(lay)[0], k))
    return found


def expert_layout(A, op) -> Any:
    """The expert layout of the MoE block whose router or experts module (or a child of it) runs ``op``."""
    mod = op.module or ""
    experts = getattr(A, "expert_dims", None) or {}
    while True:
        if mod in experts:
            return experts[mod]
        if not mod:
            return None
        mod = mod.rpartition(".")[0]


def routed(A, t, d: int) -> bool:
    """Does dim ``d`` of tensor ``t`` index experts only (every leaf of size > 1 is an expert space)?"""
    leaves = [s for s in C.leaves(A.lay(t, d)) if s.size > 1]
    return bool(leaves) and all("expert" in s.tags for s in leaves)
