"""Checkpoint format detection by content: a safetensors header whose length bytes start with 0x80 (a pickle's
first byte), the zip container of torch.save, its legacy pickle format, and corrupt files."""
from __future__ import annotations

import json

import pytest
import torch

import prunekit as pk
from prunekit.io import CheckpointError, read_checkpoint
from prunekit.io import checkpoint as ckpt_mod
from tests.test_io import IDS, Tied, assert_untouched, out, snapshot

st = pytest.importorskip("safetensors.torch")


def _header_len(path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


def _pruned_tied():
    torch.manual_seed(0)
    m = Tied()
    g = pk.analyze(m, IDS)
    return pk.prune(m, g, {gr.id: [0, 3, 5] for gr in g.groups if gr.prunable})


def test_pk_save_with_header_length_low_byte_0x80_loads(tmp_path):
    """A pruned model saved with a metadata size that makes the header length start with byte 0x80."""
    m = _pruned_tied()
    path = tmp_path / "m.safetensors"
    for pad in range(0, 1200):
        pk.save(m, path, extra={"pad": "x" * pad})
        if _header_len(path) & 0xFF == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert path.read_bytes()[0] == 0x80
    assert ckpt_mod._sniff(path) == "safetensors"
    loaded = pk.load(path, Tied)
    assert torch.equal(out(loaded, IDS), out(m, IDS))


def test_plain_safetensors_header_of_128_plus_256k_bytes(tmp_path):
    """A plain safetensors file (no prunekit record) whose header is 128 + 256 * k bytes."""
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    path = tmp_path / "plain.safetensors"
    for pad in range(0, 600):
        st.save_file(tensors, str(path), metadata={"note": "y" * pad})
        if _header_len(path) % 256 == 128 and _header_len(path) > 256:
            break
    else:
        pytest.fail("no padding gave a header length of 128 + 256k")
    assert path.read_bytes()[:1] == b"\x80"
    ck = read_checkpoint(path)
    assert ck.record is None and torch.equal(ck.state_dict["w"], tensors["w"])


def test_torch_save_zip_and_legacy_are_sniffed_as_torch(tmp_path):
    sd = {"w": torch.arange(4.0)}
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert ckpt_mod._sniff(tmp_path / name) == "torch"
        assert torch.equal(read_checkpoint(tmp_path / name).state_dict["w"], sd["w"])
    # a safetensors file is safetensors even under a .pt name
    st.save_file(sd, str(tmp_path / "named.pt"))
    assert ckpt_mod._sniff(tmp_path / "named.pt") == "safetensors"


@pytest.mark.parametrize("damage", ["header_json", "header_too_long", "pickle_byte", "not_a_dict"])
def test_corrupt_files_give_a_clear_checkpoint_error(tmp_path, damage):
    path = tmp_path / "bad.safetensors"
    pk.save(_pruned_tied(), path)
    raw = bytearray(path.read_bytes())
    n = _header_len(path)
    if damage == "header_json":  # break the JSON inside the header
        raw[8 + n // 2] = ord("}")
        raw[8 + n // 2 + 1] = ord("\x00")
    elif damage == "header_too_long":  # the declared header runs past the end of the file
        raw[:8] = (len(raw) + 10).to_bytes(8, "little")
    elif damage == "pickle_byte":  # starts with a pickle's first byte but is nothing
        raw = bytearray(b"\x80\x04garbage" + bytes(40))
    else:  # valid JSON, not a safetensors header
        body = json.dumps([1, 2, 3]).encode()
        raw = bytearray(len(body).to_bytes(8, "little") + body)
    path.write_bytes(bytes(raw))
    fresh = Tied()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        pk.load(path, fresh)
    assert str(path) in str(ei.value)
    assert "Unpickl" not in str(ei.value)
    assert_untouched(fresh, snap)
