"""Llama family (Llama 2/3, SmolLM2, TinyLlama, ...): `LlamaForCausalLM`."""

from __future__ import annotations

import gguf

from .base import ArchSpec, ScaleGroup, register

# The norm -> q, k, v; v -> o; norm -> gate, up; up -> down groups of a Llama-style layer (shared by
# the families whose layers name their modules as Llama's do).
SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", needs_same_shape=True),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
# Rotary Q/K: the clip search leaves them (as the AWQ reference implementation does).
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")
# llama.cpp's `llama` arch rotates interleaved pairs: Q/K rows are permuted (`LlamaModel.permute`).
ROPE_PERMUTE = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}

LLAMA = register(
    ArchSpec(
        model_type="llama",
        hf_architectures=("LlamaForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        decoder_layer="transformers.models.llama.modeling_llama:LlamaDecoderLayer",
        rotary="transformers.models.llama.modeling_llama:LlamaRotaryEmbedding",
        rope_permute=ROPE_PERMUTE,
        scale_groups=SCALE_GROUPS,
        no_clip=NO_CLIP,
    )
)
