"""llama.cpp's legacy block types Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (32 values a block).

Encoders mirror ggml-quants.c's `quantize_row_q*_ref` in float32 arithmetic, so round-to-nearest
blocks are byte-identical to llama.cpp's (and to `gguf.quants.quantize`). With an importance vector,
Q4_0/Q4_1/Q5_0/Q5_1 mirror `quantize_row_q*_impl` (`make_qx_quants` / `make_qkx3_quants` searches);
Q8_0 has no weighted path in llama.cpp and stays round-to-nearest.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from .base import GroupCodec
from .quants_math import make_qkx3_quants, make_qx_quants

_F32 = np.float32


def _inverse(d: np.ndarray) -> np.ndarray:
    # ggml: `id = d ? 1.0f/d : 0.0f`
    with np.errstate(divide="ignore"):
        return np.where(d == 0, _F32(0), _F32(1) / d).astype(_F32)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    # The value of largest magnitude, sign kept (first one on ties, as ggml's loop keeps it); an
    # all-zero block keeps ggml's initial `max = 0.0f` even if its zeros are -0.0 (so d = -0.0).
    idx = np.abs(x).argmax(axis=-1, keepdims=True)
    v = np.take_along_axis(x, idx, axis=-1)
    return np.where(v == 0, _F32(0), v)


def _minmax_params(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    lo = x.min(axis=-1, keepdims=True)
    hi = x.max(axis=-1, keepdims=True)
    return ((hi - lo) / _F32(levels)).astype(_F32), lo.astype(_F32)


def _trunc_codes(v: np.ndarray, top: int) -> np.ndarray:
    # ggml: `MIN(top, (int8_t)(v))` where v >= 0 by construction
    return np.minimum(np.trunc(v), top).astype(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    # qs[j] = q[j] | q[j + 16] << 4: the first half of the block in the low nibbles
    half = q.shape[1] // 2
    return (q[:, :half] & 0x0F) | (q[:, half:] << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    # qh: bit j of a little-endian uint32 holds bit 4 of q[j]
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _symmetric_search(groups: np.ndarray, weights: np.ndarray, nmax: int):
    # quantize_row_q4_0_impl / q5_0_impl: `make_qx_quants(32, nmax, xb, L, 1, weight)`
    d, codes = make_qx_quants(groups, nmax, weights)
    d = d[:, None]
    return d, np.zeros_like(d), codes


def _asymmetric_search(groups: np.ndarray, weights: np.ndarray, nmax: int):
    # quantize_row_q4_1_impl / q5_1_impl: `make_qkx3_quants(32, nmax, xb, weight, ..., -0.9f, 0.05f, 36, false)`
    d, m, codes = make_qkx3_quants(groups, nmax, weights, rmin=-0.9, rdelta=0.05, nstep=36)
    return d[:, None], m[:, None], codes


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).view(np.uint8).reshape(v.shape[0], 2)


def _f16_value(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(_F32)


class _Grid:
    """`Codec.grid_blocks`/`with_codes` of a legacy type: x = d * (code - zero) (+ m), codes 0..top."""

    supports_grid = True
    zero: int = 0  # Q4_0: 8, Q5_0: 16; the asymmetric types add their f16 min instead
    top: int

    @classmethod
    def grid_blocks(cls, data):
        d = _f16_value(data[:, :2])
        m = _f16_value(data[:, 2:4]) if not cls.symmetric else -cls.zero * d
        codes = cls.codes(data)
        return np.broadcast_to(d, codes.shape), np.broadcast_to(m, codes.shape), codes, 0, cls.top

    @classmethod
    def with_codes(cls, data, codes):
        m = None if cls.symmetric else _f16_value(data[:, 2:4])
        return cls.pack_codes(codes.astype(np.uint8), _f16_value(data[:, :2]), m)


# [d: f16][qs: 16 B, lo nibble = values 0..15, hi nibble = values 16..31]; x = d * (q - 8)
class Q4_0(_Grid, GroupCodec, qtype=T.Q4_0):
    bits = 4
    zero, top = 8, 15
    supports_importance = True
    compiled_faster = (False, True)  # the round-to-nearest path is libggml's

    @classmethod
    def group_params(cls, groups):
        d = (_signed_absmax(groups) / _F32(-8)).astype(_F32)
        return d, np.zeros_like(d)

    @classmethod
    def search_params(cls, groups, weights):
        return _symmetric_search(groups, weights, 8)

    @classmethod
    def pack(cls, blocks, d, m):
        return cls.pack_codes(_trunc_codes(blocks * _inverse(d) + _F32(8.5), 15), d, m)

    @classmethod
    def pack_codes(cls, codes, d, m):
        return np.concatenate([_f16_bytes(d), _pack_nibbles(codes)], axis=1)

    @classmethod
    def codes(cls, data):
        return _unpack_nibbles(data[:, 2:])

    @classmethod
    def decode_blocks(cls, data):
        q = cls.codes(data).astype(np.int8) - np.int8(8)
        return _f16_value(data[:, :2]) * q.astype(_F32)


# [d: f16][m: f16][qs: 16 B, lo nibble first]; x = d * q + m
class Q4_1(_Grid, GroupCodec, qtype=T.Q4_1):
    bits = 4
    top = 15
    symmetric = False
    supports_importance = True
    # libggml, not the compiled search (3.5x faster): its stored min of a block of signed zeros takes
    # the sign its compiler's vector min picks, where the C loop (and llmq) keeps the first minimum
    compiled_faster = (False, False)

    @classmethod
    def group_params(cls, groups):
        return _minmax_params(groups, 15)

    @classmethod
    def search_params(cls, groups, weights):
        return _asymmetric_search(groups, weights, 15)

    @classmethod
    def pack(cls, blocks, d, m):
        return cls.pack_codes(_trunc_codes((blocks - m) * _inverse(d) + _F32(0.5), 15), d, m)

    @classmethod
    def pack_codes(cls, codes, d, m):
        return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_nibbles(codes)], axis=1)

    @classmethod
    def codes(cls, data):
        return _unpack_nibbles(data[:, 4:])

    @classmethod
    def decode_blocks(cls, data):
        q = cls.codes(data).astype(_F32)
        return _f16_value(data[:, :2]) * q + _f16_value(data[:, 2:4])


# [d: f16][qh: 4 B, bit j = bit 4 of q[j]][qs: 16 B low nibbles, lo nibble first]; x = d * (q - 16)
class Q5_0(_Grid, GroupCodec, qtype=T.Q5_0):
    bits = 5
    zero, top = 16, 31
    supports_importance = True
    compiled_faster = (False, True)  # the round-to-nearest path is libggml's

    @classmethod
    def group_params(cls, groups):
        d = (_signed_absmax(groups) / _F32(-16)).astype(_F32)
        return d, np.zeros_like(d)

    @classmethod
    def search_params(cls, groups, weights):
        return _symmetric_search(groups, weights, 16)

    @classmethod
    def pack(cls, blocks, d, m):
        return cls.pack_codes(_trunc_codes(blocks * _inverse(d) + _F32(16.5), 31), d, m)

    @classmethod
    def pack_codes(cls, codes, d, m):
        return np.concatenate([_f16_bytes(d), _pack_high_bits(codes), _pack_nibbles(codes)], axis=1)

    @classmethod
    def codes(cls, data):
        return _unpack_nibbles(data[:, 6:]) | _unpack_high_bits(data[:, 2:6])

    @classmethod
    def decode_blocks(cls, data):
        q = cls.codes(data)
        return _f16_value(data[:, :2]) * (q.astype(np.int8) - np.int8(16)).astype(_F32)


# [d: f16][m: f16][qh: 4 B][qs: 16 B]; x = d * q + m
class Q5_1(_Grid, GroupCodec, qtype=T.Q5_1):
    bits = 5
    top = 31
    symmetric = False
    supports_importance = True
    # libggml, not the compiled search (3.5x faster): its stored min of a block of signed zeros takes
    # the sign its compiler's vector min picks, where the C loop (and llmq) keeps the first minimum
    compiled_faster = (False, False)

    @classmethod
    def group_params(cls, groups):
        return _minmax_params(groups, 31)

    @classmethod
    def search_params(cls, groups, weights):
        return _asymmetric_search(groups, weights, 31)

    @classmethod
    def pack(cls, blocks, d, m):
        return cls.pack_codes(_trunc_codes((blocks - m) * _inverse(d) + _F32(0.5), 31), d, m)

    @classmethod
    def pack_codes(cls, codes, d, m):
        return np.concatenate(
            [_f16_bytes(d), _f16_bytes(m), _pack_high_bits(codes), _pack_nibbles(codes)], axis=1
        )

    @classmethod
    def codes(cls, data):
        return _unpack_nibbles(data[:, 8:]) | _unpack_high_bits(data[:, 4:8])

    @classmethod
    def decode_blocks(cls, data):
        return _f16_value(data[:, :2]) * cls.codes(data).astype(_F32) + _f16_value(data[:, 2:4])


# [d: f16][qs: 32 x int8]; x = d * q
class Q8_0(GroupCodec, qtype=T.Q8_0):
    bits = 8

    @classmethod
    def group_params(cls, groups):
        d = (np.abs(groups).max(axis=-1, keepdims=True) / _F32(127)).astype(_F32)
        return d, np.zeros_like(d)

    @classmethod
    def pack(cls, blocks, d, m):
        v = blocks * _inverse(d)
        # roundf (halves away from zero), exact: adding 0.5 in float32 could round 0.49999997 up
        a = np.abs(v)
        q = np.sign(v) * (np.floor(a) + np.floor(_F32(2) * (a - np.floor(a))))
        return cls.pack_codes(q.astype(np.int8).view(np.uint8), d, m)

    @classmethod
    def pack_codes(cls, codes, d, m):
        # codes: the int8 values' bytes
        return np.concatenate([_f16_bytes(d), codes], axis=1)

    supports_grid = True

    @classmethod
    def grid_blocks(cls, data):
        codes = data[:, 2:].view(np.int8)
        d = np.broadcast_to(_f16_value(data[:, :2]), codes.shape)
        return d, np.zeros_like(d), codes, -128, 127

    @classmethod
    def with_codes(cls, data, codes):
        return cls.pack_codes(codes.astype(np.int8).view(np.uint8), _f16_value(data[:, :2]), None)

    @classmethod
    def decode_blocks(cls, data):
        return _f16_value(data[:, :2]) * data[:, 2:].view(np.int8).astype(_F32)
