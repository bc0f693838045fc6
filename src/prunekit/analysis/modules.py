"""What prunekit knows about layer classes: one registry of :class:`ModuleSpec`, looked up by ``isinstance``.

Channel groups come from the ops a forward runs (see :mod:`prunekit.analysis.rules`), not from module
classes.  A few things are still properties of a *layer*, and they all live here:

* which weight dim holds the layer's output channels (``out_dim``: the layer is a *source* of its group,
  which importance criteria score and learned gates gate) and which its input channels (``in_dim``);
* which size attributes follow which parameter dims (``attrs``): after pruning ``nn.Linear``'s
  ``out_features`` equals its new ``weight.shape[0]`` -- forwards that read such an attribute
  (``x.view(B, self.out_features)``) keep working;
* whether the layer is a normalisation layer (``norm``) and whether it normalises channels at dim 1
  (``channel_first``: BatchNorm, GroupNorm) or the trailing dims (LayerNorm, RMSNorm);
* where its output keeps its channels (``act_dim``: 1 for ``(N, C, ...)`` convs, -1 for linear layers);
* attributes surgery must recompute after slicing (``after_surgery``, e.g. ``MultiheadAttention.head_dim``).

Look-ups walk the class's MRO, so subclasses match their base's spec (timm's ``Conv2dSame``, torch's
``NonDynamicallyQuantizableLinear``) and the most specific registered class wins.  Teach prunekit a custom
layer with :func:`register_module` (``pk.register_module``)::

    class HeadProj(nn.Module):               # not a subclass of any torch layer
        def __init__(self, d_in, d_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_out, d_in))
            self.out_features = d_out
        def forward(self, x):
            return (x @ self.weight.t()).reshape(-1, self.out_features)

    pk.register_module(HeadProj, out_dim=0, in_dim=1, attrs={"out_features": ("weight", 0)})

Without the registration ``out_features`` stays at its old value after pruning, the pruned forward
breaks, and the dry run of :func:`prunekit.analyze` pins the group; with it the group prunes and
``out_features`` follows.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace as _dc_replace
from typing import Any, Callable, Mapping, Union

from torch import nn

__all__ = ["ModuleSpec", "register_module", "register_module_by_name", "unregister_module", "spec_of", "registered", "source_dim", "in_dim",
           "is_norm", "module_attr", "attr_source", "after_surgery"]

AttrSource = Union[tuple, Callable[[nn.Module], "tuple | None"]]


@dataclass(frozen=True)
class ModuleSpec:
    """How one layer class relates its parameters to its attributes (register with :func:`register_module`).

    Args:
        out_dim: dim of ``weight`` (the parameter named ``weight``) that holds the layer's output channels, or
            None when the layer is not a source of channels (norms, activations).  Conv/Linear: 0,
            ConvTranspose/Embedding: 1.
        in_dim: dim of ``weight`` that holds its input channels (Conv/Linear: 1), or None.
        attrs: ``{attribute: source}``: the size attribute that must equal a parameter dim after pruning.
            A source is ``(param, dim)`` -- ``param`` a parameter name relative to the module (``"weight"``,
            ``"weight_ih_l0"``, ``"out_proj.weight"``), ``dim`` an int, or None for the whole shape as a tuple
            (LayerNorm's ``normalized_shape``) -- or a callable ``source(module) -> (param, dim) | None``
            choosing at analysis time.  An attribute is only bound when its current value equals that size
            (so a grouped conv's ``in_channels``, which is ``weight.shape[1] * groups``, is left to the conv
            op rule, which binds it from the input's channels).  Op rules may bind attributes too; the first
            binding of an attribute wins and op rules run first.
        norm: a normalisation layer (its ``weight`` is a per-channel scale: ``member_role`` says "norm",
            the BN-scale regularizer and learned gates use it).
        channel_first: for norms: True when the channels it scales sit at dim 1 of its output (BatchNorm,
            InstanceNorm, GroupNorm), False when they are the trailing dims (LayerNorm, RMSNorm).
        act_dim: dim of the module's *output* that holds its output channels (conv: 1, linear/embedding: -1);
            learned gates multiply it.  None: not gateable.
        infer_attrs: let the reshape heuristic also bind other int attributes of this module that equal a
            size a reshape inside its forward uses (``x.view(B, self.heads, -1)``).  False for torch layers,
            whose attributes are all listed in ``attrs`` or handled by op rules.
        after_surgery: ``fn(module, sliced) -> {attr: value}``, called after surgery sliced this module's
            parameters (``sliced``: the set of its sliced parameter names, relative to the module); the
            returned attributes are set (and undone if verification fails).  For values derived from
            several attributes, e.g. ``MultiheadAttention.head_dim = embed_dim // num_heads``.
    """

    out_dim: int | None = None
    in_dim: int | None = None
    attrs: Mapping[str, AttrSource] = field(default_factory=dict)
    norm: bool = False
    channel_first: bool | None = None
    act_dim: int | None = None
    infer_attrs: bool = True
    after_surgery: Callable[[nn.Module, frozenset], Mapping[str, Any]] | None = None
    factory_attrs: tuple = ()
    # dims of the tensors this module's forward creates (zeros, empty...) whose size the forward reads from its
    # input's shape at run time, so they follow pruning (torchvision's MultiScaleRoIAlign: (boxes, channels, h,
    # w) with channels = x.shape[1] -> (1,)); they get a free layout instead of being pinned as fixed sizes, and
    # the dry run checks the claim
    input_sized_dims: tuple = ()

    def __post_init__(self) -> None:
        for name, src in dict(self.attrs).items():
            if not callable(src) and not (isinstance(src, tuple) and len(src) == 2 and isinstance(src[0], str)
                                          and (src[1] is None or type(src[1]) is int)):
                raise TypeError(f"ModuleSpec attrs[{name!r}] must be (param_name, dim) with dim an int or None, "
                                f"or a callable module -> (param_name, dim); got {src!r}")
        object.__setattr__(self, "attrs", dict(self.attrs))


_REGISTRY: dict[type, ModuleSpec] = {}
_CACHE: dict[type, ModuleSpec | None] = {}
# specs of classes named by ``"module.QualName"`` (third-party layers such as transformers' ``Conv1D``): looked up
# by name while walking an MRO, so the library defining the class is never imported to register it
_BY_NAME: dict[str, ModuleSpec] = {}
_LOCK = threading.Lock()


def register_module(cls: type, spec: ModuleSpec | None = None, *, replace: bool = False, **fields) -> ModuleSpec:
    """Teach prunekit a layer class: which weight dims are its channels and which attributes follow them.

    ``pk.register_module(MyLayer, out_dim=0, in_dim=1, attrs={"out_features": ("weight", 0)})`` or
    ``pk.register_module(MyLayer, ModuleSpec(...))``; the keyword arguments are :class:`ModuleSpec`'s fields.
    The spec applies to ``cls`` and its subclasses (a subclass registered itself wins).  Register before
    :func:`prunekit.analyze`: analysis reads the registry.

    A class is registered once: registering it again raises ``ValueError`` unless ``replace=True`` (the new
    spec then replaces the old).  :func:`unregister_module` removes a registration (e.g. at the end of a
    test).  Returns the registered spec.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_module expects an nn.Module subclass, got {cls!r}")
    if spec is None:
        spec = ModuleSpec(**fields)
    elif fields:
        spec = _dc_replace(spec, **fields)
    if not isinstance(spec, ModuleSpec):
        raise TypeError(f"register_module({cls.__name__}, ...): spec must be a ModuleSpec, got {type(spec).__name__}")
    with _LOCK:
        if cls in _REGISTRY and not replace:
            raise ValueError(f"{cls.__module__}.{cls.__qualname__} is already registered with prunekit; pass "
                             "replace=True to replace its spec, or pk.unregister_module it first")
        _REGISTRY[cls] = spec
        _CACHE.clear()
    return spec


def unregister_module(cls: type) -> ModuleSpec:
    """Remove ``cls``'s registration (its subclasses fall back to the next registered base); returns the spec.
    Raises ``KeyError`` when ``cls`` itself is not registered."""
    with _LOCK:
        if cls not in _REGISTRY:
            raise KeyError(f"{getattr(cls, '__qualname__', cls)!r} is not registered with prunekit")
        spec = _REGISTRY.pop(cls)
        _CACHE.clear()
    return spec


def registered() -> dict[type, ModuleSpec]:
    """A copy of the registry: {class: spec}."""
    return dict(_REGISTRY)


def spec_of(module: nn.Module | type | None) -> ModuleSpec | None:
    """The spec of ``module`` (an instance or a class): that of the first registered class in its MRO."""
    if module is None:
        return None
    cls = module if isinstance(module, type) else type(module)
    try:
        return _CACHE[cls]
    except KeyError:
        pass
    found = None
    for c in cls.__mro__:
        if c in _REGISTRY:
            found = _REGISTRY[c]
            break
        if _BY_NAME:
            named = _BY_NAME.get(f"{c.__module__}.{c.__qualname__}")
            if named is not None:
                found = named
                break
    _CACHE[cls] = found
    return found


def register_module_by_name(qualified: str, spec: ModuleSpec | None = None, **fields) -> ModuleSpec:
    """Register the spec of a class named ``"package.module.QualName"`` without importing it (a layer of an
    optional library: transformers' ``Conv1D``).  A class registered with :func:`register_module` wins over
    a name registration in the same place of the MRO."""
    if spec is None:
        spec = ModuleSpec(**fields)
    with _LOCK:
        _BY_NAME[qualified] = spec
        _CACHE.clear()
    return spec


def source_dim(module: nn.Module | None) -> int | None:
    """Weight dim that holds ``module``'s output channels (subclasses such as timm's Conv2dSame included)."""
    spec = spec_of(module)
    return spec.out_dim if spec is not None else None


def in_dim(module: nn.Module | None) -> int | None:
    """Weight dim that holds ``module``'s input channels, else None."""
    spec = spec_of(module)
    return spec.in_dim if spec is not None else None


def is_norm(module: nn.Module | None) -> bool:
    """A normalisation layer: a registered spec with ``norm=True`` (BatchNorm, InstanceNorm, GroupNorm, LayerNorm,
    RMSNorm and their subclasses).  A class that is not registered at all counts as a norm when its name
    contains "norm" (transformers' ``LlamaRMSNorm``, ``T5LayerNorm`` subclass only ``nn.Module``)."""
    if module is None:
        return False
    spec = spec_of(module)
    if spec is not None:
        return spec.norm
    return "norm" in type(module).__name__.lower()


def attr_source(module: nn.Module, attr: str) -> tuple[str, int | None] | None:
    """``(param, dim)`` that ``module.attr`` follows according to its spec, or None."""
    spec = spec_of(module)
    src = spec.attrs.get(attr) if spec is not None else None
    if callable(src):
        src = src(module)
    return src


def after_surgery(module: nn.Module, sliced: frozenset) -> dict[str, Any]:
    """Attributes to set on ``module`` after surgery sliced its parameters ``sliced`` (names relative to it)."""
    spec = spec_of(module)
    if spec is None or spec.after_surgery is None:
        return {}
    return dict(spec.after_surgery(module, sliced) or {})


def module_attr(model: nn.Module, fqn: str, modules: Mapping[str, nn.Module] | None = None) -> tuple[nn.Module, str]:
    """(owning module, attribute name) of a parameter/buffer name such as ``layer1.0.conv1.weight``
    (``modules``: an optional ``dict(model.named_modules(remove_duplicate=False))`` for many lookups)."""
    mod_name, _, attr = fqn.rpartition(".")
    mod = modules.get(mod_name) if modules is not None else None
    if mod is None:
        mod = model.get_submodule(mod_name) if mod_name else model
    return mod, attr


# ---------------------------------------------------------------------------- torch's own layers
def _mha_proj(which: str) -> Callable[[nn.Module], tuple | None]:
    def source(m: nn.Module) -> tuple | None:  # packed q/k/v (same widths): in_proj_weight's columns
        return ("in_proj_weight", 1) if m._qkv_same_embed_dim else (f"{which}_proj_weight", 1)
    return source


def _mha_after(m: nn.Module, sliced: frozenset) -> dict[str, Any]:
    if "in_proj_weight" in sliced and m.embed_dim % m.num_heads == 0:
        return {"head_dim": m.embed_dim // m.num_heads}
    return {}


def _rnn_hidden(m: nn.Module) -> tuple | None:
    return ("weight_hh_l0", 1) if not getattr(m, "proj_size", 0) else None


def _prelu_after(m: nn.Module, sliced: frozenset) -> dict[str, Any]:
    return {"num_parameters": m.weight.numel()}


def _register_torch() -> None:
    conv = dict(act_dim=1, infer_attrs=False)
    register_module(nn.modules.conv._ConvNd, out_dim=0, in_dim=1, **conv,
                    attrs={"in_channels": ("weight", 1), "out_channels": ("weight", 0)})
    register_module(nn.modules.conv._ConvTransposeNd, out_dim=1, in_dim=0, **conv,
                    attrs={"in_channels": ("weight", 0), "out_channels": ("weight", 1)})
    register_module(nn.Linear, out_dim=0, in_dim=1, act_dim=-1, infer_attrs=False,
                    attrs={"in_features": ("weight", 1), "out_features": ("weight", 0)})
    register_module(nn.Embedding, out_dim=1, act_dim=-1, infer_attrs=False, attrs={"embedding_dim": ("weight", 1)})
    # BatchNorm*, SyncBatchNorm, InstanceNorm* (the affine-less ones have no weight: their op rule binds)
    register_module(nn.modules.batchnorm._NormBase, norm=True, channel_first=True, infer_attrs=False,
                    attrs={"num_features": ("weight", 0)})
    register_module(nn.GroupNorm, norm=True, channel_first=True, infer_attrs=False,
                    attrs={"num_channels": ("weight", 0)})
    register_module(nn.LayerNorm, norm=True, channel_first=False, infer_attrs=False,
                    attrs={"normalized_shape": ("weight", None)})
    if hasattr(nn, "RMSNorm"):
        register_module(nn.RMSNorm, norm=True, channel_first=False, infer_attrs=False,
                        attrs={"normalized_shape": ("weight", None)})
    # RNN/LSTM/GRU: the first layer's input weight is (gates x hidden, input_size); forward checks input_size
    register_module(nn.RNNBase, attrs={"input_size": ("weight_ih_l0", 1), "hidden_size": _rnn_hidden})
    register_module(nn.MultiheadAttention, after_surgery=_mha_after,
                    attrs={"embed_dim": ("out_proj.weight", 0), "kdim": _mha_proj("k"), "vdim": _mha_proj("v")})
    register_module(nn.PReLU, attrs={"num_parameters": ("weight", 0)}, after_surgery=_prelu_after)


_register_torch()

from . import hf_layers as _hf_layers  # noqa: E402,F401  transformers layers, registered by name (no import)
