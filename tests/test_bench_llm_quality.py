"""The quick path of benchmarks/llm_quality.py: a tiny model, two criteria, depth, width+depth, 3 distill steps."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_quick_run_writes_json_and_markdown(tmp_path, monkeypatch):
    import _llm_corpus as C
    try:
        C.corpus_dir()
    except FileNotFoundError:
        pytest.skip("python3.11-doc corpus not installed")
    import llm_quality as L
    monkeypatch.setattr(L, "tp_prune", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("TP skipped in test")))
    assert L.main(["--quick", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "llm_quality_quick.json").read_text())
    assert r["dense"]["ppl"] > 1
    ok = [row for row in r["rows"] if "ppl" in row]
    assert {row["method"] for row in ok} >= {"width l2", "width flap +bias", "width flap + depth 1 block"}
    for row in ok:
        assert row["params_kept"] < 1.0 and row["distilled"]["ppl"] > 1
    assert any("error" in row for row in r["rows"])  # the failed TP row is reported, not fatal
    assert "| 50% | width l2 |" in (tmp_path / "llm_quality_quick.md").read_text()
