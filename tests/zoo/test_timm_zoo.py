"""timm models: a representative model per timm module family (CI), every model with ``-m slow``."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from ._common import assert_share_floor, prune_and_check  # noqa: E402

CI_MODELS = ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "mobilenetv3_small_050", "efficientnet_b0",
             "swin_tiny_patch4_window7_224", "regnetx_002", "densenet121", "deit_tiny_patch16_224",
             "ghostnet_100", "mixer_b16_224", "poolformer_s12", "dla34", "repvgg_a0", "hrnet_w18_small"]


# graph.prunable_proportion (share of the model's FLOPs in prunable groups) measured on the current code (torch
# 2.14.1, timm in the project venv, 224 px input capped as in _small_input): every CI model, the first 155
# models of the slow sweep in list order (analysis on a meta-built model, the same as on a real one where
# both were run), and the family representatives of benchmarks/results/coverage.json.  A model may not fall
# below its figure by more than MARGIN: with every group pinned, or a family's stage pinned by a new op, the
# test fails.  Models not listed (not measured yet) must still have some prunable FLOPs.
PRUNABLE_FLOPS = {
    "aimv2_1b_patch14_224": 0.9988, "aimv2_1b_patch14_336": 0.9988, "aimv2_3b_patch14_224": 0.9992,
    "aimv2_3b_patch14_336": 0.9992, "beit3_base_patch16_224": 0.9999, "beit_base_patch16_224": 0.6349,
    "beitv2_base_patch16_224": 0.6349, "botnet26t_256": 0.9637, "botnet50ts_256": 0.9265, "caformer_b36": 0.7865,
    "caformer_m36": 0.7796, "caformer_s18": 0.7126, "caformer_s36": 0.7333, "cait_s24_224": 0.6059,
    "cait_xxs24_224": 0.558, "cait_xxs36_224": 0.5623, "coat_lite_medium": 0.6293, "coat_lite_mini": 0.6812,
    "coat_lite_small": 0.6897, "coat_lite_tiny": 0.6984, "coat_mini": 0.2846, "coat_small": 0.2269,
    "coat_tiny": 0.3564, "coatnet_0_224": 0.9654, "coatnet_0_rw_224": 0.9249, "coatnet_1_224": 0.9508,
    "coatnet_1_rw_224": 0.9325, "coatnet_2_224": 0.9655, "coatnet_2_rw_224": 0.9483, "coatnet_3_224": 0.9767,
    "coatnet_3_rw_224": 0.9593, "coatnet_4_224": 0.973, "coatnet_5_224": 0.9807, "coatnet_bn_0_rw_224": 0.957,
    "coatnet_nano_cc_224": 0.9059, "coatnet_nano_rw_224": 0.9052, "coatnet_pico_rw_224": 0.925,
    "coatnet_rmlp_0_rw_224": 0.9294, "coatnet_rmlp_1_rw2_224": 0.9331, "coatnet_rmlp_1_rw_224": 0.9309,
    "coatnet_rmlp_2_rw_224": 0.9486, "coatnet_rmlp_3_rw_224": 0.96, "coatnet_rmlp_nano_rw_224": 0.9129,
    "coatnext_nano_rw_224": 0.908, "convformer_b36": 0.9919, "convformer_m36": 0.9918, "convformer_s18": 0.9806,
    "convformer_s36": 0.9896, "convit_base": 0.6343, "convit_small": 0.6112, "convit_tiny": 0.5536,
    "convmixer_1024_20_ks9_p14": 0.9999, "convmixer_1536_20": 1.0, "convmixer_768_32": 0.9999,
    "convnext_atto": 0.9989, "convnext_atto_ols": 0.9985, "convnext_atto_rms": 0.9989, "convnext_base": 0.9994,
    "convnext_femto": 0.9992, "convnext_femto_ols": 0.999, "convnext_nano": 0.9997, "convnext_nano_ols": 0.9997,
    "convnext_pico": 0.9995, "convnext_pico_ols": 0.9994, "convnext_small": 0.9991, "convnext_tiny": 0.9983,
    "convnext_tiny_hnf": 0.9983, "convnext_zepto_rms": 0.998, "convnext_zepto_rms_ols": 0.9976,
    "convnextv2_atto": 0.9989, "convnextv2_base": 0.9994, "convnextv2_femto": 0.9992, "convnextv2_nano": 0.9997,
    "convnextv2_pico": 0.9995, "convnextv2_small": 0.9991, "convnextv2_tiny": 0.9983,
    "cpubone_b0_bfrobust": 0.9971, "cpubone_b1_bfrobust": 0.9973, "cpubone_b1_dwnorm": 0.9973,
    "cpubone_b2_bfrobust": 0.9981, "cpubone_b2pt5_dwnorm": 0.9988, "cpubone_b3": 0.9994, "cpubone_nano": 0.9962,
    "cpubone_s0": 0.9973, "cpubone_t0": 0.9967, "crossvit_15_240": 0.9365, "crossvit_15_dagger_240": 0.9543,
    "crossvit_15_dagger_408": 0.9617, "crossvit_18_240": 0.9466, "crossvit_18_dagger_240": 0.96,
    "crossvit_18_dagger_408": 0.9658, "crossvit_9_240": 0.8996, "crossvit_9_dagger_240": 0.9363,
    "crossvit_base_240": 0.9405, "crossvit_small_240": 0.9348, "crossvit_tiny_240": 0.9246,
    "cs3darknet_focus_l": 0.9943, "cs3darknet_focus_m": 0.9926, "cs3darknet_focus_s": 0.989,
    "cs3darknet_focus_x": 0.9955, "cs3darknet_l": 0.9948, "cs3darknet_m": 0.9935, "cs3darknet_s": 0.9911,
    "cs3darknet_x": 0.9959, "cs3edgenet_x": 0.997, "cs3se_edgenet_x": 0.997, "cs3sedarknet_l": 0.9948,
    "cs3sedarknet_x": 0.9959, "cs3sedarknet_xdw": 0.9975, "csatv2": 0.9871, "csatv2_21m": 0.9937,
    "cspdarknet53": 0.9937, "cspnext_l": 0.9997, "cspnext_m": 0.9995, "cspnext_s": 0.9988, "cspnext_tiny": 0.9977,
    "cspnext_x": 0.9998, "cspresnet50": 0.9972, "cspresnet50d": 0.9977, "cspresnet50w": 0.9978,
    "cspresnext50": 0.9968, "darknet17": 0.9993, "darknet21": 0.9994, "darknet53": 0.9998, "darknetaa53": 0.9997,
    "davit_base": 0.6371, "davit_base_fl": 0.4719, "davit_small": 0.632, "davit_tiny": 0.613,
    "deepseek_vit_412m": 0.6459, "deepseek_vit_412m_align": 0.6542, "deepseek_vit_412m_enc": 0.6542,
    "deit3_base_patch16_224": 0.9999, "deit3_medium_patch16_224": 0.9999, "deit3_small_patch16_224": 0.9998,
    "deit_base_distilled_patch16_224": 0.9999, "deit_base_patch16_224": 0.9999,
    "deit_small_distilled_patch16_224": 0.9998, "deit_small_patch16_224": 0.9998,
    "deit_tiny_distilled_patch16_224": 0.9991, "deit_tiny_patch16_224": 0.9991, "densenet121": 0.9992,
    "densenet161": 0.9997, "dla34": 0.9973, "dla46x_c": 0.9848, "dpn48b": 0.9855, "edgenext_xx_small": 0.8132,
    "efficientformer_l1": 0.9994, "efficientformerv2_s0": 0.9986, "efficientnet_b0": 0.9984,
    "efficientvim_m1": 0.8511, "efficientvit_b0": 0.9207, "efficientvit_m0": 0.8613,
    "ese_vovnet19b_slim_dw": 0.9984, "fasternet_t0": 0.8859, "fastvit_t8": 0.9981, "focalnet_tiny_srf": 0.8696,
    "gcvit_xxtiny": 0.5266, "gemma4_vit_167m": 0.8844, "ghostnet_050": 0.9641, "ghostnet_100": 0.9892,
    "gmlp_ti16_224": 0.999, "halonet_h1": 0.7076, "hardcorenas_b": 0.9969, "hgnetv2_b0": 0.9979,
    "hiera_tiny_224": 0.9614, "hrnet_w18_small": 0.9994, "iformer_t": 0.9967, "inception_next_atto": 0.9178,
    "inception_resnet_v2": 0.9998, "inception_v3": 0.9997, "inception_v4": 0.9999, "lcnetv2_small": 0.998,
    "legacy_seresnet18": 0.9989, "legacy_xception": 0.9998, "levit_128s": 0.9824, "lowformer_b0": 0.9983,
    "mambaout_femto": 0.9471, "maxvit_pico_rw_256": 0.9227, "mixer_b16_224": 1.0, "mobilenetv2_035": 0.9901,
    "mobilenetv3_small_050": 0.9826, "mobilenetv5_base": 0.9997, "mobileone_s1": 0.9994, "mobilevit_xxs": 0.9955,
    "mvitv2_tiny": 0.9991, "naflexvit_base_patch16_parfac_gap": 0.9999, "nasnetalarge": 0.9997,
    "nest_tiny": 0.4773, "nextvit_small": 0.9241, "nf_regnet_b0": 0.9991, "pit_ti_224": 0.9954,
    "pnasnet5large": 0.9998, "poolformer_s12": 0.8707, "poolformerv2_s12": 0.9588, "pvt_v2_b0": 0.638,
    "qwen3_vit_88m": 0.635, "rdnet_tiny": 0.9997, "regnetx_002": 0.9979, "repghostnet_050": 0.9767,
    "repvgg_a0": 0.9997, "repvit_m1": 0.9993, "res2next50": 0.9751, "resnest14d": 0.9998, "resnet10t": 0.9994,
    "resnet18": 0.9989, "resnetv2_18": 0.9989, "rexnet_100": 0.9965, "sam2_hiera_tiny": 0.9996,
    "samvit_base_patch16_224": 0.9927, "selecsls42": 0.9998, "sequencer2d_s": 0.9172, "shvit_s1": 0.912,
    "skresnet18": 0.917, "starnet_s050": 0.9908, "swiftformer_xs": 0.9735, "swin_tiny_patch4_window7_224": 0.9998,
    "swinv2_cr_tiny_224": 0.6295, "swinv2_tiny_window16_256": 0.5292, "tiny_vit_5m_224": 0.9835,
    "tnt_s_legacy_patch16_224": 0.9962, "tresnet_m": 0.9982, "twins_svt_small": 0.631, "vgg11": 0.9998,
    "visformer_tiny": 0.9982, "vit_srelpos_small_patch16_224": 0.6064, "vit_tiny_patch16_224": 0.9991,
    "vit_tiny_patch16_dinov3_qkvb": 0.5541, "vit_tiny_r_s16_p8_224": 0.9956, "vitamin_small_224": 0.9997,
    "volo_d1_224": 0.6402, "xception41p": 0.9998, "xcit_nano_12_p8_224": 0.6356,
}


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
    assert_share_floor(name, graph, PRUNABLE_FLOPS)
    return graph


def test_every_ci_model_has_a_measured_share():
    assert set(CI_MODELS) <= set(PRUNABLE_FLOPS)


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
