"""Factories (empty, zeros, arange, ...) create tensors of a fixed size; triangular masks pin their dims."""
from __future__ import annotations

from .. import spaces as C
from ._common import rule


# ---------------------------------------------------------------- creation / misc
@rule("empty", "zeros", "ones", "full", "arange", "empty_strided", "rand", "randn", "randint", "linspace",
      "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided", "eye", "scalar_tensor", "tensor",
      "_to_dense", "randperm", "tril_indices", "triu_indices", "logspace", structural=True)
def _create(A, op):
    for out in op.outs():
        for d, s in enumerate(A.shape(out)):
            A.set(out, d, C.fresh(s, f"{A.where(op)}: tensor created with a fixed size"))


@rule("tril", "triu", "tril_", "triu_", structural=True)
def _tri(A, op):
    x, out = op.args[0], op.outs()[0]
    n = len(A.shape(x))
    for d in range(n):
        if d >= n - 2:
            C.pin(A.lay(x, d), f"{A.where(op)}: triangular mask")
        A.copy_dim(x, d, out, d)

