"""Float passthrough types F32, F16 and BF16 (one value a "block")."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .base import Codec


# [f32 little-endian]
class F32(Codec, qtype=T.F32):
    bits = 32
    is_float = True

    @classmethod
    def encode_blocks(cls, blocks):
        return np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint8)

    @classmethod
    def decode_blocks(cls, data):
        return np.ascontiguousarray(data).view(np.float32)


# [f16 little-endian], round to nearest even
class F16(Codec, qtype=T.F16):
    bits = 16
    is_float = True

    @classmethod
    def encode_blocks(cls, blocks):
        return blocks.astype(np.float16).view(np.uint8)

    @classmethod
    def decode_blocks(cls, data):
        return np.ascontiguousarray(data).view(np.float16).astype(np.float32)


# [bf16: the high 16 bits of an f32], round to nearest even, NaN kept quiet (ggml_compute_fp32_to_bf16)
class BF16(Codec, qtype=T.BF16):
    bits = 16
    is_float = True

    @classmethod
    def encode_blocks(cls, blocks):
        u = np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint32).astype(np.uint64)
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        quiet = ((u >> 16) | 64) & 0xFFFF
        return np.where(nan, quiet, rounded).astype(np.uint16).view(np.uint8)

    @classmethod
    def decode_blocks(cls, data):
        u = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16
        return u.view(np.float32)
