"""Sub-block searches and scale packing of llama.cpp's K-quants, vectorized over sub-blocks.

Mirrors of the ggml-quants.c helpers the round-to-nearest K-quant encoders use (`make_qkx2_quants`,
`make_q3_quants`, `nearest_int`) and of the 6-bit scale layouts (`get_scale_min_k4` for Q4_K/Q5_K,
the 16 signed scales of Q3_K). As in ``quants_math``, arithmetic is float32 in the C operation
order and sums run one term at a time, so the results are byte-identical to llama.cpp's.

Inputs are ``(n, k)``: ``n`` independent sub-blocks of ``k`` values, transposed to ``(k, n)``
internally so each step of a sequential sum is one vector operation. NumPy arrays and torch tensors
(CPU or CUDA) are both accepted and give the same bits (see ``xp``).
"""

from __future__ import annotations

from .quants_math import GROUP_MAX_EPS, make_qkx3_quants, seq_sum
from .xp import Array, array_namespace, bitcast, const, contiguous, device, errstate, take_rows

# Sub-blocks per chunk of temporaries, so a search's scratch stays cache-sized.
_CHUNK_VALUES = 1 << 17


def nearest_int(v: Array) -> Array:
    """ggml's `nearest_int` bit for bit: add 1.5 * 2^23 in float32, keep the low 23 bits, re-centre.

    Round half to even for ``|v| < 2^22``; beyond that (or for inf/nan) the same wrapped value the
    C code gets, which its callers then clamp. Returns int32.
    """
    xp = array_namespace(v)
    v = xp.astype(v, xp.float32, copy=False)
    with errstate(v):
        bits = bitcast(v + const(xp, 12582912.0, v), "int32")
    return (bits & 0x007FFFFF) - 0x00400000


def f16_round(v: Array) -> Array:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: float32 rounded through IEEE half (to nearest even)."""
    xp = array_namespace(v)
    with errstate(v):
        return xp.astype(xp.astype(v, xp.float16), xp.float32)


def f16_value(b: Array) -> Array:
    """The float32 value of f16 fields stored as bytes ``(n, 2)``: ``(n, 1)``."""
    xp = array_namespace(b)
    return xp.astype(bitcast(contiguous(b), "float16"), xp.float32)


def requantize(x: Array, codes: Array, d: Array, dm: Array | None, lo: int, hi: int) -> Array:
    """Redo the codes with the stored (rounded) sub-block scales, as each `_ref` encoder's last pass.

    ``x``/``codes``: ``(n, subs, size)``; ``d``/``dm``: ``(n, subs)``. Sub-blocks whose scale is 0
    keep the search's codes; others get ``clamp(nearest_int((x + dm) / d), lo, hi) - lo``.
    """
    xp = array_namespace(x)
    live = d != 0
    with errstate(x):
        v = x if dm is None else x + dm[..., None]
        l = xp.clip(nearest_int(v / xp.where(live, d, const(xp, 1, d))[..., None]), lo, hi) - lo
    return xp.where(live[..., None], xp.astype(l, xp.uint8), codes)


def _chunks(n: int, k: int):
    step = max(1, _CHUNK_VALUES // k)
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def make_qkx2_quants(
    x: Array, weights: Array, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[Array, Array, Array]:
    """Asymmetric scale/min search of each sub-block; ggml's `make_qkx2_quants`.

    ggml's `make_qkx2_quants` and `make_qkx3_quants` run the same search (start from the min/max
    fit, try ``iscale = (rmin + rdelta * is + nmax) / (max - min)`` for ``is = 0 .. nstep``, refit
    scale and min by weighted least squares, keep a candidate that lowers the weighted error); they
    differ only in where the weights come from, so this is `make_qkx3_quants` with explicit weights.

    Returns:
        ``scale`` ``(n,)``, ``the_min`` ``(n,)`` (ggml's positive ``-min``) and codes ``(n, k)``
        uint8 in ``0 .. nmax``, so that ``x ~= scale * L - the_min``.
    """
    scale, m, codes = make_qkx3_quants(x, nmax, weights, rmin, rdelta, nstep, use_mad)
    return scale, -m, codes


def make_qp_quants(x: Array, nmax: int, weights: Array) -> tuple[Array, Array]:
    """Weighted search for the super-block scale of non-negative values; ggml's `make_qp_quants`.

    Used by the importance-weighted K-quant encoders to quantize the sub-block scales and mins to
    ``nmax`` (15 or 63) levels. Tries ``iscale = (nmax + 0.1 is) / max`` for ``is = -4 .. 4`` by
    weighted squared error, then up to five passes move single codes to their least-squares best
    (a pass that changes nothing leaves the state as it is, so all five run on every block).

    Args:
        x: ``(n, k)`` float32 values (scales or mins of ``k`` sub-blocks).
        nmax: the top code.
        weights: ``(n, k)`` float32 weights (the sub-blocks' summed element weights).

    Returns:
        ``scale`` ``(n,)`` float32 and codes ``(n, k)`` uint8 (as C stores ``int`` into ``uint8_t``).
    """
    xp = array_namespace(x)
    x = xp.astype(x, xp.float32, copy=False)
    n, k = x.shape
    xt, wt = contiguous(x.T), contiguous(xp.astype(weights, xp.float32, copy=False).T)
    c = lambda v: const(xp, v, x)  # noqa: E731
    mx = xp.maximum(xp.max(xt, axis=0), c(0))  # `max = MAX(max, x[i])` from 0
    zero = mx < c(GROUP_MAX_EPS)
    mx = xp.where(zero, c(1), mx)

    def codes(iscale: Array, clamp: bool, store: bool) -> Array:
        l = nearest_int(iscale * xt)
        if clamp:
            l = xp.minimum(l, const(xp, nmax, l))
        return xp.astype((l & 0xFF) if store else l, xp.float32)  # `L[i] = l` wraps into a uint8_t

    def mse(scale: Array, l: Array) -> Array:
        diff = xt - scale * l
        return seq_sum(wt * diff * diff)

    with errstate(x):
        iscale = c(nmax) / mx
        best = mse(c(1) / iscale, codes(iscale, False, True))
        for i in (-4, -3, -2, -1, 1, 2, 3, 4):
            iscale_i = (c(0.1) * c(i) + c(nmax)) / mx
            cur = mse(c(1) / iscale_i, codes(iscale_i, True, False))
            better = cur < best
            best = xp.where(better, cur, best)
            iscale = xp.where(better, iscale_i, iscale)
        L = codes(iscale, True, True)
        wx = wt * xt
        sumlx, suml2 = seq_sum(wx * L), seq_sum(wt * L * L)
        for _ in range(5):
            for i in range(k):
                li = L[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - wt[i] * li * li
                ok = (slx > 0) & (sl2 > 0)
                new = nearest_int(xt[i] * sl2 / xp.where(ok, slx, c(1)))
                new = xp.astype(xp.minimum(new, const(xp, nmax, new)), xp.float32)
                slx2 = slx + wx[i] * new
                sl22 = sl2 + wt[i] * new * new
                take = ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[i] = xp.where(take, xp.astype(xp.astype(new, xp.int32) & 0xFF, xp.float32), li)
                sumlx = xp.where(take, slx2, sumlx)
                suml2 = xp.where(take, sl22, suml2)
        scale = xp.where(suml2 > 0, sumlx / suml2, c(0))
    out = xp.astype(L.T, xp.uint8)
    out[zero] = 0
    return xp.where(zero, c(0), scale), out


def make_q3_quants(x: Array, nmax: int) -> tuple[Array, Array]:
    """Symmetric search with per-value refinement; ggml's `make_q3_quants(n, nmax, x, L, do_rmse=true)`.

    Rounds with ``iscale = -nmax / max`` (``max`` the value of largest magnitude), then up to five
    passes move single codes to their least-squares best (weights ``x^2``) when that raises
    ``sumlx^2 / suml2``. A block that stops changing stays put, so running all five passes on every
    block gives the C result.

    Returns:
        ``scale`` ``(n,)`` float32 and codes ``(n, k)`` uint8 in ``0 .. 2 nmax - 1`` (offset by
        ``nmax``); all-zero sub-blocks get scale 0 and codes 0.
    """
    xp = array_namespace(x)
    x = xp.astype(x, xp.float32, copy=False)
    n, k = x.shape
    scale = xp.zeros(n, dtype=xp.float32, device=device(x))
    codes = xp.zeros((n, k), dtype=xp.uint8, device=device(x))
    for sl in _chunks(n, k):
        scale[sl], codes[sl] = _q3_chunk(x[sl], nmax)
    return scale, codes


def _q3_chunk(x: Array, nmax: int) -> tuple[Array, Array]:
    xp = array_namespace(x)
    c = lambda v: const(xp, v, x)  # noqa: E731
    mx = take_rows(xp, x, xp.argmax(xp.abs(x), axis=1))  # first of equal magnitudes (strict `>`)
    zero = xp.abs(mx) < c(GROUP_MAX_EPS)
    xt = contiguous(x.T)
    w = xt * xt
    wx = w * xt
    with errstate(x):
        iscale = c(-nmax) / xp.where(zero, c(1), mx)
        L = xp.astype(xp.clip(nearest_int(iscale * xt), -nmax, nmax - 1), xp.float32)
        sumlx = seq_sum(wx * L)
        suml2 = seq_sum(w * L * L)
        for _ in range(5):
            for i in range(xt.shape[0]):
                li = L[i]
                slx = sumlx - wx[i] * li
                sl2 = suml2 - w[i] * li * li
                new = xp.astype(xp.clip(nearest_int(xt[i] * sl2 / slx), -nmax, nmax - 1), xp.float32)
                slx2 = slx + wx[i] * new
                sl22 = sl2 + w[i] * new * new
                take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[i] = xp.where(take, new, li)
                sumlx = xp.where(take, slx2, sumlx)
                suml2 = xp.where(take, sl22, suml2)
        scale = xp.where(suml2 > 0, sumlx / suml2, c(0))
    codes = xp.astype(L + c(nmax), xp.uint8)
    codes[:, zero] = 0
    return xp.where(zero, c(0), scale), codes.T


# -- scale layouts -------------------------------------------------------------------------------


def pack_scale_min_k4(ls: Array, lm: Array) -> Array:
    """Pack 8 six-bit scales and 8 six-bit mins ``(n, 8)`` uint8 into Q4_K/Q5_K's 12 bytes.

    Bytes 0-3 / 4-7: scale / min of sub-blocks 0-3 (low 6 bits), their top 2 bits carrying the high
    bits of sub-blocks 4-7; bytes 8-11: low nibbles of sub-blocks 4-7 (scale low, min high).
    """
    xp = array_namespace(ls)
    return xp.concat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )


def unpack_scale_min_k4(s: Array) -> tuple[Array, Array]:
    """`get_scale_min_k4` for all 8 sub-blocks: 12 bytes ``(n, 12)`` -> scales, mins ``(n, 8)`` uint8."""
    xp = array_namespace(s)
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = xp.concat([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = xp.concat([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, m


def pack_q3_scales(l6: Array) -> Array:
    """Pack 16 six-bit scales ``(n, 16)`` uint8 (already offset by 32) into Q3_K's 12 bytes.

    Bytes 0-7: low nibbles of sub-blocks 0-7 (low half) and 8-15 (high half); bytes 8-11: the top
    2 bits, sub-block j in byte ``8 + j % 4`` at bit ``2 * (j // 4)``.
    """
    xp = array_namespace(l6)
    top = xp.reshape(l6 >> 4, (-1, 4, 4))  # [j // 4, j % 4]
    low = (l6[:, :8] & 0x0F) | ((l6[:, 8:] & 0x0F) << 4)
    return xp.concat([low, top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)], axis=1)


def unpack_q3_scales(s: Array) -> Array:
    """Q3_K's 12 scale bytes ``(n, 12)`` -> the 16 signed scales ``(n, 16)`` int8 (``- 32`` applied)."""
    xp = array_namespace(s)
    low = xp.concat([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=1)
    top = xp.concat([(s[:, 8:] >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1)  # j = 4 (j // 4) + j % 4
    return bitcast(low | (top << 4), "int8") - 32


def pack_2bit(codes: Array) -> Array:
    """``(n, 256)`` codes 0..3 -> 64 bytes: byte ``32 h + l`` holds values ``128 h + 32 s + l`` at bits ``2 s``."""
    xp = array_namespace(codes)
    q = xp.reshape(codes, (-1, 2, 4, 32))
    return xp.reshape(q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6), (-1, 64))


def unpack_2bit(qs: Array) -> Array:
    """Inverse of `pack_2bit`: 64 bytes ``(n, 64)`` -> ``(n, 256)`` codes in value order."""
    xp = array_namespace(qs)
    q = xp.reshape(qs, (-1, 2, 1, 32))
    return xp.reshape(xp.concat([(q >> shift) & 3 for shift in (0, 2, 4, 6)], axis=2), (-1, 256))


def pack_nibbles_k(codes: Array) -> Array:
    # byte 32 c + l: value 64 c + l in the low nibble, 64 c + 32 + l in the high one
    q = codes.reshape(-1, 4, 2, 32)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)


def unpack_nibbles_k(qs: Array) -> Array:
    xp = array_namespace(qs)
    q = qs.reshape(-1, 4, 1, 32)
    return xp.concat([q & 0x0F, q >> 4], axis=2).reshape(-1, 256)


def unpack_bits(b: Array) -> Array:
    # inverse of `pack_bits`: bit j of byte l is value 32 j + l
    xp = array_namespace(b)
    return xp.concat([(b >> j) & 1 for j in range(8)], axis=1)


def pack_q6(codes: Array, sc: Array, d_bytes: Array) -> Array:
    """Q6_K bytes from codes ``(n, 256)`` in 0..63, int8 scales ``(n, 16)`` and ``d``'s two bytes."""
    xp = array_namespace(codes)
    n = codes.shape[0]
    v = codes.reshape(n, 2, 4, 32)  # [half, quarter, l]
    ql = xp.concat([v[:, :, 0] & 0x0F, v[:, :, 1] & 0x0F], axis=2) | (
        xp.concat([v[:, :, 2] & 0x0F, v[:, :, 3] & 0x0F], axis=2) << 4
    )
    top = v >> 4
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
    return xp.concat([ql.reshape(n, 128), qh.reshape(n, 64), bitcast(sc, "uint8"), d_bytes], axis=1)


def unpack_q6(data: Array) -> Array:
    """Q6_K's codes ``(n, 256)`` in 0..63 from its bytes (inverse of `pack_q6`)."""
    xp = array_namespace(data)
    ql = data[:, :128].reshape(-1, 2, 2, 32)  # [half, first/second 32 bytes, l]
    q = xp.concat([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)  # [half, quarter, l]
    qh = data[:, 128:192].reshape(-1, 2, 1, 32)
    return (q | (xp.concat([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=2) << 4)).reshape(-1, 256)
