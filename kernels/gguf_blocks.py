"""GGUF block types: the legacy quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the float types (F16, BF16, F32).

Each class names its ggml type and implements ``decode_blocks`` on ``(n_blocks, type_size)`` bytes,
writing ``(n_blocks, block_size)`` float32 in place; geometry comes from ``gguf.GGML_QUANT_SIZES``.
Arithmetic follows ggml's ``dequantize_row_*`` operation for operation (``d * q``, then ``+ m``),
in float32, so results are bit-identical to ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmq.errors import FormatError  # absolute: transformers may import this folder as `kernels`

from .base import KernelFormat, check_shape


def _f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian f16 at byte ``offset`` of every block, as float32 ``(n_blocks, 1)``."""
    return blocks[:, offset : offset + 2].view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Split ``(n, 16)`` packed bytes into ``(n, 32)`` uint8 codes in element order.

    Low nibbles are elements 0..15 and high nibbles 16..31 of the block (ggml's ``qs[j] & 0x0F`` /
    ``qs[j] >> 4`` in ``dequantize_row_q4_0``), so both halves are written as contiguous runs.
    """
    q = np.empty((qs.shape[0], 2, qs.shape[1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, 0])
    np.right_shift(qs, 4, out=q[:, 1])
    return q.reshape(qs.shape[0], -1)


def _spread_bits_lut() -> np.ndarray:
    # Byte v -> 8 bytes, byte i = 16 * bit i of v: a uint64 per qh byte lands bits as bytes in order.
    v = np.arange(256, dtype=np.uint64)
    lut = np.zeros(256, dtype="<u8")
    for i in range(8):
        lut |= ((v >> np.uint64(i)) & np.uint64(1)) << np.uint64(8 * i + 4)
    return lut


_SPREAD_BITS = _spread_bits_lut()


def _add_high_bits(q: np.ndarray, qh: np.ndarray) -> None:
    """OR bit ``j`` of each block's little-endian uint32 ``qh`` (as 4 bytes) into ``q[:, j]`` as bit 4.

    Mirrors the ``((qh >> j) << 4) & 0x10`` step of ggml's ``dequantize_row_q5_0``, one table lookup per
    qh byte (about 2.5x faster than ``np.unpackbits`` plus a shift on strided block fields).
    """
    hb = np.take(_SPREAD_BITS, qh)  # (n, 4) uint64 = (n, 32) bytes of 0 or 16, in element order
    np.bitwise_or(q, hb.view(np.uint8), out=q)


def _f16_field_t(blocks: np.ndarray, offset: int) -> np.ndarray:
    """``_f16_field`` for ``(rows, n_blocks, type_size)`` bytes: float32 ``(rows, 1, n_blocks)``."""
    return blocks[:, :, offset : offset + 2].view("<f2")[:, :, 0].astype(np.float32)[:, None, :]


def _nibbles_t(qs: np.ndarray) -> np.ndarray:
    """``_nibbles`` into the block-transposed layout: ``(rows, nb, 16)`` bytes -> ``(rows, 32, nb)`` codes.

    One transposing copy of the packed bytes (one byte per two values), then the nibble split runs
    on contiguous rows of ``nb`` values instead of 16-value runs.
    """
    rows, nb, half = qs.shape
    qt = np.empty((rows, half, nb), dtype=np.uint8)
    np.copyto(qt, qs.transpose(0, 2, 1))
    q = np.empty((rows, 2 * half, nb), dtype=np.uint8)
    np.bitwise_and(qt, 0x0F, out=q[:, :half])
    np.right_shift(qt, 4, out=q[:, half:])
    return q


def _add_high_bits_t(q: np.ndarray, qh: np.ndarray) -> None:
    """``_add_high_bits`` for block-transposed codes ``(rows, 32, nb)`` and qh bytes ``(rows, nb, 4)``."""
    hb = np.take(_SPREAD_BITS, qh).view(np.uint8)  # (rows, nb, 32)
    np.bitwise_or(q, hb.transpose(0, 2, 1), out=q)


class GGUFBlockFormat(KernelFormat, register=False):
    """A GGUF tensor type: packed rows of ``K / block_size`` blocks of ``type_size`` bytes.

    Subclasses pass ``qtype=`` on declaration and implement ``decode_blocks``. Packed data is the raw
    bytes as a GGUF file stores them (any shape and contiguity); F16/F32 (and BF16 as uint16) arrays
    are also accepted, as ``gguf.GGUFReader`` returns them with those dtypes.
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # Element types accepted for ``packed`` besides uint8 (they are reinterpreted as bytes).
    extra_dtypes: ClassVar[tuple[type[np.generic], ...]] = ()

    _transposed: ClassVar[bool] = False

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: Any) -> None:
        if qtype is not None:
            cls.qtype = qtype
            cls.name = qtype.name
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        cls._transposed = cls.decode_blocks_t is not GGUFBlockFormat.decode_blocks_t
        super().__init_subclass__(**kwargs)

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        """Decode ``(n_blocks, type_size)`` uint8 into float32 ``out`` of shape ``(n_blocks, block_size)``."""
        raise NotImplementedError

    def decode_blocks_t(self, blocks: np.ndarray, out: np.ndarray) -> None:
        """Optional, for matmul: decode ``(rows, nb, type_size)`` into ``out`` ``(rows, block_size, nb)``.

        This block-transposed layout puts value j of every block of a row together, so per-block
        scales broadcast along runs of ``nb`` values rather than 32; the same arithmetic as
        ``decode_blocks``, so the values are bit-identical, only their order differs.
        """
        raise NotImplementedError

    def x_order(self, k: int) -> np.ndarray | None:
        if not self._transposed:
            return None
        # Position j * nb + b of a decoded row holds feature b * block_size + j.
        return np.arange(k).reshape(-1, self.block_size).T.ravel()

    def decode_for_matmul(self, packed: np.ndarray, out: np.ndarray) -> None:
        if not self._transposed:
            self.decode_into(packed, out)
            return
        assert out.flags.c_contiguous and out.dtype == np.float32, "decode buffers are C-contiguous float32"
        rows, nb = packed.shape[0], packed.shape[1] // self.type_size
        self.decode_blocks_t(packed.reshape(rows, nb, self.type_size), out.reshape(rows, self.block_size, nb))

    def row_bytes(self, k: int) -> int:
        """Bytes one row of ``k`` values takes."""
        return k // self.block_size * self.type_size

    def prepare(self, packed: Any, shape: tuple[int, int]) -> np.ndarray:
        n, k = check_shape(self.name, shape)
        if k % self.block_size:
            raise FormatError(
                f"{self.name}: K={k} of weight shape {(n, k)} is not a multiple of the "
                f"{self.name} block size {self.block_size}"
            )
        arr = np.asarray(packed)
        allowed = (np.uint8, *self.extra_dtypes)
        if arr.dtype not in [np.dtype(t) for t in allowed]:
            names = ", ".join(np.dtype(t).name for t in allowed)
            raise FormatError(f"{self.name}: packed data must be {names}, got dtype {arr.dtype}")
        row_bytes = self.row_bytes(k)
        if arr.nbytes != n * row_bytes:
            raise FormatError(
                f"{self.name}: packed data of {arr.nbytes} bytes (array shape {arr.shape}) does not hold a "
                f"weight of shape {(n, k)}, which takes {n} rows x {row_bytes} bytes = {n * row_bytes} bytes"
            )
        # No copy for contiguous input (a GGUFReader memmap stays a memmap view).
        return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).reshape(n, row_bytes)

    def take_rows(self, packed: np.ndarray, start: int, stop: int) -> np.ndarray:
        return packed[start:stop]

    def decode_into(self, packed: np.ndarray, out: np.ndarray) -> None:
        assert out.flags.c_contiguous and out.dtype == np.float32, "decode buffers are C-contiguous float32"
        assert out.size == packed.shape[0] * packed.shape[1] // self.type_size * self.block_size
        self.decode_blocks(packed.reshape(-1, self.type_size), out.reshape(-1, self.block_size))


class Q4_0(GGUFBlockFormat, qtype=GGMLQuantizationType.Q4_0):
    """``d`` (f16) + 16 bytes of 4-bit codes; ``w = d * (q - 8)``."""

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        q = _nibbles(blocks[:, 2:])
        np.subtract(q, 8, out=q)  # wraps in uint8: viewed as int8 it is q - 8
        np.multiply(q.view(np.int8), _f16_field(blocks, 0), out=out)

    def decode_blocks_t(self, blocks: np.ndarray, out: np.ndarray) -> None:
        q = _nibbles_t(blocks[:, :, 2:])
        np.subtract(q, 8, out=q)
        np.multiply(q.view(np.int8), _f16_field_t(blocks, 0), out=out)


class Q4_1(GGUFBlockFormat, qtype=GGMLQuantizationType.Q4_1):
    """``d``, ``m`` (f16) + 16 bytes of 4-bit codes; ``w = d * q + m``."""

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        np.multiply(_nibbles(blocks[:, 4:]), _f16_field(blocks, 0), out=out)
        np.add(out, _f16_field(blocks, 2), out=out)

    def decode_blocks_t(self, blocks: np.ndarray, out: np.ndarray) -> None:
        np.multiply(_nibbles_t(blocks[:, :, 4:]), _f16_field_t(blocks, 0), out=out)
        np.add(out, _f16_field_t(blocks, 2), out=out)


class Q5_0(GGUFBlockFormat, qtype=GGMLQuantizationType.Q5_0):
    """``d`` (f16), ``qh`` (32 high bits) + 16 bytes of low nibbles; ``w = d * (q - 16)``."""

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        q = _nibbles(blocks[:, 6:])
        _add_high_bits(q, blocks[:, 2:6])
        np.subtract(q, 16, out=q)  # wraps in uint8: viewed as int8 it is q - 16
        np.multiply(q.view(np.int8), _f16_field(blocks, 0), out=out)

    def decode_blocks_t(self, blocks: np.ndarray, out: np.ndarray) -> None:
        q = _nibbles_t(blocks[:, :, 6:])
        _add_high_bits_t(q, blocks[:, :, 2:6])
        np.subtract(q, 16, out=q)
        np.multiply(q.view(np.int8), _f16_field_t(blocks, 0), out=out)


class Q5_1(GGUFBlockFormat, qtype=GGMLQuantizationType.Q5_1):
    """``d``, ``m`` (f16), ``qh`` (32 high bits) + 16 bytes of low nibbles; ``w = d * q + m``."""

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        q = _nibbles(blocks[:, 8:])
        _add_high_bits(q, blocks[:, 4:8])
        np.multiply(q, _f16_field(blocks, 0), out=out)
        np.add(out, _f16_field(blocks, 2), out=out)

    def decode_blocks_t(self, blocks: np.ndarray, out: np.ndarray) -> None:
        q = _nibbles_t(blocks[:, :, 8:])
        _add_high_bits_t(q, blocks[:, :, 4:8])
        np.multiply(q, _f16_field_t(blocks, 0), out=out)
        np.add(out, _f16_field_t(blocks, 2), out=out)


class Q8_0(GGUFBlockFormat, qtype=GGMLQuantizationType.Q8_0):
    """``d`` (f16) + 32 int8 codes; ``w = d * q``."""

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        np.multiply(blocks[:, 2:].view(np.int8), _f16_field(blocks, 0), out=out)


class F32(GGUFBlockFormat, qtype=GGMLQuantizationType.F32):
    """Plain little-endian float32."""

    extra_dtypes = (np.float32,)

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        np.copyto(out, blocks.view(np.float32))


class F16(GGUFBlockFormat, qtype=GGMLQuantizationType.F16):
    """IEEE half precision, widened exactly (ggml's ``ggml_fp16_to_fp32``)."""

    extra_dtypes = (np.float16,)

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        np.copyto(out, blocks.view(np.float16))


class BF16(GGUFBlockFormat, qtype=GGMLQuantizationType.BF16):
    """bfloat16: the top half of a float32, so widening is a 16-bit shift (ggml's ``ggml_bf16_to_fp32``)."""

    extra_dtypes = (np.uint16,)

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        np.left_shift(blocks.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
