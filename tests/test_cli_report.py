"""The CLI's reports are built in one place (``prunekit.cli.report``), used by ``analyze`` and ``prune``; their JSON
keys are a contract (scripts read them)."""
from __future__ import annotations

import importlib
import json

import pytest

from prunekit.cli import report as rep
from prunekit.cli.main import main

from .test_cli import NET_PY

ANALYZE_KEYS = ["prunekit_version", "torch_version", "command", "model", "model_class", "input", "seed",
                "analysis_seconds", "groups", "macs", "flops", "params", "prunable_proportion", "pinned_groups",
                "unsupported_ops", "group_list", "timings_s"]
PRUNE_KEYS = ["prunekit_version", "torch_version", "command", "model", "model_class", "input", "target", "options",
              "config_file", "options_from_config", "before", "after", "kept", "prunable_proportion", "groups",
              "units_removed", "changed_layers", "pinned_groups", "verification", "timings_s", "saved", "plots", "kept_units", "latency",
              "calibration", "depth", "perplexity"]


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(NET_PY)
    return f"{path}:build"


def run_json(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_analyze_and_prune_reports_come_from_cli_report(capsys, monkeypatch, net):
    calls = []
    for name in ("analyze_report", "prune_report", "pinned_groups"):
        real = getattr(rep, name)
        monkeypatch.setattr(rep, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    cli_main = importlib.import_module("prunekit.cli.main")  # the module (prunekit.cli.main is also the function)
    monkeypatch.setattr(cli_main, "analyze_report", rep.analyze_report)
    monkeypatch.setattr(cli_main, "prune_report", rep.prune_report)
    a = run_json(capsys, "analyze", net, "--input-shape", "1,3,8,8", "--json")
    p = run_json(capsys, "prune", net, "--input-shape", "1,3,8,8", "--ratio", "0.5", "--json")
    assert calls == ["analyze_report", "pinned_groups", "prune_report", "pinned_groups"]
    assert list(a) == ANALYZE_KEYS and list(p) == PRUNE_KEYS
    assert a["pinned_groups"] == p["pinned_groups"] and a["groups"]["total"] == p["groups"]["total"] == 4
    assert p["units_removed"] == 16 + 32 and p["groups"]["pruned"] == 2
    assert p["verification"]["passed"] and p["kept"]["params"] < 1.0


def test_prune_text_is_rendered_from_the_report(capsys, net):
    assert main(["prune", net, "--input-shape", "1,3,8,8", "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "conv1: Conv2d(3, 32," in out and "=> Conv2d(3, 16," in out
    assert "Groups: 4 total, 2 prunable, 2 pruned (48 units removed)" in out
    assert "Verification: passed" in out and "Pinned groups: 2" in out
