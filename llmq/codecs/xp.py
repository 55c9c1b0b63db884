"""Array-namespace helpers, so the K-quant encoders run on NumPy arrays or torch tensors (CPU or CUDA).

The encoders' float32 results must be the same bits on every backend (they are llama.cpp's bytes).
`array_api_compat` gives one namespace per backend; the few operations where torch's arithmetic is
not C's ``float`` arithmetic go through here instead:
- ``sqrt``: torch's vectorized CPU sqrt is not correctly rounded; it is taken in float64 and
  rounded once, which is exact (a float32's square root survives the double rounding).
- constants: a Python scalar divided by a tensor, or a tensor by a CPU scalar on CUDA, may become a
  multiplication by a reciprocal in torch; constants are 0-d arrays on the data's own device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_numpy_array, is_torch_array

Array = Any  # a NumPy ndarray or a torch Tensor

__all__ = [
    "Array",
    "array_namespace",
    "bitcast",
    "const",
    "contiguous",
    "device",
    "errstate",
    "is_numpy_array",
    "is_torch_array",
    "pack_bits",
    "sqrt",
    "take_rows",
    "to_numpy",
]


def const(xp: Any, value: float | int, like: Array, dtype: Any = None) -> Array:
    """A 0-d array of ``value`` with ``like``'s device (and dtype, unless given)."""
    return xp.asarray(value, dtype=like.dtype if dtype is None else dtype, device=device(like))


def sqrt(xp: Any, x: Array) -> Array:
    """Correctly rounded float32 square root (C's ``sqrtf``) on every backend."""
    if is_numpy_array(x):
        return np.sqrt(x)
    return xp.astype(xp.sqrt(xp.astype(x, xp.float64)), xp.float32)


def bitcast(x: Array, dtype: str) -> Array:
    """Reinterpret the bits of ``x`` as ``dtype`` (``"int32"`` for float32, ``"int8"``/``"uint8"``)."""
    if is_numpy_array(x):
        return x.view(np.dtype(dtype))
    import torch

    return x.view(getattr(torch, dtype))


def contiguous(x: Array) -> Array:
    """A C-contiguous copy when needed (row iteration of a transposed view is then cheap)."""
    return np.ascontiguousarray(x) if is_numpy_array(x) else x.contiguous()


def take_rows(xp: Any, x: Array, idx: Array) -> Array:
    """``x[i, idx[i]]`` for each row ``i`` of a 2-D ``x``."""
    return xp.take_along_axis(x, xp.reshape(idx, (-1, 1)), axis=1)[:, 0]


def pack_bits(bits: Array) -> Array:
    """``np.packbits(bits, axis=1, bitorder="little")`` of 0/1 uint8 ``bits`` ``(n, 8, m)`` -> ``(n, m)``."""
    out = bits[:, 0]
    for j in range(1, 8):
        out = out | (bits[:, j] << j)
    return out


def to_numpy(x: Array) -> np.ndarray:
    """The array as NumPy (a torch tensor is copied to the CPU)."""
    return x if is_numpy_array(x) else x.detach().cpu().numpy()


@contextlib.contextmanager
def errstate(x: Array) -> Iterator[None]:
    """NumPy's floating-point warnings off (the C code divides by zero on purpose); torch has none."""
    if is_numpy_array(x):
        with np.errstate(all="ignore"):
            yield
    else:
        yield
