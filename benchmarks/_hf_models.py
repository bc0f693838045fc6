"""Tiny random-weight transformers models for benchmarks: a small config for any model type, no download.

``tiny_config(model_type)`` starts from the type's default config and shrinks every size field it has (layers 2,
hidden 64, 4 heads / 2 kv heads, vocab 128, 4 experts ...), clamps special token ids into the small vocabulary
and trims per-layer lists (``layer_types``) to the layer count.  Types whose defaults do not survive the
shrinking (their forward fails) are reported as such by the sweep, not hidden.
"""
from __future__ import annotations

TINY = {  # key: value, applied where the config has the key
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 128, "n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 128,
    "d_model": 64, "num_layers": 2, "d_ff": 128, "num_heads": 4, "d_kv": 16, "head_dim": 16, "d_head": 16,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "num_decoder_layers": 2, "ffn_dim": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
    "embedding_size": 64, "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "n_group": 1, "topk_group": 1, "num_experts_per_token": 2, "moe_num_experts": 4, "moe_k": 2,
    "ffn_hidden_size": 128, "multi_query_group_num": 2, "num_kv_heads": 2, "hidden_dim": 128,
    "attention_window": 8, "sliding_window": 8, "rotary_dim": 8, "partial_rotary_factor": None,
}
SKIP_KEYS = {"partial_rotary_factor"}


def shrink(cfg):
    n0 = getattr(cfg, "num_hidden_layers", None)  # per-layer lists of this length are trimmed too
    d = {}
    for k, v in TINY.items():
        if k in SKIP_KEYS or not hasattr(cfg, k):
            continue
        cur = getattr(cfg, k)
        if isinstance(cur, bool) or (cur is not None and not isinstance(cur, int)):
            continue
        if cur is None and k not in ("head_dim", "num_key_value_heads"):
            continue
        if k in ("num_experts_per_tok", "num_experts_per_token", "moe_k") and isinstance(cur, int) and cur < v:
            continue  # a router with top-1 stays top-1 (some configs only support that)
        d[k] = v
    if hasattr(cfg, "qk_rope_head_dim"):
        d.pop("head_dim", None)  # MLA (DeepSeek-style): head_dim is the rope part
    for k, v in d.items():
        try:
            setattr(cfg, k, v)
        except Exception:
            pass
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int):
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                    "cls_token_id", "mask_token_id", "unk_token_id"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v >= vocab:
                setattr(cfg, key, vocab - 1 - ["pad_token_id", "bos_token_id", "eos_token_id"].index(key)
                        if key in ("pad_token_id", "bos_token_id", "eos_token_id") else vocab - 4)
            elif isinstance(v, list):
                setattr(cfg, key, [min(i, vocab - 1) for i in v])
    n = getattr(cfg, "num_hidden_layers", None)
    per_layer = [k for k, v in vars(cfg).items() if isinstance(v, (list, tuple)) and n0 and len(v) == n0 and n0 != n]
    for key in dict.fromkeys(("layer_types", "block_types", "layers_block_type", "hybrid_override_pattern",
                              *per_layer)):
        lt = getattr(cfg, key, None)
        if isinstance(lt, (list, tuple)) and n and len(lt) != n:
            try:
                setattr(cfg, key, list(lt[:n]) if len(lt) >= n else list(lt) + [lt[-1]] * (n - len(lt)))
            except Exception:
                pass
    for sub in ("text_config", "encoder", "decoder", "vision_config", "audio_config"):
        sc = getattr(cfg, sub, None)
        if sc is not None and hasattr(sc, "to_dict") and sc is not cfg:
            shrink(sc)
    return cfg


def tiny_config(model_type: str, **over):
    from transformers import AutoConfig
    cfg = shrink(AutoConfig.for_model(model_type))
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def task_of(model_type: str) -> str:
    """"masked-lm" for encoders (types with a masked-LM head: BERT, RoBERTa ...), else "causal-lm"."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "masked-lm" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "causal-lm"


def text_model_types() -> list[str]:
    """Every decoder-only / encoder text model type with a causal-LM or masked-LM head class."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_MASKED_LM_MAPPING_NAMES))


def auto_class(model_type: str):
    import transformers
    return (transformers.AutoModelForCausalLM if task_of(model_type) == "causal-lm"
            else transformers.AutoModelForMaskedLM)


def build(model_type: str, seed: int = 0, seq: int = 8, **over):
    """(model in eval mode, example inputs dict with attention_mask, config) for a tiny random model."""
    import torch
    cfg = tiny_config(model_type, **over)
    torch.manual_seed(seed)
    model = auto_class(model_type).from_config(cfg).eval()
    vocab = getattr(cfg.get_text_config(), "vocab_size", None) or 128
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(int(vocab), 128), (1, seq), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(cfg, "is_encoder_decoder", False):
        x["decoder_input_ids"] = ids[:, : max(1, seq // 2)].clone()
    if task_of(model_type) == "causal-lm" and not getattr(cfg, "is_encoder_decoder", False):
        x["use_cache"] = False
    return model, x, cfg
