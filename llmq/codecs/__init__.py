"""Codecs: the storage formats llmq writes, one registered class each.

Example:
    >>> from llmq.codecs import get_codec
    >>> q = get_codec("Q4_0")
    >>> data = q.encode(weights)            # (rows, K) float32 -> (rows, K/32*18) uint8
    >>> back = q.decode(data, weights.shape)
"""

from __future__ import annotations

from . import floats, ggml, kquants, legacy  # noqa: F401  (registers the classes; ggml: libggml encoder)
from .base import REGISTRY, Codec, GroupCodec, IntegerGrid, get_codec, round_to_dtype

__all__ = ["REGISTRY", "Codec", "GroupCodec", "IntegerGrid", "get_codec", "round_to_dtype"]
