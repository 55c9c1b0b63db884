"""Phi-3 and Phi-3.5 (mini, medium) and Phi-4-mini: `Phi3ForCausalLM`.

The projections are fused and stay fused in GGUF (arch ``phi3``): ``qkv_proj`` (rows q | k | v) is
``attn_qkv``, ``gate_up_proj`` (rows gate | up, 2 x intermediate) is ``ffn_up``, which llama.cpp
splits for its SwiGLU. AWQ's v -> o and up -> down groups fold into **row slices** of those fused
linears (`ScaleGroup.prev_rows`). Rotary over halves (NeoX), no permutation; the rotated part of a
head (``partial_rotary_factor``) sets the rope dimensions. Keys after llama.cpp's
``Phi3MiniModel.set_gguf_parameters``: the original context length and the sliding window (0 for
none). The long-context variants' ``longrope`` factor tensors are not written: llmq refuses them.
"""

from __future__ import annotations

from typing import Any

import gguf

from ..errors import UnsupportedArchitectureError
from .base import ArchSpec, ScaleGroup, register
from .hparams import rope_parameters


def _v_rows(layer: Any) -> tuple[int, int]:
    attn = layer.self_attn
    q, kv = attn.config.num_attention_heads * attn.head_dim, attn.num_key_value_heads * attn.head_dim
    return q + kv, q + 2 * kv


def _up_rows(layer: Any) -> tuple[int, int]:
    n = layer.mlp.gate_up_proj.weight.shape[0] // 2
    return n, 2 * n


def _phi3_keys(w: gguf.GGUFWriter, config: Any) -> None:
    rope = rope_parameters(config)
    if rope.get("long_factor") or rope["rope_type"] in ("longrope", "su"):
        raise UnsupportedArchitectureError(
            "Phi-3 with longrope scaling (the 128k-context variants) is not supported: its "
            "rope_factors_long/short tensors are not written"
        )
    w.add_rope_scaling_orig_ctx_len(
        int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    )
    w.add_sliding_window(int(config.sliding_window or 0))


PHI3 = register(
    ArchSpec(
        model_type="phi3",
        hf_architectures=("Phi3ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.PHI3,
        decoder_layer="transformers.models.phi3.modeling_phi3:Phi3DecoderLayer",
        rotary="transformers.models.phi3.modeling_phi3:Phi3RotaryEmbedding",
        scale_groups=(
            ScaleGroup("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            ScaleGroup(
                "self_attn.qkv_proj",
                ("self_attn.o_proj",),
                "self_attn.o_proj",
                needs_same_shape=True,
                prev_rows=_v_rows,
            ),  # fmt: skip
            ScaleGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            ScaleGroup("mlp.gate_up_proj", ("mlp.down_proj",), "mlp.down_proj", prev_rows=_up_rows),
        ),
        no_clip=("self_attn.qkv_proj",),  # holds the rotary q and k
        metadata=_phi3_keys,
    )
)
