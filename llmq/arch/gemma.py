"""Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3 text (`Gemma3ForCausalLM`).

What sets them apart, all switched by data here:
- every norm computes ``x * (1 + w)``: written as ``1 + w`` (llama.cpp's converter adds the 1), and
  AWQ folds a scale into one as ``w' = (1 + w) / s - 1`` (``norm_offset``);
- the embeddings are multiplied by sqrt(hidden) inside the model (``embed_scale``: calibration too);
- norms after attention and around the feed-forward: the MLP's scale group is fed by
  ``pre_feedforward_layernorm`` (GGUF ``ffn_norm``), ``post_*`` norms are written and never scaled;
- sliding-window layers (Gemma 2: every other, Gemma 3: five of six, patterns llama.cpp fixes per
  arch) and, in Gemma 3, Q/K norms and a separate rope base for the local layers (10000 in both);
- Gemma 2's attention and final logit soft-caps.
llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B models), which is
what ``query_pre_attn_scalar`` says in the released configs.
"""

from __future__ import annotations

from typing import Any

import gguf

from .base import ArchSpec, ScaleGroup, register
from .llama import NO_CLIP

SCALE_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", needs_same_shape=True),
    ScaleGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


def _gemma2_keys(w: gguf.GGUFWriter, config: Any) -> None:
    # Gemma2Model.set_gguf_parameters in llama.cpp's convert_hf_to_gguf.py
    if config.attn_logit_softcapping is not None:
        w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if config.final_logit_softcapping is not None:
        w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    w.add_sliding_window(int(config.sliding_window))


def _gemma3_keys(w: gguf.GGUFWriter, config: Any) -> None:
    # Gemma3Model.set_gguf_parameters; the local layers' rope base is llama.cpp's fixed 10000
    if getattr(config, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if getattr(config, "sliding_window_pattern", None) != 1:
        w.add_sliding_window(int(config.sliding_window))


GEMMA2 = register(
    ArchSpec(
        model_type="gemma2",
        hf_architectures=("Gemma2ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.GEMMA2,
        decoder_layer="transformers.models.gemma2.modeling_gemma2:Gemma2DecoderLayer",
        rotary="transformers.models.gemma2.modeling_gemma2:Gemma2RotaryEmbedding",
        norm_offset=1.0,
        embed_scale=True,
        scale_groups=SCALE_GROUPS,
        no_clip=NO_CLIP,
        metadata=_gemma2_keys,
    )
)

GEMMA3 = register(
    ArchSpec(
        model_type="gemma3_text",
        hf_architectures=("Gemma3ForCausalLM",),
        gguf_arch=gguf.MODEL_ARCH.GEMMA3,
        decoder_layer="transformers.models.gemma3.modeling_gemma3:Gemma3DecoderLayer",
        rotary="transformers.models.gemma3.modeling_gemma3:Gemma3RotaryEmbedding",
        norm_offset=1.0,
        embed_scale=True,
        scale_groups=SCALE_GROUPS,
        no_clip=NO_CLIP,
        metadata=_gemma3_keys,
    )
)
