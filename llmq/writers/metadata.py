"""GGUF key/value metadata: general.*, the architecture's hyper-parameters and rope settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from ..arch.hparams import head_dim, rope_dimensions, rope_parameters
from ..codecs import REGISTRY
from ..mixes import MIXES

# GGUF type name -> llama.cpp file type of a file whose linears are mostly that type
FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    **{name: mix.file_type for name, mix in MIXES.items()},
}


def add_hparams(w: gguf.GGUFWriter, config: Any, n_layers: int) -> None:
    """The llama-style hyper-parameters llama.cpp reads under ``<arch>.*``."""
    n_head = int(config.num_attention_heads)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(n_layers)
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or n_head))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(int(config.vocab_size))
    dim = head_dim(config)
    w.add_rope_dimension_count(rope_dimensions(config))
    if dim != config.hidden_size // n_head:
        w.add_key_length(dim)
        w.add_value_length(dim)
    rope = rope_parameters(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))


def add_general(
    w: gguf.GGUFWriter, model_dir: Path, *, name: str, n_params: int, codec_name: str
) -> gguf.Metadata:
    """general.* from the model's card/config (gguf-py's heuristics), plus llmq's file type."""
    meta = gguf.Metadata.load(model_path=model_dir, model_name=None, total_params=n_params)
    if meta.name is None:
        meta.name = name
    if meta.size_label is None:
        meta.size_label = gguf.size_label(n_params, 0, 0, 0)
    meta.quantized_by = "llmq"
    meta.set_gguf_meta_model(w)
    w.add_type(gguf.GGUFType.MODEL)
    file_type = FILE_TYPES.get(codec_name)
    if file_type is None:  # a type without its own file type: llama.cpp shows it as "guessed"
        file_type = gguf.LlamaFileType.GUESSED
    w.add_file_type(int(file_type))
    if codec_name in MIXES or not REGISTRY[codec_name].is_float:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return meta
