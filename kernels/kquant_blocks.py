"""GGUF K-quant block types: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (super-blocks of 256 values).

Each class implements ``decode_blocks`` on ``(n_blocks, type_size)`` bytes, writing
``(n_blocks, 256)`` float32 in place. Per-sub-block factors are computed first (``d * sc`` and
``dmin * m`` in float32, as ggml's ``dequantize_row_q*_K``), then one multiply (and subtract) over
the codes, so results are bit-identical to ``gguf.quants.dequantize``. Scratch is one byte per value
(the unpacked codes), so a matmul tile's decode stays well under the tile's own size.

Value order within a super-block: 2-bit and 6-bit fields hold four 32-value runs per 32 bytes (run
``s`` at bits ``2 s``), nibble fields two runs per 32 bytes; see the byte layouts on each class.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .gguf_blocks import GGUFBlockFormat, _f16_field

QK_K = 256


def _crumbs(qs: np.ndarray, q: np.ndarray) -> None:
    """Unpack 2-bit fields: ``qs`` ``(n, h, 32)`` -> ``q`` ``(n, h, 4, 32)``, run ``s`` from bits ``2 s``."""
    for s in range(4):
        np.right_shift(qs, 2 * s, out=q[:, :, s])
        np.bitwise_and(q[:, :, s], 3, out=q[:, :, s])


def _nibble_pairs(qs: np.ndarray, q: np.ndarray) -> None:
    """Unpack ``qs`` ``(n, c, 32)`` into ``q`` ``(n, c, 2, 32)``: low nibbles, then high nibbles."""
    np.bitwise_and(qs, 0x0F, out=q[:, :, 0])
    np.right_shift(qs, 4, out=q[:, :, 1])


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``get_scale_min_k4`` for the 8 sub-blocks: ``(n, 12)`` bytes -> scales, mins ``(n, 8)``."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, m


def _scale_codes(q: np.ndarray, dl: np.ndarray, ml: np.ndarray | None, out: np.ndarray) -> None:
    """``out = dl * q (- ml)`` per sub-block: ``q`` ``(n, subs * size)``, ``dl``/``ml`` ``(n, subs)``."""
    n, subs = dl.shape
    o = out.reshape(n, subs, -1)
    np.multiply(q.reshape(n, subs, -1), dl[:, :, None], out=o)
    if ml is not None:
        np.subtract(o, ml[:, :, None], out=o)


class Q2_K(GGUFBlockFormat, qtype=GGMLQuantizationType.Q2_K):
    """``scales`` (16 B: 4-bit scale | 4-bit min << 4), ``qs`` (64 B of 2-bit codes), ``d``, ``dmin`` (f16).

    ``w = d * sc * q - dmin * m`` per 16-value sub-block.
    """

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        sc = blocks[:, :16]
        dl = _f16_field(blocks, 80) * (sc & 0x0F)
        ml = _f16_field(blocks, 82) * (sc >> 4)
        q = np.empty((n, 2, 4, 32), np.uint8)
        _crumbs(blocks[:, 16:80].reshape(n, 2, 32), q)
        _scale_codes(q, dl, ml, out)


class Q3_K(GGUFBlockFormat, qtype=GGMLQuantizationType.Q3_K):
    """``hmask`` (32 B of high bits), ``qs`` (64 B, low 2 bits), 12 B of 6-bit scales, ``d`` (f16).

    ``w = d * (sc - 32) * (q - 4)``; value ``32 b + l``'s high bit is bit ``b`` of ``hmask[l]``.
    """

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        s = blocks[:, 96:108]
        low = np.concatenate([s[:, :8] & 0x0F, s[:, :8] >> 4], axis=1)
        top = (s[:, None, 8:] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]) & 3
        sc = (low | (top.reshape(n, 16) << 4)).view(np.int8) - np.int8(32)
        dl = _f16_field(blocks, 108) * sc
        q = np.empty((n, 2, 4, 32), np.uint8)
        _crumbs(blocks[:, 32:96].reshape(n, 2, 32), q)
        hm = blocks[:, :32]
        run = q.reshape(n, 8, 32)
        for b in range(8):  # a clear high bit means the code is q - 4 (wrapping in uint8 -> int8)
            minus = np.right_shift(hm, b)
            np.bitwise_and(minus, 1, out=minus)
            np.bitwise_xor(minus, 1, out=minus)
            np.left_shift(minus, 2, out=minus)
            np.subtract(run[:, b], minus, out=run[:, b])
        _scale_codes(q.view(np.int8), dl, None, out)


class Q4_K(GGUFBlockFormat, qtype=GGMLQuantizationType.Q4_K):
    """``d``, ``dmin`` (f16), 12 B of 6-bit scales/mins (``get_scale_min_k4``), ``qs`` (128 B of nibbles).

    ``w = d * sc * q - dmin * m`` per 32-value sub-block; bytes ``32 c .. 32 c + 31`` hold
    sub-block ``2 c`` in their low nibbles and ``2 c + 1`` in their high nibbles.
    """

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        sc, m = _scale_min_k4(blocks[:, 4:16])
        q = np.empty((n, 4, 2, 32), np.uint8)
        _nibble_pairs(blocks[:, 16:].reshape(n, 4, 32), q)
        _scale_codes(q, _f16_field(blocks, 0) * sc, _f16_field(blocks, 2) * m, out)


class Q5_K(GGUFBlockFormat, qtype=GGMLQuantizationType.Q5_K):
    """``d``, ``dmin`` (f16), 12 B of scales/mins as Q4_K, ``qh`` (32 B), ``qs`` (128 B of low nibbles).

    Bit 4 of value ``32 b + l`` is bit ``b`` of ``qh[l]``; ``w = d * sc * q - dmin * m``.
    """

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        sc, m = _scale_min_k4(blocks[:, 4:16])
        q = np.empty((n, 4, 2, 32), np.uint8)
        _nibble_pairs(blocks[:, 48:].reshape(n, 4, 32), q)
        qh = blocks[:, 16:48]
        run = q.reshape(n, 8, 32)
        for b in range(8):
            hb = np.right_shift(qh, b)
            np.bitwise_and(hb, 1, out=hb)
            np.left_shift(hb, 4, out=hb)
            np.bitwise_or(run[:, b], hb, out=run[:, b])
        _scale_codes(q, _f16_field(blocks, 0) * sc, _f16_field(blocks, 2) * m, out)


class Q6_K(GGUFBlockFormat, qtype=GGMLQuantizationType.Q6_K):
    """``ql`` (128 B low nibbles), ``qh`` (64 B, 2 high bits), 16 int8 scales, ``d`` (f16).

    ``w = d * sc * (q - 32)`` per 16-value sub-block. Per half of 128 values: ``ql`` bytes 0-31 hold
    runs 0 (low) and 2 (high), bytes 32-63 runs 1 and 3; ``qh`` byte ``l`` holds run ``s`` at bits ``2 s``.
    """

    def decode_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        n = blocks.shape[0]
        q = np.empty((n, 2, 4, 32), np.uint8)
        ql = blocks[:, :128].reshape(n, 2, 2, 32)
        np.bitwise_and(ql, 0x0F, out=q[:, :, 0:2])
        np.right_shift(ql, 4, out=q[:, :, 2:4])
        qh = blocks[:, 128:192].reshape(n, 2, 32)
        for s in range(4):
            hb = np.right_shift(qh, 2 * s)
            np.bitwise_and(hb, 3, out=hb)
            np.left_shift(hb, 4, out=hb)
            np.bitwise_or(q[:, :, s], hb, out=q[:, :, s])
        np.subtract(q, 32, out=q)  # wraps in uint8: viewed as int8 it is q - 32
        dl = _f16_field(blocks, 208) * blocks[:, 192:208].view(np.int8)
        _scale_codes(q.view(np.int8), dl, None, out)
