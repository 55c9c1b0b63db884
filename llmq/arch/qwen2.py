"""Qwen2 and Qwen2.5 (and their Coder/Math/Instruct variants): `Qwen2ForCausalLM`.

GGUF arch ``qwen2``: rotary over halves (NeoX), so Q/K rows are written as stored; q/k/v carry
biases (written F32). AWQ's groups are Llama's; a v -> o scale (only without grouped-query
attention) divides v's bias too (`llmq.awq.fold_scales`).
"""

from __future__ import annotations

import gguf

from .base import ArchSpec, register
from .llama import NO_CLIP, SCALE_GROUPS

QWEN2 = register(
    ArchSpec(
        model_type="qwen2",
        hf_architectures=("Qwen2ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.QWEN2,
        decoder_layer="transformers.models.qwen2.modeling_qwen2:Qwen2DecoderLayer",
        rotary="transformers.models.qwen2.modeling_qwen2:Qwen2RotaryEmbedding",
        scale_groups=SCALE_GROUPS,
        no_clip=NO_CLIP,
    )
)
