"""Refinement of K-quant blocks past llama.cpp's encoder: a local search over the sub-block scales.

llama.cpp fits each sub-block's scale (and min) in float, then rounds them to 6 bits (8 bits for
Q6_K) against the super-block's f16 ``d``/``dmin`` and re-rounds the codes once. The stored pair is
near, not at, the best the 6-bit grid offers: here each sub-block tries its neighbouring scale
(and min) codes, the values' codes re-rounded for each, and keeps a candidate only when the
weighted squared error of that sub-block falls. ``d``/``dmin`` stay as encoded, so the result is
never worse than the input, block by block. NumPy only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .kquants_math import f16_value, pack_scale_min_k4, requantize, unpack_scale_min_k4

PASSES = 3  # sweeps over the neighbours; a fourth changes almost nothing on SmolLM2's ffn_down


def _search(
    error: Callable[[np.ndarray, np.ndarray], np.ndarray],
    sc: np.ndarray,
    mn: np.ndarray,
    steps: list[tuple[int, int]],
    lo: int,
    hi: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy per-sub-block descent over (scale, min) code steps, clamped to ``[lo, hi]``."""
    best = error(sc, mn)
    for _ in range(PASSES):
        moved = False
        for ds, dm in steps:
            s2, m2 = np.clip(sc + ds, lo, hi), np.clip(mn + dm, 0, 63)
            e = error(s2, m2)
            better = e < best
            if better.any():
                moved = True
                sc, mn, best = np.where(better, s2, sc), np.where(better, m2, mn), np.where(better, e, best)
        if not moved:
            break
    return sc, mn


def refine_k4(
    blocks: np.ndarray, weights: np.ndarray, data: np.ndarray, nmax: int, pack: Callable[..., np.ndarray]
) -> np.ndarray:
    """Q4_K/Q5_K bytes ``data`` of ``blocks`` ``(n, 256)`` with better 6-bit scales and mins.

    ``weights`` ``(n, 256)`` weigh the squared error; ``pack(header, codes)`` is the type's packer.
    """
    n = blocks.shape[0]
    d, dmin = f16_value(data[:, 0:2]), f16_value(data[:, 2:4])  # (n, 1)
    sc, mn = (v.astype(np.int32) for v in unpack_scale_min_k4(data[:, 4:16]))
    x, w = blocks.reshape(n, 8, 32), weights.reshape(n, 8, 32)
    unset = np.zeros(x.shape, np.uint8)  # a zero scale decodes to -ml whatever the code

    def codes(s: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # the values' codes re-rounded as the encoder's last pass does, and what they decode to
        dl, ml = d * s.astype(np.float32), dmin * m.astype(np.float32)
        q = requantize(x, unset, dl, ml, 0, nmax)
        return q, dl[..., None] * q - ml[..., None]

    def error(s: np.ndarray, m: np.ndarray) -> np.ndarray:
        return (w * (x - codes(s, m)[1]) ** 2).sum(-1)

    steps = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    sc, mn = _search(error, sc, mn, steps, 0, 63)
    q = codes(sc, mn)[0].reshape(n, 256)
    header = np.concatenate(
        [data[:, :4], pack_scale_min_k4(sc.astype(np.uint8), mn.astype(np.uint8))], axis=1
    )
    return pack(header, q)


def refine_q6(
    blocks: np.ndarray, weights: np.ndarray, data: np.ndarray, pack: Callable[..., np.ndarray]
) -> np.ndarray:
    """Q6_K bytes ``data`` of ``blocks`` with better int8 sub-block scales (16 of 16 values each).

    ``pack(codes, sc, d_bytes)`` is Q6_K's packer (codes 0..63); all-zero super-blocks stay zero.
    """
    n = blocks.shape[0]
    d = f16_value(data[:, 208:210])  # (n, 1)
    sc = q6_scales(data).astype(np.int32)
    x, w = blocks.reshape(n, 16, 16), weights.reshape(n, 16, 16)
    unset = np.full(x.shape, 32, np.uint8)

    def codes(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dl = d * s.astype(np.float32)
        q = requantize(x, unset, dl, None, -32, 31)  # 0..63, stored as q + 32
        return q, dl[..., None] * (q.astype(np.float32) - 32)

    def error(s: np.ndarray, _m: np.ndarray) -> np.ndarray:
        return (w * (x - codes(s)[1]) ** 2).sum(-1)

    zero = np.zeros_like(sc)
    sc, _ = _search(error, sc, zero, [(-2, 0), (-1, 0), (1, 0), (2, 0)], -128, 127)
    q = codes(sc)[0].reshape(n, 256)
    out = pack(q, sc.astype(np.int8), np.ascontiguousarray(data[:, 208:210]))
    return np.where(d == 0, data, out)


def q6_scales(data: np.ndarray) -> np.ndarray:
    """Q6_K's 16 int8 sub-block scales ``(n, 16)``."""
    return np.ascontiguousarray(data[:, 192:208]).view(np.int8)


def grid_k4(data: np.ndarray, codes: np.ndarray, nmax: int):
    """`Codec.grid_blocks` of Q4_K/Q5_K bytes: x = (d * sc) * q - dmin * m, per sub-block of 32."""
    sc, mn = (v.astype(np.float32) for v in unpack_scale_min_k4(data[:, 4:16]))
    step, off = f16_value(data[:, 0:2]) * sc, -(f16_value(data[:, 2:4]) * mn)
    return np.repeat(step, 32, axis=1), np.repeat(off, 32, axis=1), codes, 0, nmax


def grid_q6(data: np.ndarray, codes: np.ndarray):
    """`Codec.grid_blocks` of Q6_K bytes: x = d * sc * (q - 32), per sub-block of 16."""
    step = np.repeat(f16_value(data[:, 208:210]) * q6_scales(data).astype(np.float32), 16, axis=1)
    return step, -32 * step, codes, 0, 63
