"""Activation rounding as llama.cpp's CPU matmul does it, so the reference backend can match it.

ggml's CPU dot product for a quantized weight type first converts the activations to that type's
``vec_dot_type``: Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1 (8-bit, blocks of 32, scale
``absmax / 127`` stored as f16), Q8_K for the K-quants (blocks of 256, f32 scale), the float type
itself for F16/BF16. `round_activations` returns
the float32 values those rounded activations stand for (`quantize_row_q8_0` / `quantize_row_q8_1`
on x86, which round half to even).
"""

from __future__ import annotations

import numpy as np

from llmq.errors import FormatError  # absolute: transformers may import this folder as `kernels`

# weight type -> the type ggml-cpu converts activations to before the dot product (type_traits_cpu)
VEC_DOT_TYPE: dict[str, str] = {
    "Q4_0": "Q8_0",
    "Q5_0": "Q8_0",
    "Q8_0": "Q8_0",
    "Q4_1": "Q8_1",
    "Q5_1": "Q8_1",
    "Q2_K": "Q8_K",
    "Q3_K": "Q8_K",
    "Q4_K": "Q8_K",
    "Q5_K": "Q8_K",
    "Q6_K": "Q8_K",
    "F16": "F16",
    "BF16": "BF16",
    "F32": "F32",
}


def _round_q8(x: np.ndarray) -> np.ndarray:
    # Q8_0 and Q8_1 hold the same values (Q8_1 adds the block sum for the min term).
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (q * d).astype(np.float32).reshape(x.shape)


def _round_q8_k(x: np.ndarray) -> np.ndarray:
    # quantize_row_q8_K: blocks of 256, the signed value of largest magnitude maps to -127, d in f32
    blocks = x.reshape(-1, 256)
    idx = np.abs(blocks).argmax(axis=1)[:, None]
    mx = np.take_along_axis(blocks, idx, axis=1)
    with np.errstate(divide="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(blocks * iscale), 127)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(iscale != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    return (q * d).astype(np.float32).reshape(x.shape)


def round_activations(x: np.ndarray, fmt: str) -> np.ndarray:
    """``x`` (float32, ``(..., K)``) as llama.cpp's CPU backend rounds it before multiplying by a ``fmt`` weight.

    Args:
        x: activations; K must be a multiple of 32 (256 for K-quant weights) for the 8-bit rounding.
        fmt: the weight's GGUF type name.

    Returns:
        float32 array of ``x``'s shape (``x`` itself for F32 and formats without a rounding rule).

    Raises:
        FormatError: K not a multiple of the 8-bit block where 8-bit rounding applies.
    """
    kind = VEC_DOT_TYPE.get(fmt.upper(), "F32")
    x = np.asarray(x, dtype=np.float32)
    if kind in ("Q8_0", "Q8_1", "Q8_K"):
        size = 256 if kind == "Q8_K" else 32
        if x.shape[-1] % size:
            raise FormatError(
                f"{fmt}: activations of width {x.shape[-1]} do not split into 8-bit blocks of {size}"
            )
        x = np.ascontiguousarray(x)
        return _round_q8_k(x) if kind == "Q8_K" else _round_q8(x)
    if kind == "F16":
        return x.astype(np.float16).astype(np.float32)
    if kind == "BF16":
        # round to nearest even on the upper 16 bits (ggml's GGML_FP32_TO_BF16)
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return rounded.astype(np.uint32).view(np.float32).reshape(x.shape)
    return x
