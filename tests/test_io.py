"""prunekit.io: save/load round trips (safetensors and torch.save), corruption and wrong-model errors that leave
the model untouched, load_state_dict_pruned (shape inference per group), export to torch.export and ONNX."""
from __future__ import annotations

import copy
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.io import CheckpointError, ExportError, read_checkpoint
from prunekit.io import checkpoint as ckpt_mod

torchvision = pytest.importorskip("torchvision")
X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
SUFFIXES = [".safetensors", ".pt"]


# ---------------------------------------------------------------- models and helpers
class Tied(nn.Module):
    """Tiny language-model-like net whose output head shares the embedding matrix."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(self.norm(h))


class TiedTwin(Tied):
    """Same layout as Tied under another class name."""


IDS = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))


def resnet18() -> nn.Module:
    return torchvision.models.resnet18().eval()


def prune_step(model: nn.Module, x, frac: float, start: int = 0) -> nn.Module:
    """Remove ``frac`` of every prunable group (at least one unit), starting at unit ``start``."""
    g = pk.analyze(model, x)
    plan = {gr.id: list(range(start, start + max(1, int(gr.size * frac))))
            for gr in g.groups if gr.prunable and gr.size > start + 2}
    assert plan
    return pk.prune(model, g, plan)


@pytest.fixture(scope="module")
def pruned():
    """resnet18 after one pruning step and after two (independent copies)."""
    torch.manual_seed(0)
    m = prune_step(resnet18(), X, 0.25)
    one = copy.deepcopy(m)
    two = prune_step(m, X, 0.1, start=1)
    return one, two


@pytest.fixture()
def tied_pruned():
    torch.manual_seed(0)
    m = Tied()
    g = pk.analyze(m, IDS)
    return pk.prune(m, g, {gr.id: [0, 3, 5] for gr in g.groups if gr.prunable})


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "attrs": {n: dict(vars(mod)) for n, mod in model.named_modules()}}


def assert_untouched(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert list(state) == list(snap["state"])
    for k, v in snap["state"].items():
        assert state[k].shape == v.shape and torch.equal(state[k], v), k
    assert not getattr(model, "_prunekit_record", None)
    for n, mod in model.named_modules():
        plain = {k: v for k, v in vars(mod).items() if not k.startswith("_")}
        assert plain == {k: v for k, v in snap["attrs"][n].items() if not k.startswith("_")}, n


def out(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ---------------------------------------------------------------- save / load round trips
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("steps", [1, 2])
def test_roundtrip_bit_identical(pruned, tmp_path, suffix, steps):
    model = pruned[steps - 1]
    path = pk.save(model, tmp_path / f"m{suffix}", extra={"epoch": 7})
    assert path == tmp_path / f"m{suffix}" and path.is_file()
    assert ckpt_mod._sniff(path) == ("safetensors" if suffix == ".safetensors" else "torch")
    loaded = pk.load(path, resnet18)  # zero-arg builder
    assert torch.equal(out(loaded, X), out(model, X))
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    assert loaded.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels < 64
    assert len(loaded._prunekit_record) == steps
    meta = read_checkpoint(path).meta
    assert meta["extra"] == {"epoch": 7} and meta["model_class"] == "ResNet"
    assert meta["prunekit_version"] == pk.__version__ and meta["torch_version"] == str(torch.__version__)


def test_loaded_model_can_be_pruned_and_saved_again(tied_pruned, tmp_path):
    loaded = pk.load(pk.save(tied_pruned, tmp_path / "a.safetensors"), Tied())  # a model instance
    g = pk.analyze(loaded, IDS)
    pk.prune(loaded, g, {gr.id: [1] for gr in g.groups if gr.prunable})
    again = pk.load(pk.save(loaded, tmp_path / "b.safetensors"), Tied)
    assert len(again._prunekit_record) == 2 and again.fc1.weight.shape == (28, 12)
    assert torch.equal(out(again, IDS), out(loaded, IDS))


def test_unpruned_model_roundtrip(tmp_path):
    torch.manual_seed(3)
    m = Tied()
    path = pk.save(m, tmp_path / "plain.safetensors")
    assert read_checkpoint(path).record == []
    loaded = pk.load(path, Tied)
    assert torch.equal(out(loaded, IDS), out(m, IDS))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_tied_weights_stored_once_and_retied(tied_pruned, tmp_path, suffix):
    path = pk.save(tied_pruned, tmp_path / f"t{suffix}")
    meta = read_checkpoint(path).meta
    assert meta["aliases"] in ({"head.weight": "emb.weight"}, {"emb.weight": "head.weight"})
    assert len(meta["sha256"]) == len(tied_pruned.state_dict()) - 1
    loaded = pk.load(path, Tied)
    assert loaded.head.weight is loaded.emb.weight
    assert loaded.emb.weight.shape == (50, 13)
    assert torch.equal(out(loaded, IDS), out(tied_pruned, IDS))


def test_vit_heads_roundtrip(tmp_path):
    timm = pytest.importorskip("timm")

    def vit():
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, pretrained=False).eval()

    torch.manual_seed(0)
    v = vit()
    g = pk.analyze(v, X)
    heads = [gr.id for gr in g.groups if gr.unit == "head" and gr.prunable]
    mlp = [gr.id for gr in g.groups if "blocks.1.mlp.fc1" in gr.modules and gr.prunable]
    pk.prune(v, g, {heads[0]: [1], mlp[0]: list(range(100))})
    loaded = pk.load(pk.save(v, tmp_path / "vit.safetensors"), vit)
    assert loaded.blocks[0].attn.num_heads == 2
    assert torch.equal(out(loaded, X), out(v, X))
    # without the record: one head of three is the only explanation of the shapes
    fresh = vit()
    res = pk.load_state_dict_pruned(fresh, v.state_dict(), example_inputs=X)
    assert res == ([], []) and fresh.blocks[0].attn.num_heads == 2
    assert torch.equal(out(fresh, X), out(v, X))


def test_masked_model_saves_current_weights(tmp_path):
    torch.manual_seed(0)
    m = Tied()
    g = pk.analyze(m, IDS)
    gid = next(gr.id for gr in g.groups if gr.prunable and gr.size == 32)  # fc1 outputs
    pk.mask(m, g, {gid: [0, 1]})
    path = pk.save(m, tmp_path / "masked.safetensors")
    assert "fc1.weight" in read_checkpoint(path).meta["masked"]
    loaded = pk.load(path, Tied)
    assert torch.all(loaded.fc1.weight[:2] == 0) and loaded.fc1.weight.shape == (32, 16)
    assert torch.equal(out(loaded, IDS), out(m, IDS))


def test_extra_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        pk.save(Tied(), tmp_path / "x.safetensors", extra={"bad": object()})
    assert not list(tmp_path.iterdir())


def test_torch_fallback_without_safetensors(tied_pruned, tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod, "_safetensors", lambda: None)
    path = pk.save(tied_pruned, tmp_path / "t.safetensors")
    assert path == tmp_path / "t.pt" and ckpt_mod._sniff(path) == "torch"
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"state_dict", "prunekit_record", "meta"}
    assert torch.equal(out(pk.load(path, Tied), IDS), out(tied_pruned, IDS))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_atomic_write_keeps_old_file(tied_pruned, tmp_path, monkeypatch, suffix):
    path = pk.save(Tied(), tmp_path / f"t{suffix}")
    before = path.read_bytes()

    def crash(*a, **k):
        Path(a[1]).write_bytes(b"half a file")
        raise OSError("disk full")
    if suffix == ".pt":
        monkeypatch.setattr(torch, "save", crash)
    else:
        monkeypatch.setattr(ckpt_mod._safetensors(), "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        pk.save(tied_pruned, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# ---------------------------------------------------------------- errors leave the model untouched
def _data_offset_safetensors(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def _data_offset_torch(path: Path) -> tuple[int, int]:
    """(start, size) of the largest stored tensor record inside a torch.save zip."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _flip_data(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    if ckpt_mod._sniff(path) == "safetensors":
        start = _data_offset_safetensors(bytes(raw))
        pos = (start + len(raw)) // 2
    else:
        start, size = _data_offset_torch(path)
        pos = start + size // 2
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))


def _edit_record(path: Path) -> None:
    """Change one digit of a removed index inside the stored record (still valid JSON / pickle)."""
    raw = bytearray(path.read_bytes())
    pos = raw.find(b'"remove"')
    if pos < 0:  # torch.save pickles the record: strings are stored bare
        pos = raw.find(b"remove")
    assert pos > 0
    digit = next(i for i in range(pos, len(raw)) if chr(raw[i]).isdigit() and raw[i] != ord("9"))
    raw[digit] += 1
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("damage", ["flip_data", "truncate", "edit_record", "empty"])
def test_corrupt_file_raises_and_leaves_model(tied_pruned, tmp_path, suffix, damage):
    path = pk.save(tied_pruned, tmp_path / f"m{suffix}")
    if damage == "flip_data":
        _flip_data(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    elif damage == "edit_record" and suffix == ".pt":  # the record is pickled: change it without the digest
        obj = torch.load(path, weights_only=True)
        obj["prunekit_record"][0]["params"]["fc1.weight"]["remove"]["0"][0] += 1
        torch.save(obj, path)
    elif damage == "edit_record":
        _edit_record(path)
    else:
        path.write_bytes(b"")
    fresh = Tied()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        pk.load(path, fresh)
    assert str(path) in str(ei.value)
    assert_untouched(fresh, snap)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        pk.load(tmp_path / "nope.safetensors", resnet18)
    assert isinstance(CheckpointError("x"), ValueError)


def test_record_for_other_width_is_rejected(tied_pruned, tmp_path):
    path = pk.save(tied_pruned, tmp_path / "t.safetensors")
    wide = Tied(hidden=40)
    snap = snapshot(wide)
    with pytest.raises(CheckpointError, match=r"fc1\.weight has shape \(40, 16\).*different model") as ei:
        pk.load(path, wide)
    assert str(path) in str(ei.value)
    assert_untouched(wide, snap)


def test_resnet18_checkpoint_into_resnet34_is_rejected(pruned, tmp_path):
    """Same class, same widths, so the record replays; the extra blocks make the keys disagree."""
    path = pk.save(pruned[0], tmp_path / "r18.pt")
    r34 = torchvision.models.resnet34()
    snap = snapshot(r34)
    with pytest.raises(CheckpointError, match=r"keys do not match the model: missing \['layer1.2.conv1.weight'"):
        pk.load(path, r34)
    assert_untouched(r34, snap)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_resnet_record_for_other_class_is_rejected(pruned, tmp_path, suffix):
    path = pk.save(pruned[0], tmp_path / f"r18{suffix}")
    fresh = Tied()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match="saved from a ResNet, but the model is a Tied"):
        pk.load(path, fresh)
    with pytest.raises(CheckpointError, match="no parameter/buffer 'conv1.weight'.*different model"):
        pk.load(path, fresh, strict=False)
    assert_untouched(fresh, snap)


def test_state_dict_shape_conflict_after_replay(tied_pruned, tmp_path):
    """Record fits, weights do not: rejected before the record is replayed on the real model."""
    path = pk.save(tied_pruned, tmp_path / "t.pt")
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["fc2.bias"] = torch.zeros(16)
    fields = obj["meta"]
    fields["sha256"]["fc2.bias"] = ckpt_mod._digest_tensor(obj["state_dict"]["fc2.bias"])
    fields["meta_sha256"] = ckpt_mod._digest_meta(obj["prunekit_record"], fields)
    torch.save(obj, path)
    fresh = Tied()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"fc2\.bias: the model expects \(13,\).*checkpoint has \(16,\)"):
        pk.load(path, fresh)
    assert_untouched(fresh, snap)


def test_model_class_mismatch(tied_pruned, tmp_path):
    path = pk.save(tied_pruned, tmp_path / "t.safetensors")
    twin = TiedTwin()
    snap = snapshot(twin)
    with pytest.raises(CheckpointError, match="saved from a Tied, but the model is a TiedTwin"):
        pk.load(path, twin)
    assert_untouched(twin, snap)
    loaded = pk.load(path, twin, strict=False)
    assert torch.equal(out(loaded, IDS), out(tied_pruned, IDS))


def test_load_rejects_plain_state_dict(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(Tied().state_dict(), path)
    with pytest.raises(CheckpointError, match="load_state_dict_pruned"):
        pk.load(path, Tied)


# ---------------------------------------------------------------- load_state_dict_pruned
@pytest.mark.parametrize("steps", [1, 2])
def test_load_state_dict_pruned_resizes(pruned, steps):
    model = pruned[steps - 1]
    fresh = resnet18()
    res = pk.load_state_dict_pruned(fresh, model.state_dict(), example_inputs=X)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert fresh.layer2[0].bn1.num_features == model.layer2[0].bn1.num_features
    assert torch.equal(out(fresh, X), out(model, X))


@pytest.mark.parametrize("form", ["pt_model_key", "safetensors"])
def test_load_state_dict_pruned_from_file(tied_pruned, tmp_path, form):
    if form == "pt_model_key":
        path = tmp_path / "sd.pt"
        torch.save({"model": tied_pruned.state_dict(), "epoch": 3}, path)
    else:
        path = pk.save(tied_pruned, tmp_path / "sd.safetensors")
    fresh = Tied()
    pk.load_state_dict_pruned(fresh, path, example_inputs=IDS)
    assert fresh.head.weight is fresh.emb.weight
    assert torch.equal(out(fresh, IDS), out(tied_pruned, IDS))


def test_load_state_dict_pruned_keys(tied_pruned):
    sd = dict(tied_pruned.state_dict())
    sd["extra.weight"] = torch.zeros(3)
    del sd["norm.bias"]
    fresh = Tied()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"missing \['norm.bias'\], unexpected \['extra.weight'\]"):
        pk.load_state_dict_pruned(fresh, sd, example_inputs=IDS)
    assert_untouched(fresh, snap)
    res = pk.load_state_dict_pruned(fresh, sd, example_inputs=IDS, strict=False)
    assert res.missing_keys == ["norm.bias"] and res.unexpected_keys == ["extra.weight"]
    assert fresh.fc1.weight.shape == (29, 13)


def test_load_state_dict_pruned_plain_when_shapes_match():
    src, dst = Tied(), Tied()
    res = pk.load_state_dict_pruned(dst, src.state_dict())  # no example_inputs needed
    assert tuple(res) == ([], []) and not hasattr(dst, "_prunekit_record")
    assert torch.equal(out(dst, IDS), out(src, IDS))


def test_load_state_dict_pruned_needs_example_inputs(tied_pruned):
    fresh = Tied()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError,
                       match=r"fc1\.weight \(model \(32, 16\), checkpoint \(29, 13\)\).*example_inputs"):
        pk.load_state_dict_pruned(fresh, tied_pruned.state_dict())
    assert_untouched(fresh, snap)


def test_load_state_dict_pruned_conflicting_members(tied_pruned):
    sd = dict(tied_pruned.state_dict())
    sd["fc1.bias"] = torch.zeros(30)  # fc1.weight says 3 hidden units went, fc1.bias says 2
    fresh = Tied()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"fc1\.(weight|bias) dim 0 .*fc1\.(weight|bias) dim 0"):
        pk.load_state_dict_pruned(fresh, sd, example_inputs=IDS)
    assert_untouched(fresh, snap)


def test_load_state_dict_pruned_unexplained_shape(pruned):
    sd = dict(pruned[0].state_dict())
    sd["fc.weight"] = sd["fc.weight"][:10]  # classes are the model output: no group may shrink them
    sd["fc.bias"] = sd["fc.bias"][:10]
    fresh = resnet18()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"fc\.(weight|bias) dim 0 \(model 1000, checkpoint 10\).*cannot be "
                                              r"pruned in this model: model output"):
        pk.load_state_dict_pruned(fresh, sd, example_inputs=X)
    assert_untouched(fresh, snap)


def test_load_state_dict_pruned_dim_no_group_covers(tied_pruned):
    sd = dict(tied_pruned.state_dict())
    sd["fc1.weight"] = sd["fc1.weight"][None]  # an extra dim: no channel group can explain it
    fresh = Tied()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"fc1\.weight has shape \(1, 29, 13\) in the checkpoint but \(32, 16\)"
                                              r" in the model, and no channel group"):
        pk.load_state_dict_pruned(fresh, sd, example_inputs=IDS)
    assert_untouched(fresh, snap)


def test_load_state_dict_pruned_ambiguous_heads():
    timm = pytest.importorskip("timm")

    def vit():
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, pretrained=False).eval()
    v = vit()
    g = pk.analyze(v, X)
    hd = next(gr.id for gr in g.groups if gr.unit == "head_dim" and gr.prunable)
    pk.prune(v, g, {hd: list(range(32))})  # 3 heads x 32 == 2 heads x 48 in every tensor
    fresh = vit()
    snap = snapshot(fresh)
    with pytest.raises(CheckpointError, match="ambiguous.*prunekit.save"):
        pk.load_state_dict_pruned(fresh, v.state_dict(), example_inputs=X)
    assert_untouched(fresh, snap)


# ---------------------------------------------------------------- export
def test_export_torch_export_roundtrip(pruned, tmp_path):
    model = pruned[1]
    path = pk.export(model, X, tmp_path / "m.pt2")
    back = torch.export.load(str(path)).module()
    assert torch.allclose(back(X), out(model, X), rtol=1e-5, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]


def test_export_onnx(pruned, tmp_path):
    onnx = pytest.importorskip("onnx")
    model = pruned[1]
    path = pk.export(model, X, tmp_path / "m.onnx", format="onnx")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    from onnx.reference import ReferenceEvaluator
    (y,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: X.numpy()})
    assert torch.allclose(torch.from_numpy(y), out(model, X), rtol=1e-3, atol=1e-4)
    assert model.training is False


class Noisy(nn.Module):
    """A forward that does not reproduce itself: the export check must notice."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + torch.rand_like(x)


def test_export_check_failure_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="does not reproduce"):
        pk.export(Noisy(), torch.randn(2, 4), tmp_path / "n.pt2")
    assert list(tmp_path.iterdir()) == []


def test_export_unknown_format(tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format 'tflite'.*onnx"):
        pk.export(Tied(), IDS, tmp_path / "m.tflite", format="tflite")
    assert list(tmp_path.iterdir()) == []


def test_export_restores_training_mode(tmp_path):
    m = Tied().train()
    pk.export(m, IDS, tmp_path / "t.pt2")
    assert m.training and m.fc1.training


def test_json_record_keys_restored(tied_pruned, tmp_path):
    rec = read_checkpoint(pk.save(tied_pruned, tmp_path / "t.safetensors")).record
    assert all(isinstance(d, int) for info in rec[0]["params"].values() for d in info["remove"])
    assert rec[0]["groups"] == tied_pruned._prunekit_record[0]["groups"]


class _KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x, bias=None):
        return self.fc(x) + bias


def test_export_onnx_with_keyword_inputs(tmp_path):
    """Keyword example inputs reach the ONNX exporter on every supported torch (torch < 2.5 has no kwargs=)."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = _KeywordNet()
    inputs = {"x": torch.randn(2, 6), "bias": torch.randn(2, 4)}
    path = pk.export(model, inputs, tmp_path / "kw.onnx", format="onnx")  # checked against the model on export
    proto = onnx.load(str(path))
    assert len([i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]) == 2
    from onnx.reference import ReferenceEvaluator
    names = [i.name for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    got = ReferenceEvaluator(proto).run(None, dict(zip(names, [inputs["x"].numpy(), inputs["bias"].numpy()])))[0]
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(got), model(**inputs), atol=1e-5)
