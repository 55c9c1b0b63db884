"""libggml's own encoder (``ggml_quantize_chunk``), used where a libggml is installed.

llmq's NumPy encoders are the reference: byte-identical to libggml for every type, with and without
importance (`tests/test_kquants.py`, `tests/test_codecs_weighted.py`), but they replay C's float
sums term by term and run at a fraction of C's speed. When llama-cpp-python is installed (or
``LLMQ_LIBGGML`` names a libggml), round-to-nearest and importance-weighted encodes of the
quantized types go through the C function instead: same bytes, C speed. ``LLMQ_LIBGGML=0`` turns
it off.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ENV = "LLMQ_LIBGGML"


def _candidates() -> list[Path]:
    named = os.environ.get(ENV)
    if named:
        return [Path(named)]
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return []
    libdir = Path(spec.origin).parent / "lib"
    return sorted(libdir.glob("*ggml-base*")) + sorted(libdir.glob("*ggml*"))


@functools.cache
def quantize_chunk() -> Callable[..., int] | None:
    """``ggml_quantize_chunk`` of an installed libggml, or None (not installed, or ``LLMQ_LIBGGML=0``)."""
    if os.environ.get(ENV) == "0":
        return None
    for path in _candidates():
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if hasattr(lib, "ggml_quantize_chunk"):
            fn = lib.ggml_quantize_chunk
            fn.restype = ctypes.c_size_t
            i64, ptr = ctypes.c_int64, ctypes.c_void_p
            fn.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, ptr]
            log.info("encoding with libggml's ggml_quantize_chunk from %s", path)
            return fn
    return None


def encode(qtype: int, x: np.ndarray, nbytes: int, importance: np.ndarray | None) -> np.ndarray:
    """libggml's bytes of float32 rows ``x`` ``(rows, K)`` (``nbytes`` of them), flat uint8.

    ctypes releases the GIL during the call, so rows split across threads run in parallel.
    """
    fn = quantize_chunk()
    assert fn is not None
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(nbytes, np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, np.float32)
    n = fn(
        qtype,
        x.ctypes.data,
        out.ctypes.data,
        0,
        x.shape[0],
        x.shape[1],
        None if imp is None else imp.ctypes.data,
    )
    if n != nbytes:
        raise AssertionError(f"ggml_quantize_chunk wrote {n} bytes, expected {nbytes}")
    return out


__all__ = ["ENV", "encode", "quantize_chunk"]
