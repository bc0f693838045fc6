"""Factories (empty, zeros, arange, ...) create tensors of a fixed size; triangular masks pin their dims."""
from __future__ import annotations

from .. import modules as M
from .. import spaces as C
from ._common import rule

_ZERO_FACTORIES = frozenset({"zeros", "new_zeros"})


# ---------------------------------------------------------------- creation / misc
@rule("empty", "zeros", "ones", "full", "arange", "empty_strided", "rand", "randn", "randint", "linspace",
      "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided", "eye", "scalar_tensor", "tensor",
      "_to_dense", "randperm", "tril_indices", "triu_indices", "logspace", structural=True)
def _create(A, op):
    m = A.modules.get(op.module) if op.module is not None else None
    spec = M.spec_of(m)
    sized = {getattr(m, a, None): a for a in (spec.factory_attrs if spec is not None else ())}
    for out in op.outs():
        for d, s in enumerate(A.shape(out)):
            if spec is not None and d in spec.input_sized_dims and s > 1:  # sized from the input's shape
                A.set(out, d, C.fresh(s))
                A.set_zero(out, d, op.packet in _ZERO_FACTORIES)
                continue
            attr = sized.get(s) if s > 1 else None
            if attr is not None:  # the forward sized this dim by a module attribute that follows pruning (ModuleSpec)
                lay = C.fresh(s)
                A.set(out, d, lay)
                A.set_zero(out, d, op.packet in _ZERO_FACTORIES)
                A.bind(op.module, attr, lay)
                continue
            A.set(out, d, C.fresh(s, f"{A.where(op)}: tensor created with a fixed size"))


@rule("tril", "triu", "tril_", "triu_", structural=True)
def _tri(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    for d in range(n):
        if d >= n - 2:
            C.pin(A.lay(x, d), f"{A.where(op)}: triangular mask")
        A.copy_dim(x, d, out, d)

