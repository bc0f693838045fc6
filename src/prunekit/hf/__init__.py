"""prunekit for Hugging Face transformers models (needs the ``hf`` extra: ``pip install 'prunekit[hf]'``).

    pk.Pruner(model, x, "l2", pk.ParamsTarget(0.5), uniform=True, round_to=64).prune()
    model.config                     # follows the modules after every prune (pk.hf.sync_config)
    pk.hf.save_pretrained(model, "out", tokenizer)
    AutoModelForCausalLM.from_pretrained("out")      # uniform widths; otherwise pk.hf.from_pretrained("out")

Nothing here imports transformers at import time (transformers' classes are matched by qualified name);
``moe`` registers transformers' mixture-of-experts blocks with :func:`prunekit.register_experts`, so whole
experts are prunable units.
"""
from . import moe  # noqa: F401
from .config import ConfigSync, after_prune, changes, derive, sync_config
from .evaluate import perplexity
from .io import HFSaveError, config_gaps, from_pretrained, save_pretrained
from .streaming import CheckpointError, StreamResult, example_inputs, meta_model, prune_checkpoint

__all__ = ["CheckpointError", "ConfigSync", "HFSaveError", "StreamResult", "example_inputs", "meta_model",
           "prune_checkpoint", "after_prune", "changes", "config_gaps", "derive", "from_pretrained",
           "perplexity", "save_pretrained", "sync_config"]
