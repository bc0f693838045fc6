"""The package layout follows the pipeline: each package imports only the ones before it.

capture -> analysis (spaces, op rules, groups) -> cost -> verify (dry run + post-prune check) -> surgery ->
graph (the analysis result) -> io -> runs -> plan (criteria, targets, schedules) -> algorithms -> cli.

Every import counts, also those inside functions (a lazy import is still a dependency).  verify comes before
surgery: the dry run is handed the slicing routine (``surgery.trial``) by its caller instead of importing it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import prunekit

ROOT = Path(prunekit.__file__).parent
ORDER = ["_base", "capture", "analysis", "cost", "verify", "surgery", "graph", "io", "runs", "plan", "algorithms",
         "hf", "detection", "", "cli"]  # "": the package root (``import prunekit as pk``, the public API), which only the CLI uses
BASE = {"_callbacks", "_version"}  # dependency-free helpers any layer may use
EXEMPT = {"__init__", "__main__"}  # the package's public surface imports everything


def layer_of(parts: list[str]) -> str | None:
    head = parts[0] if parts else ""
    if head in EXEMPT:
        return ""
    if head in BASE:
        return "_base"
    return head if head in ORDER else None


def imports_of(path: Path) -> list[tuple[int, list[str]]]:
    """(line, target module parts inside prunekit) of every prunekit import in ``path``."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    pkg = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else list(pkg)
                target = base + (node.module.split(".") if node.module else [])
                if not node.module:  # "from . import x": x is a module of that package (or a name in it)
                    for a in node.names:
                        out.append((node.lineno, target + [a.name]))
                    continue
                out.append((node.lineno, target))
            elif node.module and node.module.split(".")[0] == "prunekit":
                out.append((node.lineno, node.module.split(".")[1:]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "prunekit":
                    out.append((node.lineno, a.name.split(".")[1:]))
    return out


def test_each_package_imports_only_earlier_ones():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        if rel[0] in EXEMPT and len(rel) == 1:
            continue
        me = layer_of(list(rel))
        assert me is not None, f"{path.relative_to(ROOT)} is in no layer: add its package to ORDER or BASE"
        for line, target in imports_of(path):
            other = layer_of(target)
            if other is None:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports prunekit.{'.'.join(target)} (no layer)")
            elif ORDER.index(other) > ORDER.index(me):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({me}) imports prunekit.{'.'.join(target)} ({other})")
    assert not bad, "imports against the pipeline order:\n" + "\n".join(bad)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # the check itself can fail: a function-level relative import of a later package is found
    f = ROOT / "capture" / "_layout_probe.py"
    f.write_text("def f():\n    from ..algorithms import pruner\n")
    try:
        found = imports_of(f)
    finally:
        f.unlink()
    assert found == [(2, ["algorithms"])]
