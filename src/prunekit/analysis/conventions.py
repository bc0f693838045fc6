"""Model conventions of optional libraries: default forwards and modules pinned by name.

Detectors (ultralytics YOLO, torchvision R-CNNs) end their forward in data-dependent post-processing, or return
features next to predictions; :mod:`prunekit.detection` registers here, by module prefix or class name (so the
core never imports those libraries), the forward to analyse them through and the modules whose channels are pinned.
"""
from __future__ import annotations

from typing import Callable, Mapping

from torch import nn

from ..capture import Tape
from . import spaces as C
from .analyzer import Analyzer


# model conventions of optional libraries (ultralytics YOLO, torchvision detectors): ``(module prefix, resolver,
# pins)``; for a model whose class lives in a module starting with the prefix, ``resolver(model)`` may return the
# forward_fn to use when the user gave none (e.g. one returning the outputs before post-processing), and
# ``pins(model)`` returns ``{module name: reason}``: every channel of those modules' parameters is pinned with that
# reason (``"name:out"``: only dim 0 of its parameters, a conv/linear/norm's output channels).  Registered by name (prunekit.detection), so the core never imports those libraries.
_CONVENTIONS: list[tuple[str, Callable[[nn.Module], Callable | None], Callable[[nn.Module], dict] | None]] = []


def register_model_convention(module_prefix: str, resolver: Callable[[nn.Module], Callable | None],
                              pins: Callable[[nn.Module], Mapping[str, str]] | None = None) -> None:
    """Give models whose class module starts with ``module_prefix`` (``"ultralytics."``) a default forward_fn
    (``resolver(model)`` returns one, or None to call the model as usual; a user's ``forward_fn`` always wins)
    and modules pinned by name (``pins(model) -> {module name: reason}``)."""
    _CONVENTIONS[:] = [c for c in _CONVENTIONS if c[0] != module_prefix] + [(module_prefix, resolver, pins)]


def _conventions_of(model: nn.Module):
    mod = type(model).__module__ + "."
    return [c for c in _CONVENTIONS if mod.startswith(c[0])]


def default_forward_fn(model: nn.Module) -> Callable | None:
    """The forward_fn a registered model convention gives ``model`` (None: call the model as usual)."""
    for _, resolver, _ in _conventions_of(model):
        fn = resolver(model)
        if fn is not None:
            return fn
    return None


# Default forwards by model class: ``{"pkg.module.Class": forward_fn}``.  A model of such a class (or a subclass)
# analysed without a forward_fn is called through it -- e.g. torchvision's detectors, whose full forward ends in
# data-dependent post-processing (proposals, NMS): prunekit.detection registers forwards returning the head outputs
# before post-processing, so analysis and verification see the parts that carry channels.  Filled by name, so no
# optional package is imported to look a model up.
DEFAULT_FORWARDS: dict[str, Callable] = {}


def register_default_forward(class_qualname: str, forward_fn: Callable) -> None:
    """Call models of class ``class_qualname`` (``type(m).__module__ + "." + type(m).__qualname__``, or a base
    class's) through ``forward_fn(model, inputs)`` when no forward_fn is given."""
    DEFAULT_FORWARDS[class_qualname] = forward_fn


def default_forward(model: nn.Module, forward_fn: Callable | None = None) -> Callable | None:
    """``forward_fn`` if given, else the registered default forward of ``model``'s class (None: call the model)."""
    if forward_fn is not None:
        return forward_fn
    for cls in type(model).__mro__ if DEFAULT_FORWARDS else ():
        fn = DEFAULT_FORWARDS.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            return fn
    return default_forward_fn(model)  # a convention registered by module prefix (ultralytics)


def pin_by_convention(model: nn.Module, tape: Tape, an: Analyzer) -> None:
    """Pin the channels of the modules the model's registered conventions name (``pins(model)``)."""
    pins: dict[str, str] = {}
    for _, _, fn in _conventions_of(model):
        pins.update(fn(model) if fn is not None else {})
    if not pins:
        return
    for nd in tape.nodes:
        if nd.kind != "param" or an.layouts[nd.id] is None:
            continue
        for key, reason in pins.items():
            name, _, which = key.partition(":")
            if nd.name.startswith(name + "."):
                for d in (range(len(nd.shape)) if which != "out" else range(min(1, len(nd.shape)))):
                    C.pin(an.lay(nd.id, d), reason)
