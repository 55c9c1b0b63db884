"""`llmq.codecs.krefine`'s scale search compiled with numba: the same choices, one sub-block at a time.

The array version evaluates every neighbour of every sub-block as whole-array operations; here
each sub-block runs its own descent in a compiled loop (a sub-block that did not move in a pass
would only repeat it, so stopping it early changes nothing). Arithmetic is float32 in the array
version's order, sums one term at a time, ``nearest_int`` by ggml's bit trick: the same bytes,
checked against the array version in ``tests/test_krefine.py``. Compiled on first use and
cached beside this file (or in numba's user cache); ``nogil``, so the encoders' threads run it
on all cores.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: ggml's nearest_int
_ONE = np.float32(1.0)


@njit(cache=True, nogil=True)
def _nearest_int(v: np.float32, buf: np.ndarray, bits: np.ndarray) -> int:
    buf[0] = v + _MAGIC
    return (bits[0] & 0x007FFFFF) - 0x00400000


@njit(cache=True, nogil=True)
def _error(x, w, dl, ml, lo, hi, buf, bits):  # type: ignore[no-untyped-def]
    # krefine's error(): codes lo..hi re-rounded on (dl, ml) as `requantize` does (0 where dl is 0),
    # decoded dl * q - ml, weighted squared error (Q6_K: ml = 0, its stored q + 32 shifted back)
    live = dl != 0
    div = dl if live else _ONE
    acc = np.float32(0.0)
    for j in range(x.shape[0]):
        q = 0
        if live:
            q = min(max(_nearest_int((x[j] + ml) / div, buf, bits), lo), hi)
        diff = x[j] - (dl * np.float32(q) - ml)
        acc += w[j] * (diff * diff)
    return acc


@njit(cache=True, nogil=True)
def search(x, w, d, dmin, sc, mn, steps, lo, hi, qlo, qhi, passes):  # type: ignore[no-untyped-def]
    """`krefine._search` of every sub-block, improving ``sc``/``mn`` ``(n, subs)`` int32 in place.

    ``x``/``w`` ``(n, subs, size)`` float32; ``d``/``dmin`` ``(n,)`` float32 (a sub-block decodes
    ``d * sc * q - dmin * mn``); ``steps`` ``(k, 2)`` int32 moves of (scale, min), the scale kept in
    ``[lo, hi]``, the min in ``[0, 63]``; codes ``q`` in ``[qlo, qhi]``.
    """
    buf = np.empty(1, np.float32)
    bits = buf.view(np.int32)
    for i in range(x.shape[0]):
        for b in range(x.shape[1]):
            xs, ws = x[i, b], w[i, b]
            s, m = sc[i, b], mn[i, b]
            best = _error(xs, ws, d[i] * np.float32(s), dmin[i] * np.float32(m), qlo, qhi, buf, bits)
            for _ in range(passes):
                moved = False
                for k in range(steps.shape[0]):
                    s2 = min(max(s + steps[k, 0], lo), hi)
                    m2 = min(max(m + steps[k, 1], 0), 63)
                    e = _error(xs, ws, d[i] * np.float32(s2), dmin[i] * np.float32(m2), qlo, qhi, buf, bits)
                    if e < best:
                        s, m, best, moved = s2, m2, e, True
                if not moved:
                    break
            sc[i, b], mn[i, b] = s, m
