"""``prunekit prune hf:DIR --calib FILE.txt [--depth K] [--bias-compensation]`` on a tiny Llama config dir."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from prunekit.cli.main import main  # noqa: E402

TEXT = ("Structured pruning removes whole channels, heads and blocks of a network. " * 60
        + "The quick brown fox jumps over the lazy dog. " * 60)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    import transformers
    d = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(TEXT)
    return p


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_flap_depth_and_width_meet_the_params_target(llama_dir, calib, capsys):
    code, out, err = run(["prune", f"hf:{llama_dir}", "--params-target", "0.7", "--criterion", "flap", "--global",
                          "--calib", str(calib), "--calib-samples", "8", "--seq-len", "64", "--depth", "1",
                          "--bias-compensation", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["depth"]["removed"] and r["depth"]["blocks_after"] == 2
    # the target counts the whole result (depth + width), against the model as loaded
    assert r["before"]["params"] > r["after"]["params"]
    assert r["after"]["params"] <= 0.7 * r["before"]["params"] * 1.02
    assert r["after"]["params"] > 0.5 * r["before"]["params"]
    c = r["calibration"]
    assert c["tokenizer"] == "byte-level" and c["samples"] == 8 and c["seq_len"] == 64
    assert c["tokens"] == len(TEXT.encode())
    p = r["perplexity"]
    assert p["held_out_windows"] >= 1 and p["before"] > 1 and p["after"] > 1 and p["before"] != p["after"]
    assert r["options"]["bias_compensation"] is True
    assert r["hf"]["config"]["num_hidden_layers"] == 2 if "num_hidden_layers" in r["hf"]["config"] else True


def test_l2_with_calib_reports_perplexity_and_text(llama_dir, calib, capsys):
    code, out, err = run(["prune", f"hf:{llama_dir}", "--ratio", "0.25", "--calib", str(calib), "--calib-samples",
                          "4", "--seq-len", "32", "-q"], capsys)
    assert code == 0, err
    assert "Perplexity (held-out" in out and "Calibration:" in out and "byte-level" in out


def test_config_file_takes_the_same_keys(llama_dir, calib, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": f"hf:{llama_dir}", "params_target": 0.8, "criterion": "wanda_sp",
                               "calib": str(calib), "calib_samples": 4, "seq_len": 32, "depth": 1}))
    code, out, err = run(["prune", "--config", str(cfg), "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["options"]["calib"] == str(calib) and r["options"]["seq_len"] == 32 and r["depth"]["removed"]
    assert r["calibration"]["samples"] == 4


def test_model_tokenizer_is_used_when_the_dir_has_one(tmp_path, calib, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    import transformers
    d = tmp_path / "tok_llama"
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["[UNK]"] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(d)
    code, out, err = run(["prune", f"hf:{d}", "--ratio", "0.25", "--calib", str(calib), "--calib-samples", "4",
                          "--seq-len", "32", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["calibration"]["tokenizer"].startswith("AutoTokenizer(")


@pytest.mark.parametrize("extra, message", [
    (["--criterion", "flap"], "--calib"),
    (["--criterion", "taylor"], "--calib"),
    (["--depth", "1"], "--calib"),
    (["--bias-compensation"], "--calib"),
    (["--calib", "MISSING"], "no such file"),
    (["--calib", "EMPTY"], "is empty"),
    (["--calib", "CALIB", "--seq-len", "100000"], "larger than the calibration text"),
    (["--calib", "CALIB", "--seq-len", "32", "--depth", "5"], "--depth 5"),
])
def test_clear_errors(llama_dir, calib, tmp_path, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    subst = {"MISSING": str(tmp_path / "nope.txt"), "EMPTY": str(empty), "CALIB": str(calib)}
    argv = ["prune", f"hf:{llama_dir}", "--params-target", "0.8", "-q", *[subst.get(a, a) for a in extra]]
    code, out, err = run(argv, capsys)
    assert code != 0
    assert message in err, err
