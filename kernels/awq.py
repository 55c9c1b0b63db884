"""AWQ-style packed int4 (AutoAWQ's GEMM layout): the ``AWQ_INT4`` kernel format and ``pack_awq``.

Layout: W (N, K) is stored transposed, input features first. ``qweight[k, j]`` (int32) packs output
columns 8j..8j+7: nibble i (bits 4i..4i+3) holds column ``8j + AWQ_ORDER[i]``, AWQ_ORDER = 0,2,4,6,1,3,5,7.
``qzeros[k // g, j]`` packs the per-group integer zero points the same way, ``scales[k // g, n]`` is
float16, and ``w[n, k] = (q - z) * s``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmq.errors import FormatError  # absolute: transformers may import this folder as `kernels`

from .base import KernelFormat, check_shape

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PACK = 8  # 4-bit values per int32


@dataclass(frozen=True, eq=False)
class AWQPacked:
    """One linear weight in AutoAWQ's GEMM layout (see the module docstring).

    Attributes:
        qweight: int32 ``(K, N // 8)`` packed 4-bit codes.
        qzeros: int32 ``(K // group_size, N // 8)`` packed 4-bit zero points.
        scales: float16 ``(K // group_size, N)``.
        group_size: input features sharing one scale and zero point.
    """

    qweight: np.ndarray
    qzeros: np.ndarray
    scales: np.ndarray
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        """The unpacked weight's ``(N, K)``."""
        return self.qweight.shape[1] * _PACK, self.qweight.shape[0]


def _pack_columns(q: np.ndarray) -> np.ndarray:
    """Pack ``(R, C)`` 4-bit values (C % 8 == 0) into int32 ``(R, C // 8)`` in AWQ nibble order."""
    q8 = q.astype(np.uint32).reshape(q.shape[0], -1, _PACK)
    acc = np.zeros(q8.shape[:2], dtype=np.uint32)
    for i, col in enumerate(AWQ_ORDER):
        acc |= q8[:, :, col] << np.uint32(4 * i)
    return acc.view(np.int32)


def _split(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``a.reshape(shape)`` that must be a view: decode writes through it into the caller's buffer."""
    v = a.reshape(shape)
    assert np.may_share_memory(v, a), f"reshape of a {a.shape} slice to {shape} copied"
    return v


def _unpack_columns_into(packed: np.ndarray, out: np.ndarray) -> None:
    """Unpack int32 ``(R, C // 8)`` into float32 ``out`` ``(R, C)`` in natural column order.

    Splits every byte into its two nibbles at once, then writes each nibble position straight to its
    strided output column: the inverse of the AWQ_ORDER interleave (AutoAWQ's ``unpack_awq`` followed
    by ``reverse_awq_order``) fused with the int-to-float cast.
    """
    word_bytes = packed.view(np.uint8).reshape(packed.shape[0], -1, 4)  # little-endian: nibbles 2b, 2b+1
    halves = (np.bitwise_and(word_bytes, 0x0F), np.right_shift(word_bytes, 4))
    o = _split(out, (packed.shape[0], -1, _PACK))
    for i, col in enumerate(AWQ_ORDER):
        np.copyto(o[:, :, col], halves[i & 1][:, :, i >> 1])


@functools.lru_cache(maxsize=32)
def _halves_order(cols: int) -> np.ndarray:
    """Output column held by each position of ``_unpack_halves_into``'s layout of ``cols`` columns.

    Position ``h * cols / 2 + 4 j + b`` holds nibble ``2 b + h`` of word j, i.e. column
    ``8 j + AWQ_ORDER[2 b + h]``.
    """
    h, j, b = np.meshgrid(np.arange(2), np.arange(cols // _PACK), np.arange(4), indexing="ij")
    order = (_PACK * j + np.asarray(AWQ_ORDER)[2 * b + h]).ravel()
    order.flags.writeable = False
    return order


def _unpack_halves_into(packed: np.ndarray, out: np.ndarray) -> None:
    """Unpack int32 ``(R, C // 8)`` into float32 ``out`` ``(R, C)`` in ``_halves_order(C)``.

    Every low nibble, then every high nibble, in byte order: two contiguous casting ops instead of
    eight strided ones (about 3x faster), for matmul, which only needs to know where each column went.
    """
    word_bytes = packed.view(np.uint8)  # (R, C / 2): byte b of word j at 4 j + b
    half = out.shape[1] // 2
    np.bitwise_and(word_bytes, 0x0F, out=out[:, :half], dtype=np.uint8, casting="unsafe")
    np.right_shift(word_bytes, 4, out=out[:, half:], dtype=np.uint8, casting="unsafe")


def _apply_groups(out: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g: int) -> None:
    """``out = (out - z) * s`` on ``(K, rows)`` codes with per-group ``(K / g, rows)`` zeros and scales."""
    grouped = _split(out, (-1, g, out.shape[1]))  # (K / g, g, rows): one scale row per group
    np.subtract(grouped, zeros[:, None, :], out=grouped)
    np.multiply(grouped, scales.astype(np.float32)[:, None, :], out=grouped)


def _as_int32(name: str, arr: Any, expect: tuple[int, int]) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype == np.uint32:
        a = a.view(np.int32)
    if a.dtype != np.int32 or a.shape != expect:
        raise FormatError(f"AWQ_INT4: {name} must be int32 of shape {expect}, got {a.dtype} {a.shape}")
    return a


class AWQInt4(KernelFormat):
    """AutoAWQ GEMM int4 with per-group scales and zero points; packed data is an ``AWQPacked``."""

    name = "AWQ_INT4"
    row_align = _PACK
    k_major = True

    def prepare(self, packed: Any, shape: tuple[int, int]) -> AWQPacked:
        n, k = check_shape(self.name, shape)
        if not isinstance(packed, AWQPacked):
            raise FormatError(f"AWQ_INT4: packed data must be an AWQPacked, got {type(packed).__name__}")
        if n % _PACK:
            raise FormatError(f"AWQ_INT4: N={n} of weight shape {(n, k)} is not a multiple of {_PACK}")
        g = packed.group_size
        if not isinstance(g, (int, np.integer)) or g <= 0 or k % g:
            raise FormatError(
                f"AWQ_INT4: K={k} of weight shape {(n, k)} is not a multiple of the group size {g!r}"
            )
        qweight = _as_int32("qweight", packed.qweight, (k, n // _PACK))
        qzeros = _as_int32("qzeros", packed.qzeros, (k // g, n // _PACK))
        scales = np.asarray(packed.scales)
        if scales.dtype not in (np.float16, np.float32) or scales.shape != (k // g, n):
            raise FormatError(
                f"AWQ_INT4: scales must be float16 (or float32) of shape {(k // g, n)}, got {scales.dtype} {scales.shape}"
            )
        return AWQPacked(qweight, qzeros, scales, int(g))

    def take_rows(self, packed: AWQPacked, start: int, stop: int) -> AWQPacked:
        cols = slice(start // _PACK, -(-stop // _PACK))
        return AWQPacked(
            packed.qweight[:, cols], packed.qzeros[:, cols], packed.scales[:, start:stop], packed.group_size
        )

    def decode_into(self, packed: AWQPacked, out: np.ndarray) -> None:
        assert out.dtype == np.float32 and out.shape == (packed.qweight.shape[0], packed.scales.shape[1])
        _unpack_columns_into(packed.qweight, out)
        zeros = np.empty(packed.scales.shape, dtype=np.float32)
        _unpack_columns_into(packed.qzeros, zeros)
        _apply_groups(out, zeros, packed.scales, packed.group_size)

    def y_order(self, rows: int) -> np.ndarray:
        return _halves_order(rows)

    def decode_for_matmul(self, packed: AWQPacked, out: np.ndarray) -> None:
        assert out.dtype == np.float32 and out.shape == (packed.qweight.shape[0], packed.scales.shape[1])
        _unpack_halves_into(packed.qweight, out)
        zeros = np.empty(packed.scales.shape, dtype=np.float32)
        _unpack_halves_into(packed.qzeros, zeros)  # same packing, so the same column order
        _apply_groups(out, zeros, packed.scales[:, _halves_order(out.shape[1])], packed.group_size)


def pack_awq(w: np.ndarray, group_size: int = 128) -> AWQPacked:
    """Quantize a float weight to AWQ int4 with round-to-nearest, as AutoAWQ's pseudo-quantizer does.

    Per group of ``group_size`` input features of each output row: ``s = max(max - min, 1e-5) / 15``
    (stored as float16), ``z = clip(-round(min / s), 0, 15)``, ``q = clip(round(w / s) + z, 0, 15)``,
    with ``s`` the stored float16 value so that decoding reproduces exactly what was rounded.

    Args:
        w: float weight ``(N, K)`` with N a multiple of 8.
        group_size: input features per scale/zero point; must divide K.

    Returns:
        The packed weight; ``dequantize(p, "AWQ_INT4", w.shape)`` gives ``(q - z) * s``.

    Raises:
        FormatError: for a non-2-D weight, N not a multiple of 8, K not a multiple of ``group_size``,
            or values whose group range overflows a float16 scale.

    Example:
        >>> p = pack_awq(np.random.randn(64, 256).astype(np.float32), group_size=64)
        >>> p.qweight.shape, p.scales.shape
        ((256, 8), (4, 64))
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise FormatError(f"AWQ_INT4: pack_awq takes a 2-D weight (N, K), got shape {w.shape}")
    n, k = w.shape
    if n % _PACK:
        raise FormatError(f"AWQ_INT4: N={n} of weight shape {(n, k)} is not a multiple of {_PACK}")
    if int(group_size) <= 0 or k % int(group_size):
        raise FormatError(
            f"AWQ_INT4: K={k} of weight shape {(n, k)} is not a multiple of the group size {group_size}"
        )
    g = int(group_size)
    groups = w.reshape(n, k // g, g)
    lo, hi = groups.min(axis=-1), groups.max(axis=-1)
    with np.errstate(over="ignore", invalid="ignore"):
        scales16 = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(15)).astype(np.float16)
    if not np.isfinite(scales16).all():
        raise FormatError(
            "AWQ_INT4: a group's value range is not finite in float16 scales (inf/nan or > 9.8e5)"
        )
    s = scales16.astype(np.float32)
    zeros = np.clip(-np.round(lo / s), 0, 15)
    q = np.clip(np.round(groups / s[..., None]) + zeros[..., None], 0, 15).reshape(n, k)
    return AWQPacked(
        qweight=_pack_columns(np.ascontiguousarray(q.T)),
        qzeros=_pack_columns(np.ascontiguousarray(zeros.T)),
        scales=np.ascontiguousarray(scales16.T),
        group_size=g,
    )
