"""Mixture-of-experts families: Mixtral (`MixtralForCausalLM`) and Qwen3-MoE (`Qwen3MoeForCausalLM`).

Their attention is Llama's (Mixtral, GGUF arch ``llama`` with the rotary permutation) or Qwen3's
(``qwen3moe``: q/k norms, NeoX rotary); the feed-forward is a sparse block (`Experts`): a router
``gate`` choosing ``num_experts_per_tok`` of the experts per token, the chosen outputs weighted by
the renormalized router probabilities. llama.cpp reads the expert count, the experts used and (Qwen3)
an expert's intermediate size.
"""

from __future__ import annotations

from typing import Any

import gguf

from ..errors import UnsupportedArchitectureError
from .base import ArchSpec, Experts, ScaleGroup, register
from .llama import NO_CLIP, ROPE_PERMUTE

ATTENTION_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", needs_same_shape=True),
)


def _expert_keys(experts: Experts, ff: bool) -> Any:
    def keys(w: gguf.GGUFWriter, config: Any) -> None:
        if getattr(config, "norm_topk_prob", True) is False:  # llama.cpp's qwen3moe always renormalizes
            raise UnsupportedArchitectureError(
                f"{config.model_type} with norm_topk_prob=false: llama.cpp renormalizes the chosen experts' weights"
            )
        w.add_expert_count(experts.count(config))
        w.add_expert_used_count(int(getattr(config, experts.used_key)))
        if ff:
            w.add_expert_feed_forward_length(int(getattr(config, experts.ff_key)))

    return keys


MIXTRAL_EXPERTS = Experts(
    module="mlp",
    gate="block_sparse_moe.experts.{e}.w1.weight",
    up="block_sparse_moe.experts.{e}.w3.weight",
    down="block_sparse_moe.experts.{e}.w2.weight",
    router="block_sparse_moe.gate.weight",
    count_key="num_local_experts",
    ff_key="intermediate_size",
)
QWEN3_MOE_EXPERTS = Experts(
    module="mlp",
    gate="mlp.experts.{e}.gate_proj.weight",
    up="mlp.experts.{e}.up_proj.weight",
    down="mlp.experts.{e}.down_proj.weight",
    router="mlp.gate.weight",
    count_key="num_experts",
)

MIXTRAL = register(
    ArchSpec(
        model_type="mixtral",
        hf_architectures=("MixtralForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        decoder_layer="transformers.models.mixtral.modeling_mixtral:MixtralDecoderLayer",
        rotary="transformers.models.mixtral.modeling_mixtral:MixtralRotaryEmbedding",
        rope_permute=ROPE_PERMUTE,
        scale_groups=ATTENTION_GROUPS,
        no_clip=NO_CLIP,
        metadata=_expert_keys(MIXTRAL_EXPERTS, ff=False),
        experts=MIXTRAL_EXPERTS,
    )
)

QWEN3_MOE = register(
    ArchSpec(
        model_type="qwen3_moe",
        hf_architectures=("Qwen3MoeForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.QWEN3MOE,
        decoder_layer="transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeDecoderLayer",
        rotary="transformers.models.qwen3_moe.modeling_qwen3_moe:Qwen3MoeRotaryEmbedding",
        scale_groups=ATTENTION_GROUPS,
        no_clip=NO_CLIP,
        metadata=_expert_keys(QWEN3_MOE_EXPERTS, ff=True),
        experts=QWEN3_MOE_EXPERTS,
    )
)
