"""Channel spaces: a small algebra of index spaces with union-find.

A *space* is a set of channel indices.  Spaces are tied together (union-find) by elementwise
ops and contractions, and decomposed when an op needs part of them: a ``cat`` decomposition
(concatenation: split/cat/narrow) or a ``prod`` decomposition (row-major product: reshape into
heads x head_dim, grouped convs, channel shuffle).  A tensor dimension carries a *layout*: a
tuple of terms concatenated along the dim, each term a row-major product of spaces.

The leaves of the decomposition forest are the units pruning acts on: removing unit ``u`` of a
leaf removes, in every layout that contains the leaf, the indices whose coordinate along that
leaf is ``u``.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

Term = tuple  # tuple[Space, ...]
Layout = tuple  # tuple[Term, ...]


_IDS = itertools.count(1)  # next() on it is atomic: analyses in several threads never share an id


class Space:
    """A set of ``size`` channel indices: a union-find node (``parent``), possibly decomposed into parts
    (``decomp``: ``("cat", parts)`` or ``("prod", factors)``), with the reasons it is pinned (``pins``: it
    keeps its size) or mixed (``mix``: removing its units is not equal to zeroing them) and free-form
    ``tags`` ("head", "head_dim", "group", "nonchannel")."""

    __slots__ = ("id", "size", "parent", "decomp", "pins", "mix", "tags")

    def __init__(self, size: int, pin: str | None = None):
        self.id = next(_IDS)
        self.size = int(size)
        self.parent: Space | None = None
        self.decomp: tuple[str, list[Space]] | None = None
        self.pins: list[str] = [pin] if pin else []
        self.mix: list[str] = []
        self.tags: set[str] = set()

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"S{self.id}({self.size})"


class TieError(Exception):
    """Two layouts cannot be the same channels (different sizes, or decompositions that do not align).
    Raised by :func:`tie`, :func:`split_sizes` and :func:`slice_layout`; a rule that does not catch it has
    the op's tensors pinned with the message."""


def find(s: Space) -> Space:
    """The representative of the spaces ``s`` is tied to (union-find root, with path compression)."""
    root = s
    while root.parent is not None:
        root = root.parent
    while s.parent is not None and s.parent is not root:
        s.parent, s = root, s.parent
    return root


def _add_reasons(dst: list[str], src: Iterable[str], cap: int = 6) -> None:
    for r in src:
        if r not in dst and len(dst) < cap:
            dst.append(r)


def _children(s: Space, kind: str, sizes: Sequence[int]) -> list[Space]:
    """Decompose root leaf ``s`` into children of the given sizes (inheriting pins/mix/tags)."""
    assert s.parent is None and s.decomp is None
    kids = []
    for n in sizes:
        c = Space(n)
        c.pins = list(s.pins)
        c.mix = list(s.mix)
        c.tags = set(s.tags)
        if kind == "prod":
            c.tags.add("factor")  # a factor of a reshaped dim (e.g. heads or head_dim)
        kids.append(c)
    s.decomp = (kind, kids)
    return kids


def term_size(t: Term) -> int:
    """The size of a term: the product of its spaces' sizes."""
    return math.prod(find(s).size for s in t)


def layout_size(l: Layout) -> int:
    """The size of a dim with layout ``l``: the sum of its terms' sizes."""
    return sum(term_size(t) for t in l)


def expand_space(s: Space, found: set | None = None) -> list[Term]:
    """Space ``s`` as terms of leaf spaces, following its (and its parts') decompositions."""
    r = find(s)
    if r.decomp is None:
        return [(r,)]
    kind, parts = r.decomp
    if kind == "cat":
        return [t for p in parts for t in expand_space(p, found)]
    return _expand_prod(parts, found)


def _expand_prod(factors: Sequence[Space], found: set | None = None) -> list[Term]:
    """Row-major product of factors as a concatenation of product terms.

    ``A x cat(B, C)`` is *not* ``cat(A x B, A x C)`` when ``|A| > 1`` (row-major interleaves B and C
    blocks per element of A), so a split factor after a leading factor of size > 1 is kept whole
    (opaque); its parts cannot be cut consistently and are pinned by the analyzer, which collects such
    factors in ``found``.  A split of the leading factor is exact: ``cat(B, C) x A = cat(B x A, C x A)``.
    """
    res: list[Term] = [()]
    prefix = 1
    for f in factors:
        ef = expand_space(f, found)
        if len(ef) > 1 and prefix > 1:
            r = find(f)
            if found is not None:
                found.add(r)
            ef = [(r,)]
        res = [a + b for a in res for b in ef]
        prefix *= find(f).size
    return res


def expand_term(t: Term, found: set | None = None) -> list[Term]:
    """Term ``t`` (a product of spaces) as terms of leaf spaces."""
    return _expand_prod(t, found)


def expand(l: Layout) -> list[Term]:
    """Fully expanded layout: a list of terms of leaf root spaces (size-1 leaves dropped)."""
    out = []
    for t in l:
        for e in expand_term(t):
            out.append(tuple(x for x in e if x.size != 1) or e[:1])
    return out


def leaves(l: Layout) -> list[Space]:
    """The distinct leaf spaces of layout ``l``: the units pruning can remove from the dim."""
    seen: dict[int, Space] = {}
    for t in expand(l):
        for s in t:
            seen.setdefault(id(s), s)
    return list(seen.values())


def fresh(size: int, pin: str | None = None) -> Layout:
    """The layout of a dim with ``size`` new channels, tied to nothing (pinned for ``pin`` if given)."""
    if size == 0:
        return ()
    return ((Space(size, pin),),)


def fresh_nonchannel(size: int, reason: str) -> Layout:
    """A dim that never carries channels (spatial, kernel, batch, sequence): pinned and hidden from groups."""
    l = fresh(size, reason)
    tag(l, "nonchannel")
    return l


def pin(l: Layout | None, reason: str) -> None:
    """The channels of ``l`` keep their size: every group reaching them is not prunable, for ``reason``."""
    if l is None:
        return
    for s in leaves(l):
        if s.size > 1 and reason not in s.pins:
            _add_reasons(s.pins, [reason])


def mix(l: Layout | None, reason: str) -> None:
    """The channels of ``l`` are mixed by an op (a contraction over non-zero values, statistics over them):
    pruning them stays valid but is not exactly equal to zeroing them (the group is not ``exact``)."""
    if l is None:
        return
    for s in leaves(l):
        if s.size > 1:
            _add_reasons(s.mix, [reason])


def tag(l: Layout | None, name: str) -> None:
    """Add tag ``name`` to every leaf of ``l`` (``"head"``, ``"head_dim"``, ``"group"``, ``"nonchannel"``)."""
    if l is None:
        return
    for s in leaves(l):
        s.tags.add(name)


def _union_leaves(a: Space, b: Space) -> None:
    a, b = find(a), find(b)
    if a is b:
        return
    if a.size != b.size:
        raise TieError(f"size mismatch {a.size} vs {b.size}")
    if a.decomp is not None or b.decomp is not None:
        tie(((a,),), ((b,),))
        a, b = find(a), find(b)
        if a is b:
            return
        if a.decomp is not None and b.decomp is not None:
            # both decomposed and children already tied: link the roots for bookkeeping
            b.parent = a
            return
        if b.decomp is not None:
            a, b = b, a
    # a may be decomposed, b is a leaf: make b point to a
    b.parent = a
    _add_reasons(a.pins, b.pins)
    _add_reasons(a.mix, b.mix)
    a.tags |= b.tags


def _split_cat(s: Space, off: int) -> tuple[Space, Space]:
    """Cat-decompose leaf ``s`` at ``off``."""
    a, b = _children(s, "cat", [off, s.size - off])
    return a, b


def _split_prod(s: Space, outer: int) -> tuple[Space, Space]:
    """Prod-decompose leaf ``s`` into (outer, size/outer) row-major."""
    a, b = _children(s, "prod", [outer, s.size // outer])
    return a, b


def split_term_at(t: Term, off: int) -> tuple[Term, Term]:
    """Split a product term of leaves at index offset ``off`` (concatenation cut)."""
    t = tuple(x for x in (find(s) for s in t) if x.size != 1)
    if not t:
        raise TieError("cannot split an empty term")
    head, rest = t[0], t[1:]
    stride = math.prod(x.size for x in rest)
    if off % stride == 0:
        if head.decomp is not None:
            raise TieError("term is not a product of leaves")
        a, b = _split_cat(head, off // stride)
        return (a,) + rest, (b,) + rest
    raise TieError(f"cut at {off} falls inside a product with stride {stride}")


def _expand_head(factors: list[Space], head: Space) -> None:
    """Replace ``factors[0]`` (``head``, a space with a product decomposition) by its factors, in place (size-1
    factors dropped); a decomposition into a concatenation cannot be expanded inside a product."""
    ex = expand_space(head)
    if len(ex) != 1:
        raise TieError("concatenation inside a product")
    factors[0:1] = [z for z in ex[0] if z.size != 1]


def _tie_terms(t1: Term, t2: Term) -> None:
    a = [find(s) for s in t1 if find(s).size != 1]
    b = [find(s) for s in t2 if find(s).size != 1]
    while a and b:
        x, y = find(a[0]), find(b[0])
        if x.decomp is not None or y.decomp is not None:
            for lst, s in ((a, x), (b, y)):
                if s.decomp is not None:
                    _expand_head(lst, s)
            continue
        if x.size == y.size:
            _union_leaves(x, y)
            a.pop(0)
            b.pop(0)
        elif x.size % y.size == 0:
            x1, x2 = _split_prod(x, y.size)
            _union_leaves(x1, y)
            a[0] = x2
            b.pop(0)
        elif y.size % x.size == 0:
            y1, y2 = _split_prod(y, x.size)
            _union_leaves(x, y1)
            b[0] = y2
            a.pop(0)
        else:
            raise TieError(f"incompatible products {[s.size for s in a]} vs {[s.size for s in b]}")
    if a or b:
        raise TieError("product sizes do not match")


def tie(l1: Layout | None, l2: Layout | None, reason: str = "tie") -> bool:
    """Tie two layouts index-by-index. On structural conflict, pin both and return False."""
    if l1 is None or l2 is None:
        return False
    try:
        if layout_size(l1) != layout_size(l2):
            raise TieError(f"sizes differ {layout_size(l1)} vs {layout_size(l2)}")
        e1 = list(expand(l1))
        e2 = list(expand(l2))
        while e1 and e2:
            t1, t2 = e1[0], e2[0]
            s1, s2 = term_size(t1), term_size(t2)
            if s1 == s2:
                _tie_terms(t1, t2)
                e1.pop(0)
                e2.pop(0)
            elif s1 < s2:
                h, r = split_term_at(t2, s1)
                _tie_terms(t1, h)
                e1.pop(0)
                e2[0] = r
            else:
                h, r = split_term_at(t1, s2)
                _tie_terms(h, t2)
                e2.pop(0)
                e1[0] = r
        return True
    except TieError as e:
        msg = f"{reason}: channel layouts cannot be aligned ({e})"
        pin(l1, msg)
        pin(l2, msg)
        return False


def merge(layouts: Sequence[Layout]) -> Layout:
    """Row-major merge of several dims into one (flatten): distributes over concatenations."""
    res: list[Term] = [()]
    for l in layouts:
        if len(l) > 1 and sum(term_size(a) for a in res) > 1:
            # flattening (A, cat(B, C)) interleaves B and C per element of A: keep the dim as one space
            # tied to its parts (expanded opaquely, see _expand_prod)
            w = Space(layout_size(l))
            tie(((w,),), l, "flatten")
            l = ((w,),)
        res = [a + b for a in res for b in l]
    return tuple(res)


def concat(layouts: Sequence[Layout]) -> Layout:
    """The layout of dims concatenated along one dim (``cat``): their terms one after another."""
    return tuple(t for l in layouts for t in l)


def split_sizes(l: Layout, sizes: Sequence[int]) -> list[Layout]:
    """Split one dim with layout ``l`` into several dims of ``sizes`` (row-major reshape)."""
    sizes = list(sizes)
    if math.prod(sizes) != layout_size(l):
        raise TieError("reshape sizes do not match")
    big = [n for n in sizes if n != 1]
    if len(big) <= 1:
        return [l if n != 1 else fresh(1) for n in sizes]
    ex = expand(l)
    if len(ex) != 1:
        raise TieError("reshape splits a concatenation of channel spaces")
    fac = [find(s) for s in ex[0] if find(s).size != 1]
    out: list[Layout] = []
    for n in sizes:
        if n == 1:
            out.append(fresh(1))
            continue
        acc: list[Space] = []
        prod = 1
        while prod < n:
            if not fac:
                raise TieError("reshape sizes do not match")
            x = find(fac[0])
            if x.decomp is not None:
                _expand_head(fac, x)
                continue
            need = n // prod
            if n % prod:
                raise TieError("reshape boundary inside a factor")
            if x.size <= need:
                if need % x.size:
                    raise TieError("reshape boundary inside a factor")
                acc.append(x)
                prod *= x.size
                fac.pop(0)
            else:
                if x.size % need:
                    raise TieError("reshape boundary inside a factor")
                x1, x2 = _split_prod(x, need)
                acc.append(x1)
                prod *= need
                fac[0] = x2
        out.append((tuple(acc),))
    return out


def slice_layout(l: Layout, start: int, stop: int) -> Layout:
    """Sub-range [start, stop) of a dim (cat-decomposing spaces at the cut points)."""
    ex = list(expand(l))
    res: list[Term] = []
    pos = 0
    for t in ex:
        n = term_size(t)
        lo, hi = pos, pos + n
        pos = hi
        if hi <= start or lo >= stop:
            continue
        cur = t
        if lo < start:
            _, cur = split_term_at(cur, start - lo)
            lo = start
        if hi > stop:
            cur, _ = split_term_at(cur, stop - lo)
        res.append(cur)
    return tuple(res)


def kept_size(l: Layout | None, drops: dict[int, int] | None = None, leaf_size=None):
    """Size of a dim after removing ``drops[leaf.id]`` units from each leaf.

    A layout's size is a sum over its terms (concatenation) of products of leaf sizes.  With
    ``leaf_size(space)`` the leaf sizes come from that callable instead (any values that add and
    multiply: floats, tensors, symbolic polynomials -- how FLOPs become a function of kept units).
    """
    if l is None:
        return 1
    if leaf_size is None:
        drops = drops or {}
        leaf_size = lambda s: s.size - drops.get(s.id, 0)  # noqa: E731
    total = 0
    for t in expand(l):
        total += math.prod(leaf_size(s) for s in t)
    return total
