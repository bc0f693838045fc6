"""Building the model a command works on from its MODEL argument, always offline with random weights.

Forms (also listed by ``prunekit list-models``):

* ``timm:NAME``                 ``timm.create_model(NAME, pretrained=False)``
* ``torchvision:NAME``          ``torchvision.models.get_model(NAME, weights=None)``
* ``hf:DIR`` / ``hf:FILE.json``  a local transformers config: the class it names, else the type's causal-LM
  (or masked-LM, else base) class, random weights (a directory with weights loads them)
* ``hf:TYPE[,key=value...]``    ``AutoConfig.for_model(TYPE)`` shrunk to a tiny preset (2 layers, hidden
                                size 128, 4 heads, vocab 1000), then the ``key=value`` overrides
* ``ultralytics:CFG.yaml``      an ultralytics YOLO built from its yaml (``yolo11n.yaml``, ``yolov8n-seg.yaml``),
                                random weights, 1x3x320x320 input; ``--save`` also writes ultralytics' checkpoint
* ``path/to/file.py:fn``        ``fn()`` returns a model, or ``(model, example_inputs)``
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import FAILURE, USAGE, CLIError

FORMS = ("timm:NAME", "torchvision:NAME", "hf:CONFIG_DIR_OR_JSON", "hf:MODEL_TYPE[,key=value...]",
         "ultralytics:CFG.yaml", "path/to/file.py:fn")
FORMS_HELP = ("timm:NAME | torchvision:NAME | hf:CONFIG_DIR_OR_JSON | hf:MODEL_TYPE[,key=value...] | "
              "ultralytics:CFG.yaml | path/to/file.py:fn (fn returns a model or (model, example_inputs))")

# hf:MODEL_TYPE builds this tiny version of the type's default config (keys the config does not have are skipped)
HF_TINY = {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 1000, "n_layer": 2, "n_embd": 128, "n_head": 4,
           "n_inner": 256, "d_model": 128, "num_layers": 2, "d_ff": 256, "num_heads": 4, "d_kv": 32}
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)
DEFAULT_TOKEN_SHAPE = (1, 128)


@dataclass
class LoadedModel:
    model: nn.Module
    example_inputs: Any
    kind: str  # "timm" | "torchvision" | "hf" | "ultralytics" | "file"
    input_desc: str  # e.g. "float32[1, 3, 224, 224]"


def parse_shape(text: Any, where: str = "--input-shape") -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``, or a list of ints from a config file) -> a tuple of ints."""
    if isinstance(text, (list, tuple)):
        parts = list(text)
    else:  # "1,3,224,224" or "1x3x224x224"; an empty part (a stray separator) is an error below
        parts = [p.strip() for p in re.split(r"[,x]", str(text).strip())]
    try:
        shape = tuple(int(p) for p in parts if not isinstance(p, (bool, float)))
    except (TypeError, ValueError):
        shape = ()
    if not shape or len(shape) != len(parts) or any(s <= 0 for s in shape):
        raise CLIError(f"{where} must be positive integers separated by commas, like 1,3,224,224 (images) or "
                       f"1,128 (token ids), got {text!r}")
    return shape


def describe_inputs(x: Any) -> str:
    from torch.utils._pytree import tree_flatten
    flat, _ = tree_flatten(x)
    return ", ".join(f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}" for t in flat
                     if isinstance(t, torch.Tensor)) or type(x).__name__


def load_model(spec: str, input_shape: tuple[int, ...] | None) -> LoadedModel:
    """Build ``spec`` (see the module docstring) and its example inputs (random, of ``input_shape``)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("timm", "torchvision", "hf", "ultralytics"):
        if not rest:
            raise CLIError(f"model {spec!r}: nothing after '{kind}:'; use one of: {', '.join(FORMS)}")
        builder = {"timm": _timm, "torchvision": _torchvision, "hf": _hf, "ultralytics": _ultralytics}[kind]
        model, x = builder(rest, input_shape)
    else:
        path, sep, fn = spec.rpartition(":")
        if not sep or not path.endswith(".py") or not fn:
            hint = f" (did you mean timm:{spec} or torchvision:{spec}?)" if re.fullmatch(r"[\w\-]+", spec) else ""
            raise CLIError(f"cannot tell what model {spec!r} is{hint}; use one of: {', '.join(FORMS)}", USAGE)
        model, x = _from_file(Path(path), fn, input_shape)
        kind = "file"
    model.eval()
    return LoadedModel(model, x, kind, describe_inputs(x))


def _image_input(shape: tuple[int, ...] | None, default: tuple[int, ...] = DEFAULT_IMAGE_SHAPE) -> torch.Tensor:
    return torch.randn(*(shape or default))


def _timm(name: str, shape):
    try:
        import timm
    except ImportError:
        raise CLIError("timm: models need the timm package: pip install 'prunekit[timm]'", FAILURE) from None
    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise CLIError(f"timm has no model {name!r}{_unknown_hint(name, 'timm')}", FAILURE) from None
        raise
    if shape is None:  # the model's own default resolution, batch 1
        size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", DEFAULT_IMAGE_SHAPE[1:]))
        shape = (1, *size)
    return model, _image_input(shape)


def _torchvision(name: str, shape):
    try:
        import torchvision
    except ImportError:
        raise CLIError("torchvision: models need the torchvision package: pip install torchvision", FAILURE) from None
    det = name in torchvision.models.list_models(module=torchvision.models.detection)
    seg = name in torchvision.models.list_models(module=torchvision.models.segmentation)
    try:  # detection/segmentation builders default to ImageNet backbone weights: never download them
        model = torchvision.models.get_model(name, weights=None, **({"weights_backbone": None} if det or seg else {}))
    except ValueError as e:
        if "Unknown model" in str(e):
            raise CLIError(f"torchvision has no model {name!r}{_unknown_hint(name, 'torchvision')}",
                           FAILURE) from None
        raise
    if det:  # a detector takes a list of (C, H, W) images (prunekit analyses its head outputs)
        x = _image_input(shape)
        return model, [x[0]] if x.dim() == 4 else [x]
    return model, _image_input(shape)


def _ultralytics(cfg: str, shape):
    try:
        from ultralytics.nn.tasks import yaml_model_load
        from ultralytics.nn.tasks import ClassificationModel, DetectionModel, OBBModel, PoseModel, SegmentationModel
    except ImportError:
        raise CLIError("ultralytics: models need the ultralytics package (AGPL): pip install 'prunekit[ultralytics]'",
                       FAILURE) from None
    try:
        d = yaml_model_load(cfg)
    except FileNotFoundError:
        raise CLIError(f"ultralytics has no model config {cfg!r} (e.g. yolo11n.yaml, yolov8n-seg.yaml, "
                       "yolo11n-pose.yaml)", FAILURE) from None
    head = str(d["head"][-1][2])
    cls = {"Segment": SegmentationModel, "Pose": PoseModel, "OBB": OBBModel, "Classify": ClassificationModel}
    model = next((c for k, c in cls.items() if head.startswith(k)), DetectionModel)(d, verbose=False)
    return model, _image_input(shape, (1, 3, 320, 320))


def _hf(rest: str, shape):
    try:
        from transformers import AutoConfig
    except ImportError:
        raise CLIError("hf: models need the transformers package: pip install 'prunekit[hf]'", FAILURE) from None
    if not _transformers_can_use_torch():  # transformers 5 disables its PyTorch models on torch < 2.6
        import transformers
        raise CLIError(f"hf: transformers {transformers.__version__} cannot use torch {torch.__version__} (it disables "
                       "its PyTorch models); install a transformers release that supports this torch "
                       "(pip install 'transformers<5' for torch < 2.6) or upgrade torch", FAILURE)
    path = Path(rest)
    if path.is_dir():
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    elif path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise CLIError(f"hf:{rest}: no such config file", FAILURE)
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or "model_type" not in d:
            raise CLIError(f"hf:{rest}: a transformers config JSON needs a \"model_type\" key (e.g. \"llama\")",
                           FAILURE)
        config = AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        mtype, *pairs = [p.strip() for p in rest.split(",")]
        over = {}
        for p in pairs:
            k, eq, v = p.partition("=")
            if not eq or not k:
                raise CLIError(f"hf:{rest}: expected key=value after the model type, got {p!r} "
                               "(e.g. hf:llama,hidden_size=256,num_hidden_layers=4)")
            try:
                over[k] = json.loads(v)
            except ValueError:
                over[k] = v
        try:
            base = AutoConfig.for_model(mtype).to_dict()
        except ValueError:
            raise CLIError(f"hf:{mtype}: not a transformers model type (e.g. llama, bert, gpt2, mistral, qwen2) "
                           "nor an existing config directory or JSON file", FAILURE) from None
        tiny = {k: v for k, v in HF_TINY.items() if k in base}
        config = AutoConfig.for_model(mtype, **{**tiny, **over})
    model = _hf_model(config, path if path.is_dir() else None)
    vocab = int(getattr(config, "vocab_size", None) or 1000)
    return model, torch.randint(0, vocab, shape or DEFAULT_TOKEN_SHAPE)


def _hf_model(config, directory: Path | None):
    """The class the config names (``architectures``: e.g. LlamaForCausalLM, so --save-pretrained writes a model
    ``from_pretrained`` loads as it was), else the type's causal-LM class (LLMs), else its masked-LM class
    (encoders), else ``AutoModel``; a directory with weights loads them."""
    import transformers
    from transformers.models.auto import modeling_auto as ma
    mtype = getattr(config, "model_type", None)
    default = (transformers.AutoModelForCausalLM if mtype in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and
               mtype not in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES else
               transformers.AutoModelForMaskedLM if mtype in ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES else
               transformers.AutoModel)
    cls = next((getattr(transformers, a) for a in (getattr(config, "architectures", None) or [])
                if hasattr(transformers, a)), default)
    if directory is not None and any((directory / f).is_file() for f in
                                     ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
        if (directory / "prunekit.json").is_file():
            import prunekit as pk
            return pk.hf.from_pretrained(directory)
        return cls.from_pretrained(str(directory), local_files_only=True)
    return cls.from_config(config) if cls in (transformers.AutoModel, transformers.AutoModelForCausalLM,
                                              transformers.AutoModelForMaskedLM) else cls._from_config(config)


def _from_file(path: Path, fn: str, shape):
    if not path.is_file():
        raise CLIError(f"model file {str(path)!r} does not exist", FAILURE)
    name = f"_prunekit_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    if not callable(getattr(mod, fn, None)):
        fns = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_"))
        raise CLIError(f"{path} has no function {fn!r}; callables there: {', '.join(fns) or 'none'}", FAILURE)
    out = getattr(mod, fn)()
    if isinstance(out, nn.Module):
        return out, _image_input(shape)
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], nn.Module):
        return out[0], out[1]
    raise CLIError(f"{path}:{fn}() returned {type(out).__name__}; it must return an nn.Module or "
                   "(model, example_inputs)", FAILURE)


def _unknown_hint(name: str, source: str) -> str:
    """"; close names: ...; prunekit list-models 'PATTERN' lists N" for an unknown model name: close
    names from ``source`` first (timm or torchvision), and a list-models pattern only if it matches a model."""
    names = list_models(None).get(source, [])
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close names: {', '.join(f'{source}:{n}' for n in close)}" if close else ""
    stem = re.match(r"[A-Za-z]+(?:_[A-Za-z]+)*", name)  # "resnet5000" -> "resnet", "vit_bigg_x" -> "vit_bigg_x"
    for pat in dict.fromkeys(p for p in (name, stem and stem.group(0), close and close[0].split("_")[0]) if p):
        n = sum(len(v) for v in list_models(pat).values())
        if n:
            return f"{hint}; prunekit list-models '{pat}' lists {n} model{'s' if n > 1 else ''}"
    return hint + "; prunekit list-models lists every name"


def list_models(pattern: str | None) -> dict[str, list[str]]:
    """{"timm": [...], "torchvision": [...]} matching ``pattern`` (fnmatch; no wildcard = substring)."""
    pat = pattern or "*"
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"
    found: dict[str, list[str]] = {}
    try:
        import timm
        found["timm"] = list(timm.list_models(pat))
    except ImportError:
        pass
    try:
        import torchvision
        names = torchvision.models.list_models(module=torchvision.models)
        found["torchvision"] = sorted(n for n in names if fnmatch.fnmatchcase(n, pat))
    except ImportError:
        pass
    return found


def _transformers_can_use_torch() -> bool:
    """Whether the installed transformers enables its PyTorch models with the installed torch."""
    from transformers.utils import is_torch_available
    return bool(is_torch_available())
