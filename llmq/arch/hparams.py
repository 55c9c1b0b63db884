"""Hyper-parameters read from transformers configs, across transformers versions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def rope_parameters(config: Any) -> dict[str, Any]:
    """Rope settings across transformers versions (``rope_parameters`` in 5.x, ``rope_scaling`` before)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3): the global layers'
        params = dict(params["full_attention"])
    scaling = getattr(config, "rope_scaling", None) or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_dimensions(config: Any) -> int:
    """Dimensions of each head that rotate (all, or ``partial_rotary_factor`` of them: Phi-4-mini)."""
    factor = rope_parameters(config).get("partial_rotary_factor") or getattr(
        config, "partial_rotary_factor", None
    )
    return int(head_dim(config) * float(factor or 1.0))


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling, stored as ``rope_freqs.weight``.

    Long wavelengths are stretched by ``factor``, short ones kept, and the band between
    interpolated smoothly (the scheme of Llama 3.1's reference code).
    """
    p = rope_parameters(config)
    dim = head_dim(config)
    freqs = 1.0 / (p["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = p.get("factor", 8.0)
    lo, hi = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_ctx = p.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    out = np.where(
        wavelen < old_ctx / hi,
        1.0,
        np.where(wavelen > old_ctx / lo, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    return out.astype(np.float32)
