"""`quants_math.make_qkx3_quants` and `make_qx_quants` compiled with numba: ggml's ``make_qkx3_quants``
and ``make_qx_quants`` for many sub-blocks at once.

The sub-blocks are the lanes: every loop runs over them innermost, on ``(k, n)`` arrays (value ``i``
of sub-block ``b`` at ``[i, b]``), so the compiler vectorizes across sub-blocks while each sub-block
keeps the C code's own float32 operations in its order (sums one term at a time, ``nearest_int`` by
ggml's bit trick, no fused multiply-adds): the bytes of libggml, checked in
``tests/test_libggml.py``. Compiled on first use and cached; ``nogil``, so encoder threads run it on
all cores.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: ggml's nearest_int
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


@njit(cache=True, nogil=True, error_model="numpy")
def _codes(xt, mn, iscale, i, nmax, tf, ti, out):  # type: ignore[no-untyped-def]
    # clamp(nearest_int(iscale * (x - min)), 0, nmax) of row i, as float32 codes
    n = xt.shape[1]
    for b in range(n):
        tf[b] = iscale[b] * (xt[i, b] - mn[b]) + _MAGIC
    for b in range(n):
        q = (ti[b] & 0x007FFFFF) - 0x00400000
        out[b] = np.float32(min(max(q, 0), nmax))


@njit(cache=True, nogil=True, error_model="numpy")
def make_qkx3(xt, wt, nmax, grid, use_mad, scale, mn, codes):  # type: ignore[no-untyped-def]
    """Fill ``scale``/``mn`` ``(n,)`` float32 and ``codes`` ``(k, n)`` uint8 for sub-blocks ``xt``.

    ``xt``/``wt`` ``(k, n)`` float32 values and weights; ``grid`` the ``rmin + rdelta * is + nmax``
    numerators (float32). ``mn`` is ggml's ``-the_min`` (<= 0); a flat sub-block gets scale 0, codes 0.
    """
    k, n = xt.shape
    mx = np.empty(n, np.float32)
    sum_w = np.empty(n, np.float32)
    sum_x = np.empty(n, np.float32)
    for b in range(n):
        mn[b] = xt[0, b]
        mx[b] = xt[0, b]
        sum_w[b] = wt[0, b]
        sum_x[b] = wt[0, b] * xt[0, b]
    for i in range(1, k):
        for b in range(n):
            v = xt[i, b]
            mn[b] = v if v < mn[b] else mn[b]
            mx[b] = v if v > mx[b] else mx[b]
            sum_w[b] += wt[i, b]
            sum_x[b] += wt[i, b] * v
    live = np.empty(n, np.bool_)
    iscale = np.empty(n, np.float32)
    for b in range(n):
        mn[b] = _F0 if mn[b] > _F0 else mn[b]
        live[b] = not (mx[b] <= mn[b])
        iscale[b] = np.float32(nmax) / (mx[b] - mn[b]) if live[b] else _F1
        scale[b] = _F1 / iscale[b]
    tf = np.empty(n, np.float32)
    ti = tf.view(np.int32)
    row = np.empty(n, np.float32)
    best = np.zeros(n, np.float32)
    for i in range(k):
        _codes(xt, mn, iscale, i, nmax, tf, ti, row)
        for b in range(n):
            codes[i, b] = np.uint8(row[b])
            diff = scale[b] * row[b] + mn[b] - xt[i, b]
            diff = abs(diff) if use_mad else diff * diff
            best[b] += wt[i, b] * diff
    laux = np.empty((k, n), np.float32)
    sum_l = np.empty(n, np.float32)
    sum_l2 = np.empty(n, np.float32)
    sum_xl = np.empty(n, np.float32)
    this_scale = np.empty(n, np.float32)
    this_min = np.empty(n, np.float32)
    ok = np.empty(n, np.bool_)
    mad = np.empty(n, np.float32)
    for g in range(grid.shape[0]):
        for b in range(n):
            iscale[b] = grid[g] / (mx[b] - mn[b]) if live[b] else _F1
            sum_l[b] = _F0
            sum_l2[b] = _F0
            sum_xl[b] = _F0
        for i in range(k):
            _codes(xt, mn, iscale, i, nmax, tf, ti, row)
            for b in range(n):
                q = row[b]
                laux[i, b] = q
                wl = wt[i, b] * q
                sum_l[b] += wl
                sum_l2[b] += wl * q
                sum_xl[b] += wl * xt[i, b]
        for b in range(n):
            d = sum_w[b] * sum_l2[b] - sum_l[b] * sum_l[b]
            ok[b] = live[b] and d > _F0
            s = (sum_w[b] * sum_xl[b] - sum_x[b] * sum_l[b]) / d
            m = (sum_l2[b] * sum_x[b] - sum_l[b] * sum_xl[b]) / d
            if m > _F0:
                m = _F0
                s = sum_xl[b] / sum_l2[b]
            this_scale[b] = s
            this_min[b] = m
            mad[b] = _F0
        for i in range(k):
            for b in range(n):
                diff = this_scale[b] * laux[i, b] + this_min[b] - xt[i, b]
                diff = abs(diff) if use_mad else diff * diff
                mad[b] += wt[i, b] * diff
        for b in range(n):
            ok[b] = ok[b] and mad[b] < best[b]
            if ok[b]:
                best[b] = mad[b]
                scale[b] = this_scale[b]
                mn[b] = this_min[b]
        for i in range(k):
            for b in range(n):
                if ok[b]:
                    codes[i, b] = np.uint8(laux[i, b])
    for b in range(n):
        if not live[b]:
            scale[b] = _F0
            for i in range(k):
                codes[i, b] = 0


@njit(cache=True, nogil=True, error_model="numpy")
def make_qx(xt, wt, nmax, numer, eps, scale, codes):  # type: ignore[no-untyped-def]
    """Fill ``scale`` ``(n,)`` float32 and ``codes`` ``(k, n)`` uint8 (offset by ``nmax``): ggml's
    ``make_qx_quants(k, nmax, x, L, 1, qw)`` of sub-blocks ``xt`` with weights ``wt`` ``(k, n)``.

    ``numer`` holds the C loop's numerators in its order (``nmax``, then ``nmax + 0.1 is`` for
    ``is = -9 .. 9`` without 0); sub-blocks under ``eps`` in magnitude get scale 0, codes 0.
    """
    k, n = xt.shape
    amax = np.zeros(n, np.float32)
    mx = np.zeros(n, np.float32)
    for i in range(k):
        for b in range(n):
            ax = abs(xt[i, b])
            if ax > amax[b]:
                amax[b] = ax
                mx[b] = xt[i, b]
    for b in range(n):
        if amax[b] < eps:
            mx[b] = _F1
    iscale = np.empty(n, np.float32)
    tf = np.empty(n, np.float32)
    ti = tf.view(np.int32)
    laux = np.empty((k, n), np.float32)
    sumlx = np.empty(n, np.float32)
    suml2 = np.empty(n, np.float32)
    best = np.empty(n, np.float32)
    ok = np.empty(n, np.bool_)
    lo, hi = -nmax, nmax - 1
    for c in range(numer.shape[0]):
        for b in range(n):
            iscale[b] = -numer[c] / mx[b]
            sumlx[b] = _F0
            suml2[b] = _F0
        for i in range(k):
            for b in range(n):
                tf[b] = iscale[b] * xt[i, b] + _MAGIC
            for b in range(n):
                q = (ti[b] & 0x007FFFFF) - 0x00400000
                lq = np.float32(min(max(q, lo), hi))
                laux[i, b] = lq
                sumlx[b] += wt[i, b] * xt[i, b] * lq
                suml2[b] += wt[i, b] * lq * lq
        for b in range(n):
            if c == 0:
                ok[b] = True
                scale[b] = sumlx[b] / suml2[b] if suml2[b] != _F0 else _F0
            else:
                ok[b] = suml2[b] > _F0 and sumlx[b] * sumlx[b] > best[b] * suml2[b]
                if ok[b]:
                    scale[b] = sumlx[b] / suml2[b]
            if ok[b]:
                best[b] = scale[b] * sumlx[b]
        for i in range(k):
            for b in range(n):
                if ok[b]:
                    codes[i, b] = np.uint8(laux[i, b] + np.float32(nmax))
    for b in range(n):
        if amax[b] < eps:
            scale[b] = _F0
            for i in range(k):
                codes[i, b] = 0
