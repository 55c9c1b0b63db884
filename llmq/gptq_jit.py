"""The column loop of `llmq.gptq.encode_feedback` within one block, compiled with numba.

Rows are independent inside a block, so each row runs its columns in a compiled loop instead of
one NumPy call per column over all rows. The arithmetic is NumPy's: the code in float32 with
``rint``, the error in float64 (NumPy promotes ``where``'s float and int32 codes) stored as
float32, the update ``err * u`` in float32; the same codes, checked in ``tests/test_gptq.py``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def feedback_block(wb, err, u, step, offset, live, out, lo, hi):  # type: ignore[no-untyped-def]
    """Round the block's columns in order, pushing each one's error onto the columns after it.

    Args:
        wb: ``(rows, B)`` float32 weights of the block, updated in place.
        err: ``(rows, B)`` float32, filled with each column's scaled rounding error.
        u: ``(B, B)`` float32 diagonal block of the feedback factor.
        step, offset: ``(rows, B)`` float32 decoding ``x = step * code + offset``.
        live: ``(rows, B)`` bool; a dead value (zero step) keeps its code in ``out``.
        out: ``(rows, B)`` int32 codes, updated in place.
        lo, hi: the code range.
    """
    flo, fhi = np.float32(lo), np.float32(hi)
    for r in range(wb.shape[0]):
        for j in range(wb.shape[1]):
            col, s, o = wb[r, j], step[r, j], offset[r, j]
            if live[r, j]:
                q = min(max(np.rint((col - o) / s), flo), fhi)
                out[r, j] = np.int32(q)
            qf = np.float64(out[r, j])
            e = np.float32((np.float64(col) - (np.float64(s) * qf + np.float64(o))) / np.float64(u[j, j]))
            err[r, j] = e
            for t in range(j, wb.shape[1]):
                wb[r, t] -= e * u[j, t]
