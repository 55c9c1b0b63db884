"""Refinement of K-quant blocks past llama.cpp's encoder: a local search over the sub-block scales.

llama.cpp fits each sub-block's scale (and min) in float, then rounds them to 6 bits (8 bits for
Q6_K) against the super-block's f16 ``d``/``dmin`` and re-rounds the codes once. The stored pair is
near, not at, the best the 6-bit grid offers: here each sub-block tries its neighbouring scale
(and min) codes, the values' codes re-rounded for each, and keeps a candidate only when the
weighted squared error of that sub-block falls. ``d``/``dmin`` stay as encoded, so the result is
never worse than the input, block by block. NumPy arrays or torch tensors (CPU or CUDA): errors
are float32 sums taken one term at a time, so every backend makes the same choices (same bytes).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .kquants_math import f16_value, pack_scale_min_k4, requantize, unpack_scale_min_k4
from .quants_math import seq_sum
from .xp import Array, array_namespace, bitcast, const, contiguous, device

PASSES = 3  # sweeps over the neighbours; a fourth changes almost nothing on SmolLM2's ffn_down
# NumPy inputs take the compiled descent of `krefine_jit` (same bytes); False: the array version
COMPILED = True


def _search(
    error: Callable[[Array, Array], Array],
    sc: Array,
    mn: Array,
    steps: list[tuple[int, int]],
    lo: int,
    hi: int,
) -> tuple[Array, Array]:
    """Greedy per-sub-block descent over (scale, min) code steps, clamped to ``[lo, hi]``."""
    xp = array_namespace(sc)
    best = error(sc, mn)
    for _ in range(PASSES):
        moved = False
        for ds, dm in steps:
            s2, m2 = xp.clip(sc + ds, lo, hi), xp.clip(mn + dm, 0, 63)
            e = error(s2, m2)
            better = e < best
            if bool(xp.any(better)):
                moved = True
                sc, mn, best = xp.where(better, s2, sc), xp.where(better, m2, mn), xp.where(better, e, best)
        if not moved:
            break
    return sc, mn


def _search_compiled(
    x: np.ndarray,
    w: np.ndarray,
    d: np.ndarray,
    dmin: np.ndarray,
    sc: np.ndarray,
    mn: np.ndarray,
    steps: list[tuple[int, int]],
    lo: int,
    hi: int,
    qlo: int,
    qhi: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`_search` of NumPy sub-blocks ``x``/``w`` ``(n, subs, size)`` decoding ``d * sc * q - dmin * mn``
    (codes in ``[qlo, qhi]``), compiled by `krefine_jit`: the same choices."""
    from . import krefine_jit  # numba's import only where it is used

    sc, mn = np.array(sc, np.int32), np.array(mn, np.int32)
    krefine_jit.search(
        np.ascontiguousarray(x, np.float32), np.ascontiguousarray(w, np.float32), d.ravel(), dmin.ravel(),
        sc, mn, np.array(steps, np.int32), lo, hi, qlo, qhi, PASSES,
    )  # fmt: skip
    return sc, mn


def _weighted_error(w: Array, x: Array, y: Array) -> Array:
    """``sum(w * (x - y)^2)`` over the last axis, one term at a time in float32: the same bits everywhere."""
    xp = array_namespace(x)
    t = w * (x - y) ** 2
    return seq_sum(contiguous(xp.moveaxis(t, -1, 0)))


def refine_k4(blocks: Array, weights: Array, data: Array, nmax: int, pack: Callable[..., Array]) -> Array:
    """Q4_K/Q5_K bytes ``data`` of ``blocks`` ``(n, 256)`` with better 6-bit scales and mins.

    ``weights`` ``(n, 256)`` weigh the squared error; ``pack(header, codes)`` is the type's packer.
    """
    xp = array_namespace(blocks)
    n = blocks.shape[0]
    d, dmin = f16_value(data[:, 0:2]), f16_value(data[:, 2:4])  # (n, 1)
    sc, mn = (xp.astype(v, xp.int32) for v in unpack_scale_min_k4(data[:, 4:16]))
    x, w = blocks.reshape(n, 8, 32), weights.reshape(n, 8, 32)
    unset = xp.zeros(
        x.shape, dtype=xp.uint8, device=device(x)
    )  # a zero scale decodes to -ml whatever the code

    def codes(s: Array, m: Array) -> tuple[Array, Array]:
        # the values' codes re-rounded as the encoder's last pass does, and what they decode to
        dl, ml = d * xp.astype(s, xp.float32), dmin * xp.astype(m, xp.float32)
        q = requantize(x, unset, dl, ml, 0, nmax)
        return q, dl[..., None] * xp.astype(q, xp.float32) - ml[..., None]

    def error(s: Array, m: Array) -> Array:
        return _weighted_error(w, x, codes(s, m)[1])

    steps = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    if COMPILED and isinstance(x, np.ndarray):  # the same descent, compiled
        sc, mn = _search_compiled(x, w, d, dmin, sc, mn, steps, 0, 63, 0, nmax)
    else:
        sc, mn = _search(error, sc, mn, steps, 0, 63)
    q = codes(sc, mn)[0].reshape(n, 256)
    header = xp.concat(
        [data[:, :4], pack_scale_min_k4(xp.astype(sc, xp.uint8), xp.astype(mn, xp.uint8))], axis=1
    )
    return pack(header, q)


def refine_q6(blocks: Array, weights: Array, data: Array, pack: Callable[..., Array]) -> Array:
    """Q6_K bytes ``data`` of ``blocks`` with better int8 sub-block scales (16 of 16 values each).

    ``pack(codes, sc, d_bytes)`` is Q6_K's packer (codes 0..63); all-zero super-blocks stay zero.
    """
    xp = array_namespace(blocks)
    n = blocks.shape[0]
    d = f16_value(data[:, 208:210])  # (n, 1)
    sc = xp.astype(q6_scales(data), xp.int32)
    x, w = blocks.reshape(n, 16, 16), weights.reshape(n, 16, 16)
    unset = xp.full(x.shape, 32, dtype=xp.uint8, device=device(x))

    def codes(s: Array) -> tuple[Array, Array]:
        dl = d * xp.astype(s, xp.float32)
        q = requantize(x, unset, dl, None, -32, 31)  # 0..63, stored as q + 32
        return q, dl[..., None] * (xp.astype(q, xp.float32) - const(xp, 32, dl))

    def error(s: Array, _m: Array) -> Array:
        return _weighted_error(w, x, codes(s)[1])

    steps = [(-2, 0), (-1, 0), (1, 0), (2, 0)]
    if COMPILED and isinstance(x, np.ndarray):  # the same descent, compiled; no mins
        sc, _ = _search_compiled(x, w, d, np.zeros_like(d), sc, np.zeros_like(sc), steps, -128, 127, -32, 31)
    else:
        sc, _ = _search(error, sc, xp.zeros_like(sc), steps, -128, 127)
    q = codes(sc)[0].reshape(n, 256)
    out = pack(q, xp.astype(sc, xp.int8), contiguous(data[:, 208:210]))
    return xp.where(d == 0, data, out)


def q6_scales(data: Array) -> Array:
    """Q6_K's 16 int8 sub-block scales ``(n, 16)``."""
    return bitcast(contiguous(data[:, 192:208]), "int8")


def grid_k4(data: np.ndarray, codes: np.ndarray, nmax: int):
    """`Codec.grid_blocks` of Q4_K/Q5_K bytes: x = (d * sc) * q - dmin * m, per sub-block of 32."""
    sc, mn = (v.astype(np.float32) for v in unpack_scale_min_k4(data[:, 4:16]))
    step, off = f16_value(data[:, 0:2]) * sc, -(f16_value(data[:, 2:4]) * mn)
    return np.repeat(step, 32, axis=1), np.repeat(off, 32, axis=1), codes, 0, nmax


def grid_q6(data: np.ndarray, codes: np.ndarray):
    """`Codec.grid_blocks` of Q6_K bytes: x = d * sc * (q - 32), per sub-block of 16."""
    step = np.repeat(f16_value(data[:, 208:210]) * q6_scales(data).astype(np.float32), 16, axis=1)
    return step, -32 * step, codes, 0, 63
