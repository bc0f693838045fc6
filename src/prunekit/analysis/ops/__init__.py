"""The op registry and the op families that fill it.

Each family file holds, for its ops, the channel rule and the MACs formula side by side:
``elementwise`` (activations, arithmetic), ``conv``, ``linear`` (matrix products), ``norms``, ``shape`` (views,
reshapes, slices, cat), ``spatial`` (pooling, upsampling), ``attention`` (SDPA, the capture's markers),
``reductions`` (sum, mean, softmax), ``indexing`` (index, gather, embedding), ``creation`` (factories),
``routing`` (mixture-of-experts: ``_grouped_mm``, ``index_add``, ``topk``, ``nonzero``, ``one_hot``, ``histc``).
Add an op to its family with the ``@rule(...)`` decorator, or from outside with :func:`prunekit.register_op`.
"""
from .registry import (FieldView, OpRegistration, OpSpec, Zero, lookup, packet_name, pinning_rule, qualname, register,
                       register_many, register_op, specs, unregister, unregister_op)
from . import elementwise, conv, linear, norms, shape, spatial, attention, reductions, indexing, creation, routing  # noqa: F401,E401

__all__ = ["FieldView", "OpRegistration", "OpSpec", "register_op", "unregister_op", "Zero", "lookup", "packet_name", "pinning_rule", "qualname", "register",
           "register_many", "specs", "unregister"]
