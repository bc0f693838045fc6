"""transformers' mixture-of-experts blocks, registered with :func:`prunekit.analysis.experts.register_experts`
by qualified class name (registering imports nothing; a model's classes are matched over their MRO when it is
analysed).

Every block here (transformers 5.x) has a router child ``gate`` (``weight [E, H]``, ``num_experts``,
``top_k``) and an experts child ``experts`` whose stacked parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) lead with E and whose forward -- the default ``grouped_mm`` implementation, ``eager``
or ``batched_mm`` -- reads ``num_experts``.  Removing experts changes, besides the modules' ``num_experts``,
these config fields (synchronised elsewhere): Mixtral ``num_local_experts``; Qwen2-MoE, Qwen3-MoE, OLMoE
``num_experts`` (and ``num_experts_per_tok`` must stay <= the kept count); the ``*ForCausalLM.num_experts``
attribute, read only for the auxiliary load-balancing loss (``output_router_logits=True``).
"""
from __future__ import annotations

from ..analysis.experts import ExpertSpec, register_experts

# (module under transformers.models, class): blocks whose routing, expert removal and both experts
# implementations are tested in tests/zoo/test_hf_moe.py
BLOCKS = (
    ("mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    ("qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    ("qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    ("olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
)

SPEC = ExpertSpec(router="gate", experts="experts", count_attr="num_experts", top_k_attr="top_k")

for _mod, _cls in BLOCKS:
    register_experts(f"transformers.models.{_mod}.{_cls}", SPEC, replace=True)
