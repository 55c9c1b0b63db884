"""Format-generic operations: whole-matrix dequantize, tiled dequant-matmul, and row slicing.

The matmul never materializes the float weight: it decodes one tile of output rows at a time into a
single reusable float32 buffer and lets numpy's BLAS multiply that tile, so extra memory is bounded
by ``tile_rows * K`` floats plus the decoder's per-tile scratch (up to about two thirds of that,
for the 5-bit types).

Formats may decode a tile in a permuted order that unpacks faster (``KernelFormat.x_order`` /
``y_order``); matmul gathers x and scatters the tile's outputs to match, so results stay in order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmq.errors import FormatError  # absolute: transformers may import this folder as `kernels`

from .base import KernelFormat, check_shape, get_format

DEFAULT_TILE_ROWS = 256
# dequantize() decodes this many values at a time, so the decoder's scratch stays cache-sized.
_DEQUANT_CHUNK = 1 << 18


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _resolve(packed: Any, fmt: str, shape: Any) -> tuple[KernelFormat, Any, int, int]:
    f = get_format(fmt)
    n, k = check_shape(f.name, shape)
    return f, f.prepare(packed, (n, k)), n, k


def _decode_view(f: KernelFormat, buf: np.ndarray, rows: int, k: int) -> np.ndarray:
    """A contiguous ``(rows, K)`` (or ``(K, rows)`` for k-major formats) view of the front of ``buf``."""
    flat = buf[: rows * k]
    return flat.reshape(k, rows) if f.k_major else flat.reshape(rows, k)


def dequantize(packed: Any, fmt: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a whole packed weight to float32.

    Args:
        packed: the format's packed data: raw GGUF bytes (uint8, any shape) for GGUF types, an
            ``AWQPacked`` for ``AWQ_INT4``.
        fmt: a key of ``FORMATS`` (case-insensitive).
        shape: the weight's ``(N, K)``: N output rows, K input features.

    Returns:
        float32 array ``(N, K)``; for GGUF types bit-identical to ``gguf.quants.dequantize``.

    Raises:
        FormatError: unknown format, or packed data that does not fit ``shape``.

    Example:
        >>> w = dequantize(reader.tensors[0].data, "Q4_0", (4096, 4096))
    """
    f, p, n, k = _resolve(packed, fmt, shape)
    out = np.empty((n, k), dtype=np.float32)
    step = _round_up(max(1, _DEQUANT_CHUNK // k), f.row_align)
    buf = np.empty(min(step, n) * k, dtype=np.float32) if f.k_major else None
    for start in range(0, n, step):
        stop = min(n, start + step)
        part = f.take_rows(p, start, stop)
        if buf is None:
            f.decode_into(part, out[start:stop])
        else:
            view = _decode_view(f, buf, stop - start, k)
            f.decode_into(part, view)
            # Transposed copies go 16 rows at a time: numpy walks the source's order, so a narrow
            # slab keeps the scattered writes in cache (in isolation ~3x faster than 256-row slabs).
            for r in range(0, stop - start, 16):
                out[start + r : min(stop, start + r + 16)] = view[:, r : r + 16].T
    return out


def matmul(
    x: np.ndarray, packed: Any, fmt: str, shape: tuple[int, int], *, tile_rows: int = DEFAULT_TILE_ROWS
) -> np.ndarray:
    """Compute ``x @ W.T`` for a packed weight ``W`` without decoding it whole.

    Output rows are processed ``tile_rows`` at a time (rounded up to the format's row alignment, 8
    for AWQ_INT4): each tile is decoded into one reusable float32 buffer and multiplied by BLAS into
    its slice of the preallocated output.

    Args:
        x: activations ``(..., K)``; converted to float32.
        packed: the format's packed data (see `dequantize`).
        fmt: a key of ``FORMATS``.
        shape: the weight's ``(N, K)``.
        tile_rows: output rows decoded per step; extra memory is at most about ``tile_rows * K * 7``
            bytes, plus the output and one copy of x.

    Returns:
        float32 array ``(..., N)``.

    Raises:
        FormatError: unknown format, packed data that does not fit ``shape``, ``x`` whose last axis
            is not K, or ``tile_rows < 1``.

    Example:
        >>> y = matmul(x, packed, "Q8_0", (n, k), tile_rows=128)   # == x @ dequantize(...).T
    """
    f, p, n, k = _resolve(packed, fmt, shape)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] != k:
        raise FormatError(f"{f.name}: x of shape {x.shape} does not end in K={k} of weight shape {(n, k)}")
    if int(tile_rows) < 1:
        raise FormatError(f"{f.name}: tile_rows must be >= 1, got {tile_rows}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    order = f.x_order(k)
    x2 = np.ascontiguousarray(x2 if order is None else x2[:, order])
    y = np.empty((x2.shape[0], n), dtype=np.float32)
    tile = min(_round_up(int(tile_rows), f.row_align), _round_up(n, f.row_align))
    buf = np.empty(tile * k, dtype=np.float32)
    for start in range(0, n, tile):
        stop = min(n, start + tile)
        w = _decode_view(f, buf, stop - start, k)
        f.decode_for_matmul(f.take_rows(p, start, stop), w)
        w = w if f.k_major else w.T
        scatter = f.y_order(stop - start)
        if scatter is None:
            # y[:, start:stop] has unit column stride, so numpy hands it to BLAS as the output directly.
            np.matmul(x2, w, out=y[:, start:stop])
        else:
            y[:, start + scatter] = x2 @ w
    return y.reshape(*lead, n)


def row_slice(packed: Any, fmt: str, shape: tuple[int, int], start: int, stop: int) -> Any:
    """The packed data of output rows ``[start, stop)``, in the same form as ``packed`` takes.

    Args:
        packed: the format's packed data for the whole weight.
        fmt: a key of ``FORMATS``.
        shape: the whole weight's ``(N, K)``.
        start: first output row; a multiple of the format's ``row_align``.
        stop: one past the last row; a multiple of ``row_align`` or N.

    Returns:
        A view where possible: a ``(stop - start, bytes_per_row)`` uint8 array for GGUF types, an
        ``AWQPacked`` of the selected columns for ``AWQ_INT4``; it decodes with shape ``(stop - start, K)``.

    Raises:
        FormatError: bad packed data, or a range outside ``[0, N]`` or off the row alignment.

    Example:
        >>> head = row_slice(data, "Q4_0", (4096, 4096), 0, 256)
        >>> dequantize(head, "Q4_0", (256, 4096))
    """
    f, p, n, k = _resolve(packed, fmt, shape)
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= n:
        raise FormatError(f"{f.name}: row range [{start}, {stop}) is outside the weight's {n} rows")
    align = f.row_align
    if start % align or (stop % align and stop != n):
        raise FormatError(
            f"{f.name}: row range [{start}, {stop}) must start and stop on multiples of {align}"
        )
    return f.take_rows(p, start, stop)
