"""llama.cpp's K-quant block types Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (256 values a super-block).

A super-block of QK_K = 256 values splits into 16 sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 8 of 32
(Q4_K, Q5_K), each with its own quantized scale (and min), scaled in turn by the f16 ``d`` (and
``dmin``). Encoders mirror ggml-quants.c in float32 arithmetic, so their bytes are llama.cpp's:
without importance `quantize_row_q*_K_ref` (round-to-nearest reference mode), with an importance
matrix the `quantize_row_q*_K_impl` paths (`make_qkx3_quants` / `make_qx_quants` per sub-block,
`make_qp_quants` for the sub-block scales). Decoders mirror `dequantize_row_q*_K` operation for
operation (bit-identical to `gguf.quants.dequantize`).
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as T

from .base import Codec
from .kquants_math import (
    f16_round,
    f16_value,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    nearest_int,
    pack_2bit,
    pack_nibbles_k,
    pack_q3_scales,
    pack_q6,
    pack_scale_min_k4,
    requantize,
    unpack_2bit,
    unpack_bits,
    unpack_nibbles_k,
    unpack_q3_scales,
    unpack_q6,
    unpack_scale_min_k4,
)
from .krefine import grid_k4, grid_q6, q6_scales, refine_k4, refine_q6
from .quants_math import GROUP_MAX_EPS, make_qkx3_quants, make_qx_quants, seq_sum
from .xp import (
    Array,
    array_namespace,
    bitcast,
    const,
    contiguous,
    device,
    errstate,
    pack_bits,
    sqrt,
    take_rows,
)

QK_K = 256


def _f16_bytes(v: Array) -> Array:
    xp = array_namespace(v)
    with errstate(v):
        return xp.reshape(bitcast(contiguous(xp.astype(v, xp.float16)), "uint8"), (-1, 2))


def _positive_max(v: Array) -> Array:
    # `float mx = 0; if (v > mx) mx = v;` over the sub-blocks: +0.0 unless some value is positive
    xp = array_namespace(v)
    m = xp.max(v, axis=1)
    return xp.where(m > 0, m, const(xp, 0, v))


def _inverse_scale(xp, top: int, v: Array) -> Array:
    # `iscale = v > 0 ? top/v : 0`
    with errstate(v):
        return xp.where(v > 0, const(xp, top, v) / v, const(xp, 0, v))


class _KQuant(Codec):
    """K-quant base: with an importance matrix, ggml weighs inside each super-block, not per row.

    Encoders and decoders take NumPy arrays or torch tensors (CPU or CUDA) and give the same bytes.
    """

    supports_importance = True
    array_api = True

    @classmethod
    def encoder_weights(cls, x: Array, importance: Array) -> Array:
        # The `_impl` encoders build their weights from each super-block's own mean square, so the
        # per-element weights handed to `encode_blocks_weighted` are the importance itself.
        xp = array_namespace(x)
        imp = cls._check_importance(importance, x.shape)
        return contiguous(xp.broadcast_to(xp.asarray(imp, device=device(x)), x.shape))


def _superblock_weights(blocks: Array, qw: Array, factor: int) -> Array:
    """``qw * sqrt(sigma2 + x^2)`` with ``sigma2 = factor * sum(x^2) / QK_K`` of each super-block."""
    xp = array_namespace(blocks)
    sum_x2 = seq_sum(contiguous((blocks * blocks).T))
    sigma2 = (const(xp, factor, blocks) * sum_x2) / const(xp, QK_K, blocks)
    return qw * sqrt(xp, sigma2[:, None] + blocks * blocks)


def _sub_sums(w: Array, size: int) -> Array:
    """Each sub-block's summed weights ``(n, QK_K / size)``, summed from 0 as the C loop does."""
    return seq_sum(contiguous(w.reshape(-1, size).T)).reshape(w.shape[0], -1)


def _six_bit(xp, inv: Array, v: Array) -> Array:
    # `uint8_t ls = nearest_int(inv * v)` wraps modulo 256 before `MIN(63, ls)`
    return xp.astype(xp.minimum(nearest_int(inv[:, None] * v) & 0xFF, const(xp, 63, inv, xp.int32)), xp.uint8)


def _asymmetric_k4(blocks: Array, nmax: int, rmin: float, nstep: int, qw: Array | None = None):
    """Q4_K/Q5_K up to the codes: header bytes (d, dmin, 12 scale bytes) and codes ``(n, 256)``.

    Without ``qw`` `quantize_row_q4_K_ref` (``make_qkx2_quants``, weights ``av_x + |x|``, scales to
    6 bits by the largest); with it `quantize_row_q4_K_impl` (``make_qkx3_quants`` on importance
    weights, scales and mins to 6 bits by ``make_qp_quants``).
    """
    xp = array_namespace(blocks)
    n = blocks.shape[0]
    sub = blocks.reshape(-1, 32)
    if qw is None:
        sum_x2 = seq_sum(contiguous((sub * sub).T))
        av_x = sqrt(xp, sum_x2 / const(xp, 32, sub))
        weights = av_x[:, None] + xp.abs(sub)
        scales, mins, codes = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
        scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        ls = _six_bit(xp, _inverse_scale(xp, 63, max_scale), scales)
        lm = _six_bit(xp, _inverse_scale(xp, 63, max_min), mins)
        d = max_scale / const(xp, 63, max_scale)
        dmin = max_min / const(xp, 63, max_min)
    else:
        w = _superblock_weights(blocks, qw, 2)
        sw = _sub_sums(w, 32)
        scales, m, codes = make_qkx3_quants(sub, nmax, w.reshape(-1, 32), -0.9, 0.05, 36)
        d, ls = make_qp_quants(scales.reshape(n, 8), 63, sw)
        dmin, lm = make_qp_quants((-m).reshape(n, 8), 63, sw)
        if nmax == 31:  # Q5_K's `_impl` clamps to 6 bits; Q4_K's stores the byte as it is
            ls, lm = xp.minimum(ls, const(xp, 63, ls)), xp.minimum(lm, const(xp, 63, lm))
    packed = pack_scale_min_k4(ls, lm)
    sc, mn = unpack_scale_min_k4(packed)  # requantize from the stored bytes (`get_scale_min_k4`)
    dl = f16_round(d)[:, None] * xp.astype(sc, xp.float32)
    ml = f16_round(dmin)[:, None] * xp.astype(mn, xp.float32)
    codes = requantize(blocks.reshape(n, 8, 32), codes.reshape(n, 8, 32), dl, ml, 0, nmax)
    header = xp.concat([_f16_bytes(d), _f16_bytes(dmin), packed], axis=1)
    return header, codes.reshape(n, QK_K)


class _AsymmetricK4(_KQuant):
    """Q4_K/Q5_K: `_asymmetric_k4` with the type's search grid, then the type's own code packing."""

    symmetric = False
    compiled_faster = (True, True)
    nmax: int
    rmin: float
    nstep: int

    @classmethod
    def encode_blocks(cls, blocks):
        return cls._pack(*_asymmetric_k4(blocks, cls.nmax, cls.rmin, cls.nstep))

    @classmethod
    def encode_blocks_weighted(cls, blocks, weights):
        return cls._pack(*_asymmetric_k4(blocks, cls.nmax, cls.rmin, cls.nstep, weights))

    @classmethod
    def refine_blocks(cls, blocks, weights, data):
        return refine_k4(blocks, weights, data, cls.nmax, cls._pack)

    @classmethod
    def _pack(cls, header: Array, codes: Array) -> Array:
        raise NotImplementedError

    supports_grid = True

    @classmethod
    def grid_blocks(cls, data):
        return grid_k4(data, cls._codes(data), cls.nmax)

    @classmethod
    def with_codes(cls, data, codes):
        return cls._pack(data[:, :16], codes.astype("uint8"))


def _asymmetric_k4_decode(data: Array, q: Array) -> Array:
    # y = (d * sc) * q - dmin * m, per sub-block of 32
    xp = array_namespace(data)
    sc, m = unpack_scale_min_k4(data[:, 4:16])
    dl = f16_value(data[:, 0:2]) * xp.astype(sc, xp.float32)
    ml = f16_value(data[:, 2:4]) * xp.astype(m, xp.float32)
    y = dl[:, :, None] * xp.astype(q.reshape(-1, 8, 32), xp.float32) - ml[:, :, None]
    return y.reshape(-1, QK_K)


def _signed_max_scale(xp, scales: Array) -> Array:
    # the sub-block scale of largest magnitude, sign kept, first of equals (the C loop's strict `>`)
    return take_rows(xp, scales, xp.argmax(xp.abs(scales), axis=1))


# [scales: 16 B, lo nibble = 4-bit scale, hi = 4-bit min of each 16-value sub-block][qs: 64 B, 2-bit]
# [d: f16][dmin: f16]; x = d * sc * q - dmin * m
class Q2_K(_KQuant, qtype=T.Q2_K):
    bits = 2
    symmetric = False
    compiled_faster = (True, True)

    @classmethod
    def encode_blocks(cls, blocks):
        xp = array_namespace(blocks)
        n = blocks.shape[0]
        sub = blocks.reshape(-1, 16)
        scales, mins, codes = make_qkx2_quants(sub, xp.abs(sub), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        iscale, imin = _inverse_scale(xp, 15, max_scale), _inverse_scale(xp, 15, max_min)
        d = max_scale / const(xp, 15, max_scale)
        dmin = max_min / const(xp, 15, max_min)
        return cls._finish(
            blocks, codes, nearest_int(iscale[:, None] * scales), nearest_int(imin[:, None] * mins), d, dmin
        )

    @classmethod
    def encode_blocks_weighted(cls, blocks, weights):
        # `quantize_row_q2_K_impl`: sigma2 = sum(x^2) / QK_K, make_qkx3_quants, make_qp_quants to 4 bits
        xp = array_namespace(blocks)
        n = blocks.shape[0]
        w = _superblock_weights(blocks, weights, 1)
        scales, m, codes = make_qkx3_quants(blocks.reshape(-1, 16), 3, w.reshape(-1, 16), -0.9, 0.05, 36)
        sw = _sub_sums(w, 16)
        d, ls = make_qp_quants(scales.reshape(n, 16), 15, sw)
        dmin, lm = make_qp_quants((-m).reshape(n, 16), 15, sw)
        return cls._finish(blocks, codes, xp.astype(ls, xp.int32), xp.astype(lm, xp.int32), d, dmin)

    @classmethod
    def _finish(cls, blocks, codes, ls, lm, d, dmin):
        # `y.scales[j] = ls | lm << 4`: no clamp, truncated to the byte; codes redone with the stored scales
        xp = array_namespace(blocks)
        n = blocks.shape[0]
        packed = xp.astype((ls | (lm << 4)) & 0xFF, xp.uint8)
        dl = f16_round(d)[:, None] * xp.astype(packed & 0x0F, xp.float32)
        ml = f16_round(dmin)[:, None] * xp.astype(packed >> 4, xp.float32)
        codes = requantize(blocks.reshape(n, 16, 16), codes.reshape(n, 16, 16), dl, ml, 0, 3)
        return xp.concat([packed, pack_2bit(codes.reshape(n, QK_K)), _f16_bytes(d), _f16_bytes(dmin)], axis=1)

    @classmethod
    def decode_blocks(cls, data):
        xp = array_namespace(data)
        sc = data[:, :16]
        dl = f16_value(data[:, 80:82]) * xp.astype(sc & 0x0F, xp.float32)
        ml = f16_value(data[:, 82:84]) * xp.astype(sc >> 4, xp.float32)
        q = xp.astype(unpack_2bit(data[:, 16:80]).reshape(-1, 16, 16), xp.float32)
        return (dl[:, :, None] * q - ml[:, :, None]).reshape(-1, QK_K)


# [hmask: 32 B, bit j // 32 of byte j % 32 = high bit of value j][qs: 64 B, low 2 bits]
# [scales: 12 B, 16 six-bit scales offset by 32][d: f16]; x = d * (sc - 32) * (q - 4)
class Q3_K(_KQuant, qtype=T.Q3_K):
    bits = 3
    compiled_faster = (False, True)  # make_q3_quants (no importance) is not compiled

    @classmethod
    def encode_blocks(cls, blocks):
        xp = array_namespace(blocks)
        n = blocks.shape[0]
        scales, codes = make_q3_quants(blocks.reshape(-1, 16), 4)
        scales = scales.reshape(n, 16)
        max_scale = _signed_max_scale(xp, scales)
        live = max_scale != 0
        with errstate(blocks):
            iscale = const(xp, -32, scales) / xp.where(live, max_scale, const(xp, 1, scales))
        # `int8_t l = nearest_int(...)`, clamped to -32..31, stored offset by 32
        l6 = xp.clip(xp.astype(nearest_int(iscale[:, None] * scales), xp.int8), -32, 31) + 32
        l6 = xp.astype(xp.where(live[:, None], l6, const(xp, 0, l6)), xp.uint8)
        d = xp.where(live, const(xp, 1, iscale) / iscale, const(xp, 0, iscale))
        return cls._finish(blocks, codes, l6, d)

    @classmethod
    def encode_blocks_weighted(cls, blocks, weights):
        # `quantize_row_q3_K_impl`: sigma2 = 2 sum(x^2) / QK_K, weighted make_qx_quants per sub-block,
        # then the 16 scales themselves by make_qx_quants(nmax 32) weighted by the sub-block sums
        n = blocks.shape[0]
        w = _superblock_weights(blocks, weights, 2)
        scales, codes = make_qx_quants(blocks.reshape(-1, 16), 4, w.reshape(-1, 16))
        d, l6 = make_qx_quants(scales.reshape(n, 16), 32, _sub_sums(w, 16))
        return cls._finish(blocks, codes, l6, d)

    @classmethod
    def _finish(cls, blocks, codes, l6, d):
        xp = array_namespace(blocks)
        n = blocks.shape[0]
        sc = xp.astype(bitcast(l6, "int8") - 32, xp.float32)
        dl = f16_round(d)[:, None] * sc
        codes = requantize(blocks.reshape(n, 16, 16), codes.reshape(n, 16, 16), dl, None, -4, 3)
        codes = codes.reshape(n, QK_K)
        hmask = pack_bits(xp.astype(codes > 3, xp.uint8).reshape(n, 8, 32))
        return xp.concat([hmask, pack_2bit(codes & 3), pack_q3_scales(l6), _f16_bytes(d)], axis=1)

    @classmethod
    def decode_blocks(cls, data):
        xp = array_namespace(data)
        dl = f16_value(data[:, 108:110]) * xp.astype(unpack_q3_scales(data[:, 96:108]), xp.float32)
        high = unpack_bits(data[:, :32])
        q = xp.astype(unpack_2bit(data[:, 32:96]), xp.int8) - xp.astype((high ^ 1) << 2, xp.int8)
        return (dl[:, :, None] * xp.astype(q.reshape(-1, 16, 16), xp.float32)).reshape(-1, QK_K)


# [d: f16][dmin: f16][scales: 12 B, 8 six-bit scales + 8 six-bit mins (get_scale_min_k4)]
# [qs: 128 B, byte 32 c + l = values 64 c + l (lo nibble), 64 c + 32 + l (hi)]; x = d * sc * q - dmin * m
class Q4_K(_AsymmetricK4, qtype=T.Q4_K):
    bits = 4
    nmax, rmin, nstep = 15, -1.0, 20

    @classmethod
    def _pack(cls, header, codes):
        return array_namespace(header).concat([header, pack_nibbles_k(codes)], axis=1)

    @classmethod
    def _codes(cls, data):
        return unpack_nibbles_k(data[:, 16:])

    @classmethod
    def decode_blocks(cls, data):
        return _asymmetric_k4_decode(data, cls._codes(data))


# [d: f16][dmin: f16][scales: 12 B as Q4_K][qh: 32 B, bit 2 c (+1) of byte l = bit 4 of value 64 c + l
# (+ 32)][qs: 128 B low nibbles as Q4_K]; x = d * sc * q - dmin * m, q in 0..31
class Q5_K(_AsymmetricK4, qtype=T.Q5_K):
    bits = 5
    nmax, rmin, nstep = 31, -0.5, 15

    @classmethod
    def _pack(cls, header, codes):
        qh = pack_bits((codes >> 4).reshape(-1, 8, 32))
        return array_namespace(header).concat([header, qh, pack_nibbles_k(codes)], axis=1)

    @classmethod
    def _codes(cls, data):
        return unpack_nibbles_k(data[:, 48:]) | (unpack_bits(data[:, 16:48]) << 4)

    @classmethod
    def decode_blocks(cls, data):
        return _asymmetric_k4_decode(data, cls._codes(data))


# [ql: 128 B low nibbles][qh: 64 B, 2 high bits][scales: 16 x int8][d: f16]; x = d * sc * (q - 32)
# Per half h of 128 values: ql[64 h + l] = v[l] | v[l + 64] << 4, ql[64 h + 32 + l] = v[l + 32] | v[l + 96] << 4,
# qh[32 h + l] = v[l] >> 4 | v[l + 32] >> 4 << 2 | v[l + 64] >> 4 << 4 | v[l + 96] >> 4 << 6.
class Q6_K(_KQuant, qtype=T.Q6_K):
    bits = 6
    compiled_faster = (True, True)

    @classmethod
    def encode_blocks(cls, blocks):
        return cls._encode(blocks, None)  # weights x^2 (rmse_type 1)

    @classmethod
    def encode_blocks_weighted(cls, blocks, weights):
        return cls._encode(blocks, weights)  # `quantize_row_q6_K_impl`: the importance itself

    @classmethod
    def _encode(cls, blocks, weights):
        xp = array_namespace(blocks)
        n = blocks.shape[0]
        scales, codes = make_qx_quants(
            blocks.reshape(-1, 16), 32, None if weights is None else weights.reshape(-1, 16)
        )
        scales = scales.reshape(n, 16)
        max_scale = _signed_max_scale(xp, scales)
        live = xp.abs(max_scale) >= const(xp, GROUP_MAX_EPS, scales)
        with errstate(blocks):
            iscale = const(xp, -128, scales) / xp.where(live, max_scale, const(xp, 1, scales))
            d = const(xp, 1, iscale) / iscale
        sc = xp.astype(
            xp.minimum(nearest_int(iscale[:, None] * scales), const(xp, 127, live, xp.int32)), xp.int8
        )
        dl = f16_round(d)[:, None] * xp.astype(sc, xp.float32)
        codes = requantize(blocks.reshape(n, 16, 16), codes.reshape(n, 16, 16), dl, None, -32, 31)
        out = pack_q6(codes, sc, _f16_bytes(d))
        out[~live] = 0  # an all-zero super-block is all zero bytes
        return out

    @classmethod
    def refine_blocks(cls, blocks, weights, data):
        return refine_q6(blocks, weights, data, pack_q6)

    supports_grid = True

    @classmethod
    def grid_blocks(cls, data):
        return grid_q6(data, cls._codes(data))

    @classmethod
    def with_codes(cls, data, codes):
        return pack_q6(codes.astype("uint8"), q6_scales(data), contiguous(data[:, 208:210]))

    @classmethod
    def _codes(cls, data):
        return unpack_q6(data)

    @classmethod
    def decode_blocks(cls, data):
        xp = array_namespace(data)
        dl = f16_value(data[:, 208:210]) * xp.astype(
            bitcast(contiguous(data[:, 192:208]), "int8"), xp.float32
        )
        q = xp.astype(cls._codes(data).reshape(-1, 16, 16), xp.int8) - 32
        return (dl[:, :, None] * xp.astype(q, xp.float32)).reshape(-1, QK_K)
