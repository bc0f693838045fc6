"""Expanding a product-decomposed space in place (``spaces._expand_head``), used by ``tie`` and ``split_sizes``."""
from __future__ import annotations

import pytest

from prunekit.analysis import spaces as C


def sizes(l):
    return [tuple(s.size for s in t) for t in C.expand(l)]


def test_tie_expands_a_decomposed_space_and_aligns_factors():
    a = C.fresh(12)
    C.split_sizes(a, [3, 4])  # a is now 3 x 4
    b = C.merge([C.fresh(3), C.fresh(2), C.fresh(2)])
    assert C.tie(a, b)  # a's 4 is split into 2 x 2 to meet b
    assert sizes(a) == [(3, 2, 2)]
    assert [C.find(s).id for s in C.expand(a)[0]] == [C.find(s).id for s in C.expand(b)[0]]


def test_tie_pins_a_product_whose_factor_is_a_concatenation():
    x = C.fresh(6)
    _, q = C.split_sizes(x, [2, 3])  # x = 2 x q
    C.tie(q, C.concat([C.fresh(1), C.fresh(2)]))  # q = cat(1, 2): x cannot be expanded into a product of leaves
    assert C.tie(((C.find(x[0][0]),),), C.merge([C.fresh(2), C.fresh(3)]), "why") is False
    assert all(any("why" in r and "concatenation inside a product" in r for r in s.pins) for s in C.leaves(x))


def test_split_sizes_refuses_a_concatenation_inside_a_product():
    l = C.fresh(12)
    p, q = C.split_sizes(l, [3, 4])
    C.tie(q, C.concat([C.fresh(2), C.fresh(2)]))  # the 4 is cat(2, 2)
    with pytest.raises(C.TieError, match="concatenation"):
        C.split_sizes(l, [6, 2])
