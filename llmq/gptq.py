"""Error-feedback rounding (GPTQ, Frantar et al. 2022) on a codec's own grid (`EncoderConfig.feedback`).

The codec first encodes the weight as usual (llama.cpp's importance-weighted encoder, refined with
``--awq-refine``); its scales and mins stay. Then the values' codes are chosen again one input
column at a time, each column's rounding error pushed onto the columns not yet rounded through
the inverse of the layer input's second moment ``H = X^T X / n`` (Cholesky form, damped), so the
output error ``tr(E H E^T)`` falls, not the per-weight one. The bytes keep the type's layout:
llama.cpp reads them as any other block. NumPy, float32 (as GPTQ).
"""

from __future__ import annotations

import numpy as np
import torch

from .codecs.base import Codec
from .errors import LlmqError

DAMP = 0.01  # GPTQ's dampening: this fraction of H's mean diagonal is added to the diagonal
BLOCK = 128  # columns whose updates are applied lazily together (GPTQ's block)
FACTOR_COLUMNS = 1024  # columns of the feedback factor inverted per step (bounds the scratch)
# NumPy's column loop runs compiled (`llmq.gptq_jit`, same codes); False: one NumPy call per column
COMPILED = True


def flip_(a: torch.Tensor, step: int = 1 << 22) -> torch.Tensor:
    """Reverse the rows and the columns of a contiguous square matrix in place: the reversal of its
    flat values, ``step`` values per swap (one pass over memory, no strided copies)."""
    assert a.is_contiguous(), "flip_ needs a contiguous matrix"
    flat = a.view(-1)
    n = flat.numel()
    for i in range(0, n // 2, step):
        j = min(i + step, n // 2)
        top = flat[i:j].clone()
        flat[i:j] = flat[n - j : n - i].flip(0)
        flat[n - j : n - i] = top.flip(0)
    return a


def feedback_factor(
    gram: np.ndarray | torch.Tensor, damp: float = DAMP, *, overwrite: bool = False, on_device: bool = False
) -> np.ndarray | torch.Tensor:
    """Upper triangular ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``; dead columns get ``H_jj = 1``.

    GPTQ factors ``H^-1`` by Cholesky after inverting ``H``; the same ``U`` is the inverse of the
    "reversed" Cholesky factor ``V`` of ``H = V V^T`` (``V`` upper: the Cholesky factor of ``H`` with
    rows and columns in reverse order): one factorization and one blocked triangular inversion in
    place, float32 (as GPTQ). Feedback only uses ratios of
    ``U``'s entries, so ``H`` may be the mean or the sum of the input's outer products.

    Args:
        gram: ``H`` ``(K, K)``, the input's second moment (`InputStats.gram`, or its mean).
        damp: dampening, relative to the mean of ``H``'s diagonal.
        overwrite: use a float32 torch ``gram`` as the factorization's scratch (it is destroyed):
            no copy of it, for a caller whose last use it is.
        on_device: a ``gram`` on a GPU gives ``U`` there as a tensor (`encode_feedback` then runs
            there too).

    Returns:
        ``U`` ``(K, K)`` float32: NumPy, or a tensor on ``gram``'s GPU with ``on_device``.
    """
    h = torch.as_tensor(gram)
    # min and max are finite when every entry is (NaN propagates): no (K, K) mask or float64 copy
    if (
        h.ndim != 2
        or h.shape[0] != h.shape[1]
        or not bool(torch.isfinite(torch.stack(torch.aminmax(h))).all())
    ):
        raise LlmqError(
            f"error feedback needs a finite square input second moment, got shape {tuple(h.shape)}"
        )
    k = h.shape[0]
    v = h if overwrite and h.dtype == torch.float32 else h.to(torch.float32, copy=True)
    del h
    flip_(v)  # reversed order
    diag = v.diagonal()
    dead = diag <= 0
    v[dead, :] = 0
    v[:, dead] = 0
    diag[dead] = 1
    diag += damp * float(diag.mean())
    info = torch.zeros((), dtype=torch.int32, device=v.device)
    torch.linalg.cholesky_ex(v, out=(v, info))  # the lower factor, in v's memory
    if int(info) != 0:
        raise LlmqError("error feedback: the input second moment is not positive definite")
    u = flip_(v)  # V: upper, H = V V^T; inverted in place into U = V^-1, a block of columns at a time
    for a in range(0, k, FACTOR_COLUMNS):
        b = min(a + FACTOR_COLUMNS, k)
        ujj = torch.linalg.solve_triangular(
            u[a:b, a:b].contiguous(), torch.eye(b - a, dtype=u.dtype, device=u.device), upper=True
        )
        if a:  # U[:a, a:b] = -U[:a, :a] V[:a, a:b] U_jj, with U[:a, :a] already inverted (upper:
            # each block of its rows starts at its diagonal)
            prod = torch.empty(a, b - a, dtype=u.dtype, device=u.device)
            for r in range(0, a, FACTOR_COLUMNS):
                prod[r : r + FACTOR_COLUMNS] = u[r : r + FACTOR_COLUMNS, r:a] @ u[r:a, a:b]
            u[:a, a:b] = -(prod @ ujj)
        u[a:b, a:b] = ujj
    return u if on_device and u.device.type != "cpu" else u.cpu().numpy()


def encode_feedback(
    codec: type[Codec],
    x: np.ndarray,
    factor: np.ndarray | torch.Tensor,
    importance: np.ndarray | None,
    *,
    refine: bool,
    data: np.ndarray | None = None,
) -> np.ndarray:
    """``x`` ``(rows, K)`` encoded with ``codec``'s scales, its codes chosen by error feedback.

    Args:
        codec: a type with ``supports_grid``.
        x: float32 weight rows in GGUF layout (input columns last).
        factor: `feedback_factor` of the input's second moment ``(K, K)``; a tensor runs the
            feedback with torch on its device (the same rounding rule, float32; codes can differ
            from NumPy's where a value sits on a rounding boundary).
        importance: per-column importance for the first encoding (None: reference encoder).
        refine: refine that first encoding (`llmq.codecs.krefine`).
        data: that first encoding, if the caller has it (``codec.encode(x, importance, refine=refine)``).

    Returns:
        The bytes ``codec.byte_shape(x.shape)``: same layout, scales and mins as
        ``codec.encode(x, importance, refine=refine)``, other codes.
    """
    if not codec.supports_grid:
        raise LlmqError(f"{codec.name} has no integer grid for error-feedback rounding")
    rows, k = x.shape
    assert factor.shape == (k, k), (factor.shape, x.shape)
    if data is None:
        data = codec.encode(x, importance, refine=refine)
    data = data.reshape(-1, codec.type_size)
    step, offset, codes, lo, hi = codec.grid_blocks(data)
    step, offset = step.astype(np.float32).reshape(rows, k), offset.astype(np.float32).reshape(rows, k)
    live = step != 0  # a zero step decodes to the offset whatever the code: keep the encoder's
    if isinstance(factor, torch.Tensor):
        new = _feedback_torch(x, factor, step, offset, live, codes.astype(np.int32).reshape(rows, k), lo, hi)
        return codec.with_codes(data, new.reshape(data.shape[0], -1)).reshape(codec.byte_shape(x.shape))
    w = x.astype(np.float32, copy=True)
    factor = np.asarray(factor, dtype=np.float32)
    out = codes.astype(np.int32).reshape(rows, k)
    for a in range(0, k, BLOCK):
        b = min(a + BLOCK, k)
        wb, err, u = w[:, a:b].copy(), np.zeros((rows, b - a), np.float32), factor[a:b, a:b]
        if COMPILED:  # the same loop, a row at a time (`gptq_jit`)
            from . import gptq_jit  # numba's import only where it is used

            sb, ob, lb, qb = (np.ascontiguousarray(v[:, a:b]) for v in (step, offset, live, out))
            gptq_jit.feedback_block(wb, err, np.ascontiguousarray(u), sb, ob, lb, qb, lo, hi)
            out[:, a:b] = qb
        else:
            for j in range(b - a):
                col, s, o = wb[:, j], step[:, a + j], offset[:, a + j]
                with np.errstate(divide="ignore", invalid="ignore"):
                    q = np.where(live[:, a + j], np.clip(np.rint((col - o) / s), lo, hi), out[:, a + j])
                out[:, a + j] = q
                err[:, j] = (col - (s * q + o)) / u[j, j]
                wb[:, j:] -= np.outer(err[:, j], u[j, j:])
        w[:, b:] -= err @ factor[a:b, b:]
    return codec.with_codes(data, out.reshape(data.shape[0], -1)).reshape(codec.byte_shape(x.shape))


def _feedback_torch(
    x: np.ndarray,
    factor: torch.Tensor,
    step: np.ndarray,
    offset: np.ndarray,
    live: np.ndarray,
    codes: np.ndarray,
    lo: int,
    hi: int,
) -> np.ndarray:
    """`encode_feedback`'s column loop with torch on ``factor``'s device: the new codes ``(rows, K)``."""
    dev, k = factor.device, x.shape[1]
    w = torch.from_numpy(x).to(dev, torch.float32)
    step_t, offset_t = torch.from_numpy(step).to(dev), torch.from_numpy(offset).to(dev)
    live_t, out = torch.from_numpy(live).to(dev), torch.from_numpy(codes).to(dev, torch.float32)
    u = factor.to(torch.float32)
    for a in range(0, k, BLOCK):
        b = min(a + BLOCK, k)
        wb, err = w[:, a:b].clone(), torch.zeros((x.shape[0], b - a), dtype=torch.float32, device=dev)
        diag = u[a:b, a:b]
        for j in range(b - a):
            col, s, o = wb[:, j], step_t[:, a + j], offset_t[:, a + j]
            q = torch.where(live_t[:, a + j], torch.clamp(torch.round((col - o) / s), lo, hi), out[:, a + j])
            out[:, a + j] = q
            # float64 as NumPy's (its where() of float and int32 codes promotes)
            err[:, j] = (
                (col.double() - (s.double() * q.double() + o.double())) / diag[j, j].double()
            ).float()
            wb[:, j:] -= torch.outer(err[:, j], diag[j, j:])
        w[:, b:] -= err @ u[a:b, b:]
    return out.to(torch.int32).cpu().numpy()
