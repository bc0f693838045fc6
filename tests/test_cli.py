"""The ``prunekit`` command, run as a user runs it: ``python -m prunekit ...`` in a subprocess."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit as pk

R18 = ["torchvision:resnet18", "--input-shape", "1,3,32,32"]

NET_PY = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def build():
    return Net()


def build_with_inputs():
    return Net(), torch.randn(2, 3, 8, 8)
'''


def cli(*args: str, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "prunekit", *args], capture_output=True, text=True, cwd=cwd,
                       timeout=180)
    if ok:
        assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def changed(report: dict) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["before"], c["after"]) for c in report["changed_layers"]}


def conv_io(text: str) -> tuple[int, int]:
    m = re.match(r"Conv2d\((\d+), (\d+)", text)
    assert m, text
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def net_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "net.py"
    path.write_text(NET_PY)
    return path


@pytest.fixture(scope="module")
def pruned_r18(tmp_path_factory):
    """One prune run of resnet18 shared by several tests: ratio 0.3, round_to 8, one ignored layer, --save."""
    out = tmp_path_factory.mktemp("r18") / "out"
    p = cli("prune", *R18, "--ratio", "0.3", "--round-to", "8", "--ignore", "layer2.0.conv1", "--save", str(out))
    return p, out, json.loads((out / "report.json").read_text())


def test_list_models_with_a_pattern():
    p = cli("list-models", "resnet1*")
    names = p.stdout.split()
    assert "timm:resnet18" in names and "torchvision:resnet18" in names
    assert all(n.split(":", 1)[1].startswith("resnet1") for n in names), names
    assert "hf:" in p.stderr and "file.py:fn" in p.stderr


def test_analyze_text(net_file):
    p = cli("analyze", f"{net_file}:build", "--input-shape", "1,3,8,8", "--groups")
    out = p.stdout
    assert "prunable / reason" in out  # the groups table
    assert re.search(r"4 groups, 2 prunable", out), out
    macs = 8 * 8 * (3 * 32 * 9 + 32 * 64 * 9) + 64 * 10
    assert f"MACs {macs / 1e6:.2f} M" in out and "params 20.23 K" in out
    assert "model input" in out and "Pinned groups: 2" in out
    assert "group 0: source conv1; dependents bn1, conv2" in out  # --groups
    assert re.search(r"Analysis time: \d+\.\d+ s", out)


def test_analyze_json_matches_the_library():
    import torchvision
    p = cli("analyze", *R18, "--json")
    r = json.loads(p.stdout)  # nothing else on stdout
    model = torchvision.models.get_model("resnet18", weights=None)
    x = torch.randn(1, 3, 32, 32)
    graph = pk.analyze(model, x)
    assert r["macs"] == pk.count(model, x).macs
    assert r["params"] == sum(t.numel() for t in model.parameters())
    assert r["groups"]["total"] == len(graph.groups) == len(r["group_list"])
    assert r["groups"]["prunable"] == len(graph.prunable_groups)
    assert r["prunable_proportion"] == pytest.approx(graph.prunable_proportion)
    assert {g["reason"] for g in r["group_list"] if not g["prunable"]} == {p["reason"] for p in r["pinned_groups"]}
    assert r["torch_version"] == str(torch.__version__) and r["prunekit_version"] == pk.__version__


def test_prune_prints_every_changed_layer_and_counts(pruned_r18):
    p, _, report = pruned_r18
    lines = p.stdout.splitlines()
    arrows = [ln for ln in lines if re.match(r"^[\w.]+: \w+\(.*\) => \w+\(.*\)$", ln)]
    assert len(arrows) == len(report["changed_layers"]) > 10
    assert any(ln.startswith("layer1.0.conv1: Conv2d(64, 64,") and "=> Conv2d(48, 48," in ln for ln in arrows)
    b, a = report["before"], report["after"]
    assert a["macs"] < b["macs"] and a["params"] < b["params"]
    assert re.search(r"MACs: +37\.52 M => [\d.]+ [KM] \(\d+\.\d%\)", p.stdout), p.stdout
    assert re.search(r"Params: +11\.69 M => ", p.stdout)
    assert "Verification: passed" in p.stdout and report["verification"]["passed"]
    assert "model output" in p.stdout  # pinned groups with their reason


def test_round_to_makes_widths_multiples(pruned_r18):
    _, _, report = pruned_r18
    convs = {n: conv_io(after) for n, (before, after) in changed(report).items() if after.startswith("Conv2d")}
    assert convs
    for name, (cin, cout) in convs.items():
        if name != "conv1":  # conv1 reads the 3-channel image
            assert cin % 8 == 0, (name, cin)
        assert cout % 8 == 0 or cout == 1000, (name, cout)
    # 64 channels minus 30% is 44.8: without round_to there would be 45 left
    assert convs["layer1.0.conv1"] == (48, 48)


def test_ignore_keeps_a_layers_width(pruned_r18):
    _, _, report = pruned_r18
    ch = changed(report)
    assert conv_io(ch["layer2.0.conv1"][0]) == (64, 128)
    assert conv_io(ch["layer2.0.conv1"][1])[1] == 128  # ignored: output width kept
    assert conv_io(ch["layer2.1.conv1"][1])[1] == 96  # the same kind of layer, not ignored
    assert report["options"]["ignore"] == ["layer2.0.conv1"]


def test_save_writes_a_checkpoint_that_loads_to_identical_outputs(pruned_r18):
    import torchvision
    _, out, report = pruned_r18
    assert report["saved"] == str(out / "model.safetensors")
    loaded = pk.load(out / "model.safetensors", lambda: torchvision.models.get_model("resnet18", weights=None))
    # the CLI seeds the random weights (--seed 0): the same pruning in this process gives the same model
    torch.manual_seed(0)
    ref = torchvision.models.get_model("resnet18", weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    pk.Pruner(ref, x, "l2", pk.ChannelRatio(0.3), round_to=8, ignore=["layer2.0.conv1"]).prune()
    loaded.eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(loaded(x), ref(x))


def test_flops_target_is_met_and_report_equals_json(tmp_path):
    rep = tmp_path / "sub" / "report.json"
    p = cli("prune", *R18, "--flops-target", "0.5", "--json", "--report", str(rep))
    r = json.loads(p.stdout)
    assert r == json.loads(rep.read_text())
    assert r["after"]["macs"] <= 0.5 * r["before"]["macs"] * 1.0001
    assert r["after"]["macs"] > 0.4 * r["before"]["macs"]
    assert r["options"]["flops_target"] == 0.5 and r["options"]["ratio"] is None
    assert r["model"] == "torchvision:resnet18" and r["changed_layers"] and r["timings_s"]["plan"] >= 0


def test_yaml_config_with_flag_override(tmp_path, net_file):
    pytest.importorskip("yaml")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {net_file}:build\nratio: 0.25\nround-to: 4\nignore: conv1\ninput_shape: [1, 3, 16, 16]\n")
    r = json.loads(cli("prune", "--config", str(cfg), "--ratio", "0.5", "--json").stdout)
    assert r["options"]["ratio"] == 0.5  # the flag wins
    assert r["options"]["round_to"] == 4 and r["options"]["ignore"] == ["conv1"]
    assert r["input"] == "float32[1, 3, 16, 16]"
    ch = changed(r)
    assert "conv1" not in ch  # ignored, and its input is the image
    assert conv_io(ch["conv2"][1]) == (32, 32)


def test_json_config_flops_target(tmp_path, net_file):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"flops-target": 0.6, "max_ratio": 0.9, "input_shape": "1,3,16,16"}))
    r = json.loads(cli("prune", f"{net_file}:build", "--config", str(cfg), "--json").stdout)
    assert r["options"]["flops_target"] == 0.6 and r["options"]["max_ratio"] == 0.9
    assert r["options_from_config"] == ["flops_target", "input_shape", "max_ratio"]
    assert r["after"]["macs"] <= 0.6 * r["before"]["macs"] * 1.0001


def test_bad_ratio_exits_2_with_a_message_and_no_traceback(net_file):
    p = cli("prune", f"{net_file}:build", "--ratio", "1.5", ok=False)
    assert p.returncode == 2
    assert "--ratio must be in [0, 1)" in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""


# The other error cases run the same entry point in this process (no interpreter start-up each time).
def run_main(capsys, *args: str) -> tuple[int, str, str]:
    from prunekit.cli import main
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("args, code, message", [
    (["--flops-target", "0"], 2, "--flops-target must be in (0, 1]"),
    (["--flops-target", "0.05", "--max-ratio", "0.5"], 1, "is not reachable"),
    (["--ratio", "0.5", "--input-shape", "1,3,x"], 2, "--input-shape must be positive integers"),
    (["--ratio", "0.5", "--input-shape", "1,3,,8"], 2, "--input-shape must be positive integers"),
    (["--ratio", "0.5", "--max-ratio", "0"], 2, "--max-ratio must be in (0, 1]"),
    (["--ratio", "0.5", "--round-to", "0"], 2, "--round-to must be a positive integer"),
    (["--ratio", "0.5", "--criterion", "l7"], 2, "unknown criterion 'l7'"),
    ([], 2, "prune needs a target"),
])
def test_bad_options_give_a_message(capsys, net_file, args, code, message):
    got, out, err = run_main(capsys, "prune", f"{net_file}:build", *args)
    assert got == code, err
    assert message in err and "Traceback" not in err
    assert out == ""


def test_both_targets_are_refused(capsys, net_file):
    with pytest.raises(SystemExit) as e:
        run_main(capsys, "prune", f"{net_file}:build", "--ratio", "0.5", "--flops-target", "0.5")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_unknown_config_key_is_named(capsys, tmp_path, net_file):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"ratio": 0.5, "flops_targte": 0.5}))
    code, _, err = run_main(capsys, "prune", f"{net_file}:build", "--config", str(cfg))
    assert code == 2
    assert "unknown key 'flops_targte'" in err and "flops_target" in err and "round_to" in err


@pytest.mark.parametrize("cfg, message", [
    ({"ratio": 2}, "'ratio' in {cfg} must be in [0, 1)"),
    ({"ratio": "abc"}, "config key 'ratio' in {cfg}: expected a number"),
    ({"round_to": 2.5}, "config key 'round_to' in {cfg}: expected an integer"),
    ({"ignore": [1, 2]}, "config key 'ignore' in {cfg}: expected a name or a list of names"),
    ({"global": "yes"}, "config key 'global' in {cfg}: expected true or false"),
    ({"ratio": 0.5, "flops_target": 0.5}, "give either 'ratio' or 'flops_target', not both"),
])
def test_bad_config_values_are_named(capsys, tmp_path, net_file, cfg, message):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    code, _, err = run_main(capsys, "prune", f"{net_file}:build", "--config", str(path))
    assert code == 2 and message.format(cfg=path) in err, err


def test_yaml_config_needs_pyyaml_or_says_so(capsys, tmp_path, net_file, monkeypatch):
    path = tmp_path / "cfg.yaml"
    path.write_text("ratio: 0.5\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails
    code, _, err = run_main(capsys, "prune", f"{net_file}:build", "--config", str(path))
    assert code == 2 and "pip install pyyaml" in err


@pytest.mark.parametrize("spec, message", [
    ("resnet18", "did you mean timm:resnet18"),
    ("model.onnx", "cannot tell what model"),
    ("timm:", "nothing after 'timm:'"),
])
def test_unknown_model_form_lists_the_forms(capsys, spec, message):
    code, _, err = run_main(capsys, "analyze", spec)
    assert code == 2 and message in err
    for form in ("timm:NAME", "torchvision:NAME", "hf:", "file.py:fn"):
        assert form in err


def test_model_that_fails_to_build(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def build():\n    raise RuntimeError('no weights here')\n")
    code, _, err = run_main(capsys, "analyze", f"{bad}:build")
    assert code == 1 and "could not build" in err and "no weights here" in err
    code, _, err = run_main(capsys, "analyze", f"{bad}:missing")
    assert code == 1 and "has no function 'missing'" in err and "build" in err


def test_plot_writes_pngs_or_says_how_to_install(tmp_path, net_file):
    try:
        import matplotlib  # noqa: F401
        have = True
    except ImportError:
        have = False
    out = tmp_path / "plots"
    p = cli("prune", f"{net_file}:build", "--input-shape", "1,3,8,8", "--ratio", "0.5", "--plot", str(out), ok=have)
    if not have:
        assert p.returncode == 2 and "pip install 'prunekit[viz]'" in p.stderr
        assert not out.exists()
        return
    for name in ("widths.png", "scores.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_file_model_returning_its_inputs_and_a_data_criterion(net_file):
    p = cli("prune", f"{net_file}:build_with_inputs", "--ratio", "0.5", "--criterion", "taylor")
    assert "input float32[2, 3, 8, 8]" in p.stdout
    assert "conv2: Conv2d(32, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1)) => " \
           "Conv2d(16, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))" in p.stdout
    assert "criterion taylor" in p.stdout and "RANDOM" in p.stderr  # data criteria are a smoke run here
