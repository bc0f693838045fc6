"""``pk.analyze`` and ``pk.Pruner(...)`` leave the model exactly as it was.

The meta capture, the real-tensor fallback and the dry run swap a model's tensors for stand-ins.  A
forward that caches tensors as plain module attributes (ultralytics ``Detect.anchors``/``strides``,
torchvision ``AnchorGenerator.cell_anchors``, a list of tensors), creates attributes (``self.shape =
x.shape``) or mutates lists/dicts must not leave meta tensors or copies behind: the model is run before
and after analysis and the outputs must be identical, every attribute the same object on its device.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit as pk
from prunekit.capture.tape import preserved_modules

from ._common import random_plan


def _snapshot(model: nn.Module) -> dict:
    """(module name, attribute) -> (object, device/shape of each tensor it holds) for every plain attribute."""
    out = {}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules") or k.startswith("_forward") or k.startswith("_backward"):
                continue
            out[(name, k)] = (v, _tensor_facts(v))
        for k, v in list(m._parameters.items()) + list(m._buffers.items()):
            out[(name, "tensor:" + k)] = (v, _tensor_facts(v))
    return out


def _tensor_facts(v, depth=0):
    if isinstance(v, torch.Tensor):
        return ("T", str(v.device), tuple(v.shape), v._version, v.detach().clone() if not v.is_meta else None)
    if depth < 4 and isinstance(v, (list, tuple)):
        return [_tensor_facts(y, depth + 1) for y in v]
    if depth < 4 and isinstance(v, dict):
        return {k: _tensor_facts(y, depth + 1) for k, y in v.items()}
    return None


def _same_facts(a, b) -> bool:
    if isinstance(a, tuple) and a and a[0] == "T":
        return (isinstance(b, tuple) and b[:4] == a[:4]
                and (a[4] is None or (b[4] is not None and torch.equal(a[4], b[4]))))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same_facts(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_facts(a[k], b[k]) for k in a)
    return a == b


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after.keys() == before.keys(), f"attributes added/removed: {sorted(set(after) ^ set(before))[:6]}"
    for key, (obj, facts) in before.items():
        obj2, facts2 = after[key]
        assert obj2 is obj, f"{key} is another object after analysis"
        assert _same_facts(facts, _tensor_facts(obj2)), f"{key}: tensors changed (device, shape, values)"


def _equal_outputs(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.device == b.device and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_outputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_outputs(x, y) for x, y in zip(a, b))
    return a == b


def _run(model, x, forward_fn=None):
    with torch.no_grad():
        return forward_fn(model, x) if forward_fn else model(x)


def check_untouched(model: nn.Module, x, forward_fn=None, warm: bool = True, pruner: bool = True):
    """Run (optionally), analyse, construct a Pruner, run again: the outputs and every attribute are unchanged."""
    model.eval()
    ref = _run(model, x, forward_fn) if warm else None
    before = _snapshot(model)
    graph = pk.analyze(model, x, forward_fn=forward_fn)
    assert_unchanged(model, before)
    if pruner:
        pk.Pruner(model, x, forward_fn=forward_fn, target=0.3)
        assert_unchanged(model, before)
    out = _run(model, x, forward_fn)
    if ref is not None:
        assert _equal_outputs(ref, out), "the model's output changed after pk.analyze"
    else:  # a fresh model caches on its first real forward; a second forward must give the same
        assert _equal_outputs(out, _run(model, x, forward_fn))
    return graph


# ---------------------------------------------------------------- hand-written modules that cache tensors

def make_anchors(h: int, w: int, stride: float, device, dtype):
    sy, sx = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) + 0.5,
                            torch.arange(w, device=device, dtype=dtype) + 0.5, indexing="ij")
    pts = torch.stack((sx, sy), -1).view(-1, 2)
    return pts, torch.full((h * w, 1), stride, dtype=dtype, device=device)


class DetectLike(nn.Module):
    """The ultralytics ``Detect`` pattern: anchors/strides made on the first call (or when the input shape
    changes) and stored as plain attributes next to the cached shape."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 2, 1)
        self.body = nn.Conv2d(c, c, 3, 1, 1)
        self.head = nn.Conv2d(c, 4, 1)
        self.shape = None
        self.anchors = torch.empty(0)
        self.strides = torch.empty(0)

    def forward(self, x):
        y = self.head(torch.relu(self.body(torch.relu(self.stem(x)))))
        b, _, h, w = y.shape
        shape = y.shape
        if self.shape != shape:
            self.anchors, self.strides = (t.transpose(0, 1) for t in make_anchors(h, w, 2.0, y.device, y.dtype))
            self.shape = shape
        box = y.view(b, 4, -1)
        return torch.cat((box[:, :2] * self.strides + self.anchors, box[:, 2:].exp() * self.strides), 1)


class CellAnchorsLike(nn.Module):
    """torchvision ``AnchorGenerator``: a list of tensors reassigned (``.to(device)``) on every forward, plus a
    dict cache filled lazily, plus a counter and a tensor mutated in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.head = nn.Conv2d(8, 4, 1)
        self.cell_anchors = [torch.tensor([[-1.0, -1.0, 1.0, 1.0]]), torch.tensor([[-2.0, -2.0, 2.0, 2.0]])]
        self._cache = {}
        self.calls = 0
        self.seen = torch.zeros(1)

    def forward(self, x):
        self.cell_anchors = [a.to(dtype=x.dtype, device=x.device) for a in self.cell_anchors]
        y = self.head(torch.relu(self.conv(x)))
        key = tuple(y.shape[-2:])
        if key not in self._cache:
            self._cache[key] = torch.ones(key, device=x.device)
        self.calls += 1
        self.seen.add_(1)
        return y * self._cache[key] + self.cell_anchors[0].view(1, 4, 1, 1) + self.cell_anchors[1].sum()


class NeedsValuesCache(nn.Module):
    """Caches a tensor on the first call and reads a value (``.item()``): captured with real tensors."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.head = nn.Conv2d(8, 2, 1)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if not hasattr(self, "grid"):
            self.grid = torch.linspace(0, 1, y.shape[-1], device=y.device)
        self.count += 1  # an in-place update of a buffer: must not reach the user's buffer
        if float(y.mean().item()) > -1e9:
            y = y * self.grid
        return self.head(y)


class FailsLate(nn.Module):
    """Caches an attribute and then fails on every device: the error path must restore too."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.cache = [torch.ones(2)]

    def forward(self, x):
        self.cache.append(torch.zeros(3, device=x.device))
        self.made = x.shape
        y = self.conv(x)
        return y.view(7, -1, 13)  # never valid for the example input


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after-a-forward"])
@pytest.mark.parametrize("cls", [DetectLike, CellAnchorsLike, NeedsValuesCache])
def test_cached_attributes_come_back(cls, warm):
    torch.manual_seed(0)
    model = cls()
    check_untouched(model, torch.randn(1, 3, 16, 16), warm=warm)


def test_detect_like_after_a_forward_is_captured_on_meta_and_validated():
    """After one real forward ``DetectLike`` holds real anchors; the meta capture swaps them for meta stand-ins
    (it used to fail on the device mix and fall back), and a plan over every prunable group applies."""
    torch.manual_seed(0)
    model = DetectLike().eval()
    x = torch.randn(1, 3, 16, 16)
    ref = _run(model, x)
    graph = pk.analyze(model, x)
    assert graph.tape.device == "meta" and graph.validation_backend == "meta"
    assert _equal_outputs(ref, _run(model, x))
    assert graph.prunable_groups
    pk.prune(model, graph, random_plan(graph))
    assert _run(model, x).shape == ref.shape


def test_error_path_restores():
    model = FailsLate()
    before = _snapshot(model)
    with pytest.raises(pk.CaptureError):
        pk.analyze(model, torch.randn(1, 3, 8, 8))
    assert_unchanged(model, before)
    assert len(model.cache) == 1 and not hasattr(model, "made")


def test_preserved_modules_restores_everything_the_body_does():
    """Unit test of the guard: reassigned/created attributes, mutated lists and dicts, new buffers/submodules."""
    model = CellAnchorsLike()
    anchors, cache = model.cell_anchors, model._cache
    first = anchors[0]
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with preserved_modules(model, lambda t: torch.empty_like(t, device="meta")):
            assert model.cell_anchors[0].is_meta and model.seen.is_meta  # swapped in place
            model.cell_anchors.append(torch.ones(1))
            model._cache["x"] = 1
            model.calls = 5
            model.new_attr = torch.ones(1)
            model.register_buffer("extra", torch.ones(1))
            model.extra_mod = nn.ReLU()
            raise RuntimeError("boom")
    assert model.cell_anchors is anchors and model._cache is cache and anchors[0] is first
    assert not hasattr(model, "extra") and not hasattr(model, "extra_mod") and not hasattr(model, "new_attr")
    assert_unchanged(model, before)


def test_lstm_flat_weights_are_the_parameters_again():
    model = nn.LSTM(4, 6, batch_first=True)
    x = torch.randn(2, 3, 4)
    ref = model(x)[0]
    pk.analyze(model, x, forward_fn=lambda m, i: m(i)[0])
    assert all(a is b for a, b in zip(model._flat_weights, [getattr(model, n) for n in model._flat_weights_names]))
    assert torch.equal(model(x)[0], ref)


# ---------------------------------------------------------------- torchvision detection models

tv = pytest.importorskip("torchvision")


def _detector(name: str):
    torch.manual_seed(0)
    kw = {"weights": None, "weights_backbone": None}
    if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn", "retinanet", "fcos")):
        kw.update(min_size=320, max_size=320)
    return tv.models.get_model(name, **kw).eval()


def _images():
    torch.manual_seed(1)
    return [torch.rand(3, 320, 320)]


def _detect(model, images):
    return model(images)


DETECTORS_FAST = ["fasterrcnn_mobilenet_v3_large_320_fpn"]
DETECTORS_SLOW = ["retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn",
                  "keypointrcnn_resnet50_fpn"]


def _check_detector(name):
    model = _detector(name)
    x = _images()
    graph = check_untouched(model, x, forward_fn=_detect, pruner=name in DETECTORS_FAST)
    anchor_gen = getattr(getattr(model, "rpn", None) or getattr(model, "anchor_generator", None) or model,
                         "anchor_generator", None)
    if anchor_gen is not None and hasattr(anchor_gen, "cell_anchors"):
        assert all(a.device.type == "cpu" for a in anchor_gen.cell_anchors)
    return graph


@pytest.mark.parametrize("name", DETECTORS_FAST)
def test_torchvision_detector_runs_after_analysis(name):
    _check_detector(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", DETECTORS_SLOW)
def test_torchvision_detector_runs_after_analysis_slow(name):
    _check_detector(name)
