"""timm models: a representative model per timm module family (CI), every model with ``-m slow``."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from ._common import prune_and_check  # noqa: E402

CI_MODELS = ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "mobilenetv3_small_050", "efficientnet_b0",
             "swin_tiny_patch4_window7_224", "regnetx_002", "densenet121", "deit_tiny_patch16_224",
             "ghostnet_100", "mixer_b16_224", "poolformer_s12", "dla34", "repvgg_a0", "hrnet_w18_small"]


def _small_input(name: str, cap: int | None = 224) -> torch.Tensor:
    cfg = timm.get_pretrained_cfg(name, allow_unregistered=True) if hasattr(timm, "get_pretrained_cfg") else None
    size = getattr(cfg, "input_size", (3, 224, 224)) if cfg is not None else (3, 224, 224)
    c, h, w = size
    if cap is not None:
        h, w = min(h, cap), min(w, cap)
    return torch.randn(1, c, h, w)


def _check(name: str):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = _small_input(name)
    try:
        with torch.no_grad():
            model(x)
    except Exception:  # a model with a fixed image size (e.g. aimv2 *_336): use its own input size
        x = _small_input(name, cap=None)
    graph, _ = prune_and_check(model, x, factory=lambda: timm.create_model(name, pretrained=False))
    assert graph.groups
    return graph


@pytest.mark.parametrize("name", CI_MODELS)
def test_timm_family_representative(name):
    if name not in timm.list_models():
        pytest.skip(f"{name} not in this timm version")
    _check(name)


def _all_small_models():
    try:
        return [n for n in timm.list_models() if not any(k in n for k in ("giant", "gigantic", "huge", "large",
                                                                          "xxl", "_448", "_512", "_384"))]
    except Exception:  # pragma: no cover
        return []


@pytest.mark.slow
@pytest.mark.parametrize("name", _all_small_models())
def test_timm_all(name):
    _check(name)
