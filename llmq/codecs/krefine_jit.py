"""`llmq.codecs.krefine`'s scale search compiled with numba: the same choices, one sub-block at a time.

The array version evaluates every neighbour of every sub-block as whole-array operations; here
each sub-block runs its own descent in a compiled loop (a sub-block that did not move in a pass
would only repeat it, so stopping it early changes nothing). Arithmetic is float32 in the array
version's order, sums one term at a time, ``nearest_int`` by ggml's bit trick: the same bytes,
checked against the array version in ``tests/test_krefine_jit.py``. Compiled on first use and
cached beside this file (or in numba's user cache); ``nogil``, so the encoders' threads run it
on all cores.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: ggml's nearest_int
_ONE = np.float32(1.0)
_K4_STEPS = np.array([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)], np.int32)
_Q6_STEPS = np.array([-2, -1, 1, 2], np.int32)


@njit(cache=True, nogil=True)
def _nearest_int(v: np.float32, buf: np.ndarray, bits: np.ndarray) -> int:
    buf[0] = v + _MAGIC
    return (bits[0] & 0x007FFFFF) - 0x00400000


@njit(cache=True, nogil=True)
def _k4_error(x, w, d, dmin, s, m, nmax, buf, bits):  # type: ignore[no-untyped-def]
    # krefine.refine_k4's error(): requantize with (d * s, dmin * m), weighted squared error
    dl = d * np.float32(s)
    ml = dmin * np.float32(m)
    live = dl != 0
    div = dl if live else _ONE
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        q = 0
        if live:
            q = min(max(_nearest_int((x[j] + ml) / div, buf, bits), 0), nmax)
        diff = x[j] - (dl * np.float32(q) - ml)
        acc += w[j] * (diff * diff)
    return acc


@njit(cache=True, nogil=True)
def search_k4(x, w, d, dmin, sc, mn, nmax, passes):  # type: ignore[no-untyped-def]
    """Q4_K/Q5_K: ``x``/``w`` ``(n, 8, 32)`` float32, ``d``/``dmin`` ``(n,)`` float32, the 6-bit
    ``sc``/``mn`` ``(n, 8)`` int32, improved in place."""
    buf = np.empty(1, np.float32)
    bits = buf.view(np.int32)
    for i in range(x.shape[0]):
        for b in range(x.shape[1]):
            xs, ws = x[i, b], w[i, b]
            s, m = sc[i, b], mn[i, b]
            best = _k4_error(xs, ws, d[i], dmin[i], s, m, nmax, buf, bits)
            for _ in range(passes):
                moved = False
                for k in range(_K4_STEPS.shape[0]):
                    s2 = min(max(s + _K4_STEPS[k, 0], 0), 63)
                    m2 = min(max(m + _K4_STEPS[k, 1], 0), 63)
                    e = _k4_error(xs, ws, d[i], dmin[i], s2, m2, nmax, buf, bits)
                    if e < best:
                        s, m, best, moved = s2, m2, e, True
                if not moved:
                    break
            sc[i, b], mn[i, b] = s, m


@njit(cache=True, nogil=True)
def _q6_error(x, w, d, s, buf, bits):  # type: ignore[no-untyped-def]
    # krefine.refine_q6's error(): codes -32..31 stored as q + 32, decoded d * s * (q - 32)
    dl = d * np.float32(s)
    live = dl != 0
    div = dl if live else _ONE
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        q = 32
        if live:
            q = min(max(_nearest_int(x[j] / div, buf, bits), -32), 31) + 32
        diff = x[j] - dl * (np.float32(q) - np.float32(32.0))
        acc += w[j] * (diff * diff)
    return acc


@njit(cache=True, nogil=True)
def search_q6(x, w, d, sc, passes):  # type: ignore[no-untyped-def]
    """Q6_K: ``x``/``w`` ``(n, 16, 16)`` float32, ``d`` ``(n,)`` float32, the int8 ``sc`` ``(n, 16)``
    int32, improved in place."""
    buf = np.empty(1, np.float32)
    bits = buf.view(np.int32)
    for i in range(x.shape[0]):
        for b in range(x.shape[1]):
            xs, ws = x[i, b], w[i, b]
            s = sc[i, b]
            best = _q6_error(xs, ws, d[i], s, buf, bits)
            for _ in range(passes):
                moved = False
                for k in range(_Q6_STEPS.shape[0]):
                    s2 = min(max(s + _Q6_STEPS[k], -128), 127)
                    e = _q6_error(xs, ws, d[i], s2, buf, bits)
                    if e < best:
                        s, best, moved = s2, e, True
                if not moved:
                    break
            sc[i, b] = s
