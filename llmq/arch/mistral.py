"""Mistral (7B v0.1-v0.3, Mistral-Nemo, ...): `MistralForCausalLM`.

llama.cpp converts it as a Llama (GGUF arch ``llama``, `convert_hf_to_gguf.py` registers it on
``LlamaModel``): the same tensors, the same rotary permutation. The sliding window of v0.1 (4096) is
not written: llama.cpp's ``llama`` arch has no key for it, and attends to the whole context.
"""

from __future__ import annotations

import gguf

from .base import ArchSpec, register
from .llama import NO_CLIP, ROPE_PERMUTE, SCALE_GROUPS

MISTRAL = register(
    ArchSpec(
        model_type="mistral",
        hf_architectures=("MistralForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.LLAMA,
        decoder_layer="transformers.models.mistral.modeling_mistral:MistralDecoderLayer",
        rotary="transformers.models.mistral.modeling_mistral:MistralRotaryEmbedding",
        rope_permute=ROPE_PERMUTE,
        scale_groups=SCALE_GROUPS,
        no_clip=NO_CLIP,
    )
)
