"""Phi-3 and Phi-3.5 (mini, medium) and Phi-4-mini: `Phi3ForCausalLM`.

The projections are fused and stay fused in GGUF (arch ``phi3``): ``qkv_proj`` (rows q | k | v) is
``attn_qkv``, ``gate_up_proj`` (rows gate | up, 2 x intermediate) is ``ffn_up``, which llama.cpp
splits for its SwiGLU. AWQ's v -> o and up -> down groups fold into **row slices** of those fused
linears (`ScaleGroup.prev_rows`). Rotary over halves (NeoX), no permutation; the rotated part of a
head (``partial_rotary_factor``) sets the rope dimensions. Keys after llama.cpp's
``Phi3MiniModel.set_gguf_parameters``: the original context length and the sliding window (0 for
none); the long-context variants (``longrope``: Phi-3-128k, Phi-3.5-mini, Phi-4-mini) get their
``rope_factors_long``/``rope_factors_short`` tensors and the attention factor.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import numpy as np

from ..errors import UnsupportedArchitectureError
from .base import ArchSpec, ScaleGroup, register
from .hparams import rope_dimensions, rope_parameters


def _v_rows(layer: Any) -> tuple[int, int]:
    attn = layer.self_attn
    q, kv = attn.config.num_attention_heads * attn.head_dim, attn.num_key_value_heads * attn.head_dim
    return q + kv, q + 2 * kv


def _up_rows(layer: Any) -> tuple[int, int]:
    n = layer.mlp.gate_up_proj.weight.shape[0] // 2
    return n, 2 * n


def _orig_ctx(config: Any) -> int:
    # transformers 5 keeps it in the rope parameters, earlier versions beside them
    orig = rope_parameters(config).get("original_max_position_embeddings")
    return int(
        orig or getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
    )


def _longrope(config: Any) -> dict[str, Any] | None:
    rope = rope_parameters(config)
    if not rope.get("long_factor"):
        return None
    if rope["rope_type"] not in ("longrope", "su"):
        raise UnsupportedArchitectureError(f"Phi-3 with rope scaling {rope['rope_type']!r} is not supported")
    return rope


def _rope_factors(config: Any) -> dict[str, np.ndarray]:
    """The long-context variants' per-frequency factors (``Phi3MiniModel.generate_extra_tensors``)."""
    rope = _longrope(config)
    if rope is None:
        return {}
    half = rope_dimensions(config) // 2
    out = {}
    for key, name in (
        ("long_factor", "rope_factors_long.weight"),
        ("short_factor", "rope_factors_short.weight"),
    ):
        values = np.asarray(rope[key], dtype=np.float32)
        if values.shape != (half,):
            raise UnsupportedArchitectureError(f"Phi-3 rope {key} has {values.size} entries, expected {half}")
        out[name] = values
    return out


def _phi3_keys(w: gguf.GGUFWriter, config: Any) -> None:
    rope = _longrope(config)
    if rope is not None:  # llama.cpp scales attention by this on the long factors
        scale = config.max_position_embeddings / _orig_ctx(config)
        factor = rope.get("attention_factor")
        if factor is None:
            factor = math.sqrt(1 + math.log(scale) / math.log(_orig_ctx(config))) if scale > 1.0 else 1.0
        w.add_rope_scaling_attn_factors(float(factor))
    w.add_rope_scaling_orig_ctx_len(_orig_ctx(config))
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
        computed=_rope_factors,
    )
)
