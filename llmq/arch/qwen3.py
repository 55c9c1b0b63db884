"""Qwen3 (dense): `Qwen3ForCausalLM`.

GGUF arch ``qwen3``: rotary over halves (NeoX), no biases, an RMS norm over each head of Q and K
(``attn_q_norm``/``attn_k_norm``, F32) applied after the projections; ``head_dim`` is its own
setting (128 where hidden / heads is not), so the key and value lengths are written.
"""

from __future__ import annotations

import gguf

from .base import ArchSpec, register
from .llama import NO_CLIP, SCALE_GROUPS

QWEN3 = register(
    ArchSpec(
        model_type="qwen3",
        hf_architectures=("Qwen3ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.QWEN3,
        decoder_layer="transformers.models.qwen3.modeling_qwen3:Qwen3DecoderLayer",
        rotary="transformers.models.qwen3.modeling_qwen3:Qwen3RotaryEmbedding",
        scale_groups=SCALE_GROUPS,
        no_clip=NO_CLIP,
    )
)
