"""Error-feedback rounding (GPTQ, Frantar et al. 2022) on a codec's own grid (`EncoderConfig.feedback`).

The codec first encodes the weight as usual (llama.cpp's importance-weighted encoder, refined with
``--awq-refine``); its scales and mins stay. Then the values' codes are chosen again one input
column at a time, each column's rounding error pushed onto the columns not yet rounded through
the inverse of the layer input's second moment ``H = X^T X / n`` (Cholesky form, damped), so the
output error ``tr(E H E^T)`` falls, not the per-weight one. The bytes keep the type's layout:
llama.cpp reads them as any other block. NumPy, float64 for the error updates.
"""

from __future__ import annotations

import numpy as np

from .codecs.base import Codec
from .errors import LlmqError

DAMP = 0.01  # GPTQ's dampening: this fraction of H's mean diagonal is added to the diagonal
BLOCK = 128  # columns whose updates are applied lazily together (GPTQ's block)


def feedback_factor(gram: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``; dead columns get ``H_jj = 1``.

    Args:
        gram: ``H`` ``(K, K)``, the mean outer product of the layer input (`InputStats.mean_gram`).
        damp: dampening, relative to the mean of ``H``'s diagonal.

    Returns:
        ``U`` ``(K, K)`` float64 with ``U^T U = H_damped^-1``.
    """
    h = np.array(gram, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or not np.isfinite(h).all():
        raise LlmqError(f"error feedback needs a finite square input second moment, got shape {h.shape}")
    diag = np.diagonal(h).copy()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1
    np.fill_diagonal(h, diag + damp * diag.mean())
    try:
        inv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, so H^-1 = L^-T L^-1
        return np.linalg.cholesky(inv.T @ inv).T
    except np.linalg.LinAlgError as e:
        raise LlmqError(f"error feedback: the input second moment is not positive definite ({e})") from e


def encode_feedback(
    codec: type[Codec], x: np.ndarray, factor: np.ndarray, importance: np.ndarray | None, *, refine: bool
) -> np.ndarray:
    """``x`` ``(rows, K)`` encoded with ``codec``'s scales, its codes chosen by error feedback.

    Args:
        codec: a type with ``supports_grid``.
        x: float32 weight rows in GGUF layout (input columns last).
        factor: `feedback_factor` of the input's second moment ``(K, K)``.
        importance: per-column importance for the first encoding (None: reference encoder).
        refine: refine that first encoding (`llmq.codecs.krefine`).

    Returns:
        The bytes ``codec.byte_shape(x.shape)``: same layout, scales and mins as
        ``codec.encode(x, importance, refine=refine)``, other codes.
    """
    if not codec.supports_grid:
        raise LlmqError(f"{codec.name} has no integer grid for error-feedback rounding")
    rows, k = x.shape
    assert factor.shape == (k, k), (factor.shape, x.shape)
    data = codec.encode(x, importance, refine=refine).reshape(-1, codec.type_size)
    step, offset, codes, lo, hi = codec.grid_blocks(data)
    step, offset = step.astype(np.float64).reshape(rows, k), offset.astype(np.float64).reshape(rows, k)
    live = step != 0  # a zero step decodes to the offset whatever the code: keep the encoder's
    w = x.astype(np.float64)
    out = codes.astype(np.int32).reshape(rows, k)
    for a in range(0, k, BLOCK):
        b = min(a + BLOCK, k)
        wb, err, u = w[:, a:b].copy(), np.zeros((rows, b - a)), factor[a:b, a:b]
        for j in range(b - a):
            col, s, o = wb[:, j], step[:, a + j], offset[:, a + j]
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.where(live[:, a + j], np.clip(np.rint((col - o) / s), lo, hi), out[:, a + j])
            out[:, a + j] = q
            err[:, j] = (col - (s * q + o)) / u[j, j]
            wb[:, j:] -= np.outer(err[:, j], u[j, j:])
        w[:, b:] -= err @ factor[a:b, b:]
    return codec.with_codes(data, out.reshape(data.shape[0], -1)).reshape(codec.byte_shape(x.shape))
