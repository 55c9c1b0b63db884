"""Importance-weighted scale searches of ggml-quants.c, vectorized over blocks.

Each function mirrors one llama.cpp helper in float32 arithmetic and in the C code's operation
order (sums are accumulated sequentially, as the compiled library does without fast-math), so the
chosen scales and codes are byte-identical to llama.cpp's up to rare rounding ties.

Layout: inputs are ``(n, k)`` (``n`` independent blocks of ``k`` values) and are transposed to
``(k, n)`` internally, so a sequential sum over a block is ``k`` vector adds of contiguous rows.
The K-quant helpers (``make_qkx2_quants``, ``make_qp_quants``, ``make_q3_quants``) live in
``kquants_math``. The searches take NumPy arrays or torch tensors (CPU or CUDA) and return the same
kind, with the same bits (see ``xp``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .xp import Array, array_namespace, const, contiguous, device, errstate, take_rows

_F32 = np.float32
# ggml-quants.c: `#define GROUP_MAX_EPS 1e-15f`, below which a block counts as all zero
GROUP_MAX_EPS = _F32(1e-15)
# Values per chunk of the temporaries (measured best on CPU: cache-sized, yet long numpy calls).
_CHUNK_VALUES = 1 << 19
# NumPy inputs take the compiled `make_qx_quants`/`make_qkx3_quants` (`qkx_jit`, same bytes); False:
# the array versions
COMPILED = True
# sub-blocks per call of the compiled search: its (k, lanes) scratch stays in the L1/L2 cache
_JIT_LANES = 512


def seq_sum(t: Array, from_zero: bool = True) -> Array:
    """Sum ``t`` over axis 0 one term at a time in float32, as a C ``for`` loop accumulates.

    With ``from_zero`` the accumulator starts at ``0.0f`` (``float s = 0; s += t[i]``); otherwise
    it starts at ``t[0]`` (``float s = t[0]; for i >= 1 ...``).
    """
    xp = array_namespace(t)
    # NumPy reduces a C-ordered leading axis row by row into the accumulator: the same sums (a
    # single column would be summed pairwise instead, hence at least two per row)
    numpy_rows = isinstance(t, np.ndarray) and t.dtype == np.float32 and t.flags.c_contiguous
    if from_zero and numpy_rows and t.size >= 2 * t.shape[0]:
        return np.add.reduce(t, axis=0, initial=_F32(0))
    if from_zero:
        s = xp.zeros(t.shape[1:], dtype=xp.float32, device=device(t))
        for row in t:
            s += row
    else:
        s = xp.astype(t[0], xp.float32, copy=True)
        for row in t[1:]:
            s += row
    return s


def nearest_int(v: Array) -> Array:
    """ggml's `nearest_int`: round half to even (the 1.5 * 2^23 trick), kept as float32."""
    return array_namespace(v).round(v)


def row_sigma2(rows: np.ndarray) -> np.ndarray:
    """``sum(x^2) / n_per_row`` of each row of ``(n_rows, K)``, summed sequentially like the `_impl`s."""
    k = rows.shape[1]
    out = np.empty(rows.shape[0], _F32)
    step = max(1, _CHUNK_VALUES * 2 // k)
    for s in range(0, rows.shape[0], step):
        part = rows[s : s + step]
        # np.cumsum is a strictly sequential accumulate (no pairwise summation)
        out[s : s + step] = np.cumsum(part * part, axis=1, dtype=_F32)[:, -1]
    return (out / _F32(k)).astype(_F32)


def importance_weights(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Per-element weights ``qw[j] = importance[j] * sqrt(sigma2 + x[j]^2)`` of ``(n_rows, K)`` rows.

    Mirrors the weight line of `quantize_row_q4_0_impl` and its siblings; ``sigma2`` is the row's
    mean square. Returns float32 of the rows' shape.
    """
    rows = np.asarray(rows, _F32)
    sigma2 = row_sigma2(rows)[:, None]
    return (importance.astype(_F32)[None, :] * np.sqrt(sigma2 + rows * rows)).astype(_F32)


def _in_lanes(x: np.ndarray, w: np.ndarray, run: Callable[..., None]) -> np.ndarray:
    """Codes ``(n, k)`` of a compiled search (`qkx_jit`) run as ``run(xt, wt, rows, codes_t)`` on
    `_JIT_LANES` sub-blocks at a time, values and weights transposed to ``(k, lanes)``."""
    n, k = x.shape
    codes = np.empty((n, k), np.uint8)
    for a in range(0, n, _JIT_LANES):
        rows = slice(a, min(a + _JIT_LANES, n))
        ct = np.zeros((k, rows.stop - a), np.uint8)
        run(np.ascontiguousarray(x[rows].T), np.ascontiguousarray(w[rows].T), rows, ct)
        codes[rows] = ct.T
    return codes


def _chunks(n: int, per_block: int):
    step = max(1, _CHUNK_VALUES // max(per_block, 1))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def make_qx_quants(x: Array, nmax: int, weights: Array | None = None) -> tuple[Array, Array]:
    """Symmetric weighted scale search; ggml's `make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`.

    Tries the scale ``max / -nmax`` and 18 neighbours ``max / -(nmax + 0.1 i)``; for each, rounds the
    codes and refits the scale by weighted least squares, keeping the candidate with the largest
    ``sumlx^2 / suml2`` (the least weighted squared error).

    Args:
        x: ``(n, k)`` float32 blocks (NumPy or torch).
        nmax: codes are ``-nmax .. nmax - 1`` (8 for 4-bit, 16 for 5-bit).
        weights: ``(n, k)`` non-negative weights, or None for ``x^2`` (``rmse_type`` 1 without ``qw``).

    Returns:
        ``scale`` ``(n,)`` float32 and codes ``L`` ``(n, k)`` uint8 offset by ``nmax`` (``0 .. 2 nmax - 1``),
        so that ``x ~= scale * (L - nmax)``. All-zero blocks get scale 0 and codes 0.
    """
    xp = array_namespace(x)
    x = xp.astype(x, xp.float32, copy=False)
    w = x * x if weights is None else xp.astype(weights, xp.float32, copy=False)
    n, k = x.shape
    # candidate order of the C loop: the plain scale first, then is = -9..-1, 1..9
    steps = np.array([0, *range(-9, 0), *range(1, 10)], _F32)
    numer = np.where(steps == 0, _F32(nmax), _F32(nmax) + _F32(0.1) * steps).astype(_F32)[:, None]
    numer = xp.asarray(numer, device=device(x))
    if COMPILED and isinstance(x, np.ndarray):  # the same search compiled, sub-blocks as lanes
        from . import qkx_jit  # numba's import only where it is used

        num, scale = np.ascontiguousarray(numer[:, 0]), np.empty(n, _F32)
        codes = _in_lanes(
            x, w, lambda xt, wt, sl, c: qkx_jit.make_qx(xt, wt, nmax, num, GROUP_MAX_EPS, scale[sl], c)
        )
        return scale, codes
    scale = xp.zeros(n, dtype=xp.float32, device=device(x))
    codes = xp.zeros((n, k), dtype=xp.uint8, device=device(x))
    for sl in _chunks(n, k * numer.shape[0]):
        scale[sl], codes[sl] = _make_qx_chunk(x[sl], w[sl], nmax, numer)
    return scale, codes


def _make_qx_chunk(x: Array, w: Array, nmax: int, numer: Array) -> tuple[Array, Array]:
    xp = array_namespace(x)
    n = x.shape[0]
    mx = take_rows(xp, x, xp.argmax(xp.abs(x), axis=1))  # first of equal magnitudes (C's strict `>`)
    zero = xp.abs(mx) < const(xp, GROUP_MAX_EPS, x)
    mx = xp.where(zero, const(xp, 1, x), mx)
    xt, wt = contiguous(x.T), contiguous(w.T)
    iscale = -numer / mx[None, :]  # (C, n): `-(nmax + 0.1f*is) / max`
    l = xp.clip(nearest_int(iscale[None] * xt[:, None]), -nmax, nmax - 1)  # (k, C, n)
    sumlx = seq_sum((wt * xt)[:, None] * l)  # `w*x[i]*l`
    suml2 = seq_sum(wt[:, None] * l * l)  # `w*l*l`
    with errstate(x):
        fit = sumlx / suml2
    scale = xp.where(suml2[0] != 0, fit[0], const(xp, 0, x))
    best = scale * sumlx[0]
    choice = xp.zeros(n, dtype=xp.int64, device=device(x))
    for c in range(1, numer.shape[0]):
        better = (suml2[c] > 0) & (sumlx[c] * sumlx[c] > best * suml2[c])
        scale = xp.where(better, fit[c], scale)
        best = xp.where(better, scale * sumlx[c], best)
        choice = xp.where(better, const(xp, c, choice), choice)
    codes = xp.take_along_axis(l, choice[None, None, :], axis=1)[:, 0] + const(xp, nmax, x)
    codes[:, zero] = 0
    return xp.where(zero, const(xp, 0, x), scale), xp.astype(codes.T, xp.uint8)


def make_qkx3_quants(
    x: Array,
    nmax: int,
    weights: Array | None = None,
    rmin: float = -0.9,
    rdelta: float = 0.05,
    nstep: int = 36,
    use_mad: bool = False,
) -> tuple[Array, Array, Array]:
    """Asymmetric weighted scale/min search; ggml's `make_qkx3_quants`.

    Starts from the min/max fit (the min clamped to at most 0), then for ``is = 0 .. nstep`` tries
    ``iscale = (rmin + rdelta * is + nmax) / (max - min)``, fits scale and min by weighted least
    squares on the rounded codes, and keeps a candidate only if it lowers the weighted error. As in
    the C code, an accepted candidate's min feeds the next candidates' rounding.

    Args:
        x: ``(n, k)`` float32 blocks (NumPy or torch).
        nmax: the top code (15 for 4-bit, 31 for 5-bit).
        weights: ``(n, k)`` non-negative weights, or None for ``x^2``.
        rmin, rdelta, nstep: the search grid, as the caller passes them to ggml.
        use_mad: weigh absolute instead of squared differences.

    Returns:
        ``scale`` ``(n,)``, ``m`` ``(n,)`` (float32, ``m <= 0``; ggml's ``-the_min``) and codes ``L``
        ``(n, k)`` uint8 in ``0 .. nmax``, so that ``x ~= scale * L + m``.
    """
    xp = array_namespace(x)
    x = xp.astype(x, xp.float32, copy=False)
    w = x * x if weights is None else xp.astype(weights, xp.float32, copy=False)
    n, k = x.shape
    dev = device(x)
    scale, m = xp.zeros(n, dtype=xp.float32, device=dev), xp.zeros(n, dtype=xp.float32, device=dev)
    grid = (_F32(rmin) + _F32(rdelta) * np.arange(nstep + 1, dtype=_F32) + _F32(nmax)).astype(_F32)
    if COMPILED and isinstance(x, np.ndarray):  # the same search compiled, sub-blocks as lanes
        from . import qkx_jit  # numba's import only where it is used

        codes = _in_lanes(
            x, w, lambda xt, wt, sl, c: qkx_jit.make_qkx3(xt, wt, nmax, grid, use_mad, scale[sl], m[sl], c)
        )
        return scale, m, codes
    codes = xp.zeros((n, k), dtype=xp.uint8, device=dev)
    grid = xp.asarray(grid, device=dev)
    for sl in _chunks(n, 2 * k):
        scale[sl], m[sl], codes[sl] = _make_qkx3_chunk(x[sl], w[sl], nmax, grid, use_mad)
    return scale, m, codes


def _make_qkx3_chunk(x: Array, w: Array, nmax: int, grid: Array, use_mad: bool) -> tuple[Array, Array, Array]:
    xp = array_namespace(x)
    zero_c = const(xp, 0, x)
    mn = take_rows(xp, x, xp.argmin(x, axis=1))  # the first minimum, so -0.0 vs 0.0 follows the C loop
    mx = xp.max(x, axis=1)
    xt, wt = contiguous(x.T), contiguous(w.T)
    sum_w = seq_sum(wt, from_zero=False)
    sum_x = seq_sum(wt * xt, from_zero=False)
    mn = xp.where(mn > 0, zero_c, mn)
    flat = mx <= mn

    def error(s: Array, mm: Array, l: Array) -> Array:
        diff = s * l + mm - xt  # `scale * L[i] + min - x[i]`
        return seq_sum(wt * (xp.abs(diff) if use_mad else diff * diff))

    with errstate(x):
        iscale = const(xp, nmax, x) / (mx - mn)
        scale = const(xp, 1, x) / iscale
        codes = xp.clip(nearest_int(iscale * (xt - mn)), 0, nmax)
        best = error(scale, mn, codes)
        for gi in range(grid.shape[0]):
            iscale = grid[gi] / (mx - mn)
            l = xp.clip(nearest_int(iscale * (xt - mn)), 0, nmax)
            wl = wt * l
            sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * l), seq_sum(wl * xt)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_min = xp.where(pos, zero_c, this_min)
            this_scale = xp.where(pos, sum_xl / sum_l2, this_scale)
            mad = error(this_scale, this_min, l)
            better = (det > 0) & (mad < best) & ~flat
            codes = xp.where(better, l, codes)
            best = xp.where(better, mad, best)
            scale = xp.where(better, this_scale, scale)
            mn = xp.where(better, this_min, mn)
    codes[:, flat] = 0
    scale = xp.where(flat, zero_c, scale)
    return scale, mn, xp.astype(codes.T, xp.uint8)
