"""Llama family (Llama 2/3, SmolLM2, TinyLlama, ...): `LlamaForCausalLM`."""

from __future__ import annotations

import gguf

from .base import ArchSpec, ScaleGroup, register

LLAMA = register(
    ArchSpec(
        model_type="llama",
        hf_architectures=("LlamaForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        decoder_layer="transformers.models.llama.modeling_llama:LlamaDecoderLayer",
        rotary="transformers.models.llama.modeling_llama:LlamaRotaryEmbedding",
        rope_permute={
            "self_attn.q_proj": "num_attention_heads",
            "self_attn.k_proj": "num_key_value_heads",
        },
        scale_groups=(
            ScaleGroup(
                "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
            ),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", needs_same_shape=True),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
        ),
        no_clip=("self_attn.q_proj", "self_attn.k_proj"),
    )
)
