"""The codec base class and registry: one storage format = one small registered class.

A codec turns float32 weights into the exact bytes a GGUF tensor stores, and back. Subclasses
declare their ggml type and implement `encode_blocks`/`decode_blocks` on `(n_blocks, block_size)`
float32 arrays and `(n_blocks, type_size)` uint8 arrays; this base class owns reshaping and checks.

Codecs with ``supports_importance`` also implement `encode_blocks_weighted`, llama.cpp's
importance-matrix path (`quantize_q4_0(..., quant_weights)` and siblings): `encode` validates the
per-column importance and turns it into per-element weights before handing blocks over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError
from .quants_math import importance_weights
from .xp import Array, array_namespace, bitcast, contiguous, device, is_torch_array, to_numpy

REGISTRY: dict[str, type[Codec]] = {}


def get_codec(name: str) -> type[Codec]:
    """Look a codec up by its llama.cpp name (case-insensitive), e.g. ``"Q4_0"`` or ``"f16"``.

    Raises:
        FormatError: if no codec of that name is registered.
    """
    codec = REGISTRY.get(name.upper())
    if codec is None:
        raise FormatError(f"unknown tensor type {name!r}; known types: {', '.join(sorted(REGISTRY))}")
    return codec


class Codec:
    """A GGUF storage type: block geometry plus encode/decode of whole blocks.

    Class attributes are filled in on declaration from ``gguf.GGML_QUANT_SIZES``.
    """

    name: ClassVar[str]
    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # Bits of one stored value (the code width for quantized types, the float width otherwise).
    bits: ClassVar[int]
    symmetric: ClassVar[bool] = True
    is_float: ClassVar[bool] = False
    # Whether `encode(x, importance)` searches with the importance (else it is validated, then ignored,
    # as llama.cpp ignores `quant_weights` for Q8_0 and float types).
    supports_importance: ClassVar[bool] = False
    # Whether `encode_blocks`/`decode_blocks` run on torch tensors (CPU or CUDA) as well as NumPy arrays
    # (the K-quants); other codecs get a torch tensor's values through NumPy on the CPU.
    array_api: ClassVar[bool] = False
    # Whether the NumPy encoder's compiled searches (`qkx_jit`: ggml's make_qkx3_quants, make_qx_quants)
    # beat libggml's own encoder, indexed by "with an importance matrix": CPU encodes then skip libggml
    # (same bytes; measured on one thread, BENCHMARKS.md)
    compiled_faster: ClassVar[tuple[bool, bool]] = (False, False)

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is None:  # an abstract intermediate class
            return
        cls.qtype = qtype
        cls.name = qtype.name
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        assert cls.name not in REGISTRY, f"codec {cls.name} registered twice"
        REGISTRY[cls.name] = cls

    # -- subclass API --------------------------------------------------------------------------
    @classmethod
    def encode_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """Encode ``(n_blocks, block_size)`` float32 values into ``(n_blocks, type_size)`` bytes."""
        raise NotImplementedError

    @classmethod
    def encode_blocks_weighted(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Encode ``(n_blocks, block_size)`` values minimizing the error weighted by ``weights``.

        ``weights`` has the blocks' shape (llama.cpp's per-element ``qw``). Only codecs with
        ``supports_importance`` implement it.
        """
        raise NotImplementedError(f"{cls.name} has no importance-weighted encoder")

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        """Decode ``(n_blocks, type_size)`` bytes into ``(n_blocks, block_size)`` float32 values."""
        raise NotImplementedError

    # -- shape handling ------------------------------------------------------------------------
    @classmethod
    def bits_per_weight(cls) -> float:
        return cls.type_size * 8 / cls.block_size

    @classmethod
    def can_store(cls, shape: tuple[int, ...]) -> bool:
        """Whether rows of this length split into whole blocks."""
        return len(shape) >= 1 and shape[-1] % cls.block_size == 0

    @classmethod
    def nbytes(cls, shape: tuple[int, ...]) -> int:
        """Bytes one tensor of ``shape`` takes in this format."""
        cls._check_shape(shape)
        return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // cls.block_size) * cls.type_size

    @classmethod
    def byte_shape(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        cls._check_shape(shape)
        return (*shape[:-1], shape[-1] // cls.block_size * cls.type_size)

    @classmethod
    def _check_shape(cls, shape: tuple[int, ...]) -> None:
        if not cls.can_store(shape):
            raise FormatError(
                f"{cls.name} stores rows in blocks of {cls.block_size}; a row of {shape[-1] if shape else 0} "
                f"(tensor shape {tuple(shape)}) does not split into whole blocks"
            )

    @classmethod
    def _check_importance(cls, importance: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        imp = np.asarray(importance)
        k = shape[-1] if shape else 0
        if imp.shape != (k,):
            raise FormatError(
                f"{cls.name}: importance of shape {imp.shape} does not match the rows of tensor shape "
                f"{tuple(shape)}; expected one value per column, shape ({k},)"
            )
        if not np.issubdtype(imp.dtype, np.number) or np.iscomplexobj(imp):
            raise FormatError(f"{cls.name}: importance must be real numbers, got dtype {imp.dtype}")
        imp = imp.astype(np.float32)
        finite = np.isfinite(imp)
        if not finite.all() or (imp < 0).any():
            low = imp[finite].min() if finite.any() else float("nan")
            raise FormatError(
                f"{cls.name}: importance for tensor shape {tuple(shape)} must be finite and >= 0 "
                f"(lowest finite value {low}, {int((~finite).sum())} non-finite)"
            )
        return imp

    @classmethod
    def encoder_weights(cls, x: np.ndarray, importance: np.ndarray) -> np.ndarray:
        """Validate per-column ``importance`` ``(K,)``; return what `encode_blocks_weighted` receives.

        Per-element weights of ``x`` ``(..., K)``: for the legacy types llama.cpp's
        ``importance[j] * sqrt(sigma2 + x[j]^2)``, ``sigma2`` the row's mean square (as in
        `quantize_row_q4_0_impl`). Codecs whose encoders weigh per super-block (the K-quants)
        override it to pass the importance itself.

        Raises:
            FormatError: if ``importance`` is not ``(K,)``, not finite, or negative.
        """
        x = np.asarray(x, dtype=np.float32)
        imp = cls._check_importance(importance, x.shape)
        k = x.shape[-1]
        return importance_weights(x.reshape(-1, k), imp).reshape(x.shape)

    @classmethod
    def encode(cls, x: Array, importance: Array | None = None, *, refine: bool = False) -> Array:
        """Encode a float tensor ``(..., K)`` into its GGUF bytes ``(..., K / block_size * type_size)``.

        Args:
            x: float tensor whose rows split into whole blocks: a NumPy array, or a torch tensor
                (CPU or CUDA), which gives a uint8 tensor on the same device. Codecs with
                ``array_api`` (the K-quants) encode on that device; the bytes are the same.
            importance: optional per-column importance ``(K,)`` (llama.cpp's imatrix: the mean square
                of each input column's activations). None gives llama.cpp's reference round-to-nearest
                bytes; otherwise codecs with ``supports_importance`` run llama.cpp's weighted search.
            refine: then lower the error weighted by ``importance`` (or plain squared error) further
                where the type has a `refine_blocks` step (Q4_K, Q5_K, Q6_K: `llmq.codecs.krefine`);
                the bytes then are no longer llama.cpp's, only never worse. NumPy input only.

        Raises:
            FormatError: if rows do not split into blocks or ``importance`` is malformed.

        Example:
            >>> codec = get_codec("Q4_K")
            >>> packed = codec.encode(torch.randn(8, 256, device="cuda"))  # (8, 144) uint8, on the GPU
        """
        if is_torch_array(x):
            if not cls.array_api:
                return _like(cls.encode(to_numpy(x), _numpy_or_none(importance)), x)
            x = x.detach().float().contiguous()
        else:
            x = np.ascontiguousarray(x, dtype=np.float32)
        xp = array_namespace(x)
        cls._check_shape(x.shape)
        blocks = x.reshape(-1, cls.block_size)
        if importance is None:
            out = cls.encode_blocks(blocks)
        elif not cls.supports_importance:
            cls._check_importance(to_numpy(importance), x.shape)
            out = cls.encode_blocks(blocks)
        else:
            w = cls.encoder_weights(x, to_numpy(importance))
            out = cls.encode_blocks_weighted(blocks, w.reshape(-1, cls.block_size))
        if refine:
            out = cls.refine(x, importance, out)
        assert out.dtype == xp.uint8 and out.shape[-1] == cls.type_size, (cls.name, out.dtype, out.shape)
        return out.reshape(cls.byte_shape(x.shape))

    @classmethod
    def refine(cls, x: Array, importance: Array | None, data: Array) -> Array:
        """``data``, the encoding of ``x``, improved by `refine_blocks` under ``importance``.

        NumPy arrays, or torch tensors on one device (for the K-quants, the same bytes there).
        """
        xp = array_namespace(x)
        k = x.shape[-1]
        blocks = x.reshape(-1, cls.block_size)
        if importance is None:
            imp = xp.ones(k, dtype=xp.float32, device=device(x))
        elif is_torch_array(x):
            imp = xp.asarray(importance, dtype=xp.float32, device=device(x))
        else:
            imp = np.asarray(to_numpy(importance), np.float32)
        metric = contiguous(xp.broadcast_to(imp, (blocks.shape[0] * cls.block_size // k, k))).reshape(
            blocks.shape
        )
        return cls.refine_blocks(blocks, metric, data.reshape(-1, cls.type_size))

    @classmethod
    def refine_blocks(cls, blocks: np.ndarray, weights: np.ndarray, data: np.ndarray) -> np.ndarray:
        """Encoded ``data`` of ``blocks`` improved under the per-element error ``weights`` (default: as is)."""
        return data

    # Types whose values decode as ``step * code + offset`` (an integer ``code`` in ``[lo, hi]``, per
    # value) implement these two; error-feedback rounding (`llmq.gptq`) re-chooses the codes.
    supports_grid: ClassVar[bool] = False

    @classmethod
    def grid_blocks(cls, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """``(step, offset, codes, lo, hi)`` of encoded ``data``: arrays of the blocks' shape."""
        raise NotImplementedError(f"{cls.name} has no integer grid")

    @classmethod
    def with_codes(cls, data: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """``data`` with its values' codes replaced by ``codes`` (same scales, mins and layout)."""
        raise NotImplementedError(f"{cls.name} has no integer grid")

    @classmethod
    def decode(cls, data: Array, shape: tuple[int, ...]) -> Array:
        """Decode GGUF bytes back to a float32 tensor of ``shape`` (a torch tensor stays on its device)."""
        if is_torch_array(data):
            if not cls.array_api:
                return _like(cls.decode(to_numpy(data), shape), data)
            data = bitcast(data.contiguous().view(-1), "uint8")
            size = data.numel()
        else:
            data = np.ascontiguousarray(data).view(np.uint8)
            size = data.size
        if size != cls.nbytes(shape):
            raise FormatError(f"{cls.name}: {size} bytes do not hold a tensor of shape {tuple(shape)}")
        xp = array_namespace(data)
        out = cls.decode_blocks(data.reshape(-1, cls.type_size))
        assert out.dtype == xp.float32 and out.shape[1] == cls.block_size, (cls.name, out.dtype, out.shape)
        return out.reshape(tuple(shape))


def _numpy_or_none(a: Array | None) -> np.ndarray | None:
    return None if a is None else to_numpy(a)


def _like(a: np.ndarray, t: Array) -> Array:
    """NumPy result ``a`` as a tensor on ``t``'s device."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(t.device)


class GroupCodec(Codec):
    """A block format whose scale (and min) can be shared by a group of consecutive blocks.

    Subclasses split encoding into `group_params` (the scale/min llama.cpp's reference quantizer
    derives from a set of values) and `pack` (quantize blocks with given parameters). A group of
    ``g`` values (a multiple of the block size) is then stored as ``g / block_size`` blocks carrying
    the same parameters, so the file holds exactly the group-wise quantized values.

    Importance-aware subclasses add `search_params` (llama.cpp's weighted search over a set of
    values, returning parameters and codes) and `pack_codes` (store given codes).
    """

    @classmethod
    def group_params(cls, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return float32 ``(d, m)`` of shape ``(n_groups, 1)`` for ``(n_groups, group_size)`` values.

        ``m`` is the group minimum for asymmetric codecs and zeros for symmetric ones.
        """
        raise NotImplementedError

    @classmethod
    def pack(cls, blocks: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Quantize ``(n_blocks, block_size)`` values with per-block float32 ``d``/``m`` ``(n_blocks, 1)``."""
        raise NotImplementedError

    @classmethod
    def search_params(
        cls, groups: np.ndarray, weights: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted search over ``(n_groups, group_size)`` values: ``(d, m, codes)``.

        ``d``/``m`` are float32 ``(n_groups, 1)`` as in `group_params`; ``codes`` are the stored
        unsigned codes ``(n_groups, group_size)`` uint8 the search chose (for the unrounded scale, as
        llama.cpp keeps them).
        """
        raise NotImplementedError(f"{cls.name} has no importance-weighted encoder")

    @classmethod
    def pack_codes(cls, codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Store ``(n_blocks, block_size)`` uint8 codes with per-block ``d``/``m`` ``(n_blocks, 1)``."""
        raise NotImplementedError

    @classmethod
    def encode_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return cls.pack(blocks, *cls.group_params(blocks))

    @classmethod
    def encode_blocks_weighted(cls, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
        d, m, codes = cls.search_params(blocks, weights)
        return cls.pack_codes(codes, d, m)

    @classmethod
    def encode_grouped(
        cls,
        x: np.ndarray,
        group_size: int,
        importance: np.ndarray | None = None,
        *,
        grid: IntegerGrid | None = None,
    ) -> np.ndarray:
        """Encode ``(..., K)`` with one scale (and min) per ``group_size`` values of a row.

        When ``group_size`` does not divide ``K``, the last group of each row is the remainder
        (itself whole blocks), as a row of 576 splits into 4 groups of 128 and one of 64.

        With ``importance``, each group is encoded as llama.cpp's weighted path would encode one
        wide block: the search runs over the whole group (weights from the whole row, as in
        `encode`) and its blocks store the shared ``(d, m)`` and the codes it chose.

        Args:
            x: float tensor whose rows split into whole blocks.
            group_size: a multiple of the block size, or -1 for one group per row.
            importance: optional per-column importance ``(K,)``, as for `encode`.
            grid: store the groups on the integer-zero-point grid of the safetensors formats
                (`IntegerGrid`); the search still chooses the range, then it is moved onto that grid.

        Returns:
            The GGUF bytes, as `encode` returns them.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        cls._check_shape(x.shape)
        k = x.shape[-1]
        g = k if group_size == -1 else group_size
        if g <= 0 or g % cls.block_size:
            raise FormatError(
                f"{cls.name}: group size {group_size} is not a multiple of the block size {cls.block_size}"
            )
        if g == cls.block_size and grid is None:
            return cls.encode(x, importance)
        rows = x.reshape(-1, k)
        w = None
        if importance is not None:
            if cls.supports_importance:
                w = cls.encoder_weights(rows, importance)
            else:
                cls._check_importance(importance, x.shape)
        full = k - k % g
        parts = [cls._encode_groups(rows[:, :full], g, w if w is None else w[:, :full], grid)] if full else []
        if full < k:
            parts.append(cls._encode_groups(rows[:, full:], k - full, w if w is None else w[:, full:], grid))
        out = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        return out.reshape(cls.byte_shape(x.shape))

    @classmethod
    def _encode_groups(
        cls, rows: np.ndarray, g: int, weights: np.ndarray | None, grid: IntegerGrid | None = None
    ) -> np.ndarray:
        # (n, k) with k % g == 0 -> (n, k / block_size * type_size)
        per = g // cls.block_size
        if weights is None:
            d, m = cls.group_params(rows.reshape(-1, g))
            codes = None
        else:
            d, m, codes = cls.search_params(rows.reshape(-1, g), weights.reshape(-1, g))
        blocks = rows.reshape(-1, cls.block_size)
        if grid is not None:  # the codes are re-rounded on the moved grid
            d, m = grid.snap(cls, d, m)
            codes = None
        if codes is None:
            out = cls.pack(blocks, np.repeat(d, per, 0), np.repeat(m, per, 0))
        else:
            out = cls.pack_codes(
                codes.reshape(-1, cls.block_size), np.repeat(d, per, 0), np.repeat(m, per, 0)
            )
        return out.reshape(rows.shape[0], -1)


@dataclass(frozen=True)
class IntegerGrid:
    """The grid of compressed-tensors and AutoAWQ checkpoints, held by GGUF's group-wise blocks too.

    Those formats store per group a scale in a float dtype and, when asymmetric, an *integer*
    zero-point ``z``: ``x = scale * (q - z)``. GGUF's Q4_1/Q5_1 store a free float minimum ``m``;
    with ``m = -scale * z`` (rounded to f16 in the block) both hold the same values. The range a
    search chose is widened to contain 0 (as llm-compressor's observers do), then ``z`` rounded.

    Attributes:
        scale_dtype: the float dtype the scales are stored in (``bfloat16``, ``float16``); the
            GGUF block's f16 ``d`` then holds the same value (bf16 fits f16's mantissa).
    """

    scale_dtype: str = "float16"

    def snap(self, codec: type[GroupCodec], d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-group ``(d, m)`` moved onto the grid: ``d`` representable in `scale_dtype`, ``m = -d * z``."""
        d = d.astype(np.float32)
        if not codec.symmetric:
            top = np.float32(2**codec.bits - 1)
            lo = np.minimum(m, 0).astype(np.float32)
            hi = np.maximum(m + top * d, 0).astype(np.float32)
            d = ((hi - lo) / top).astype(np.float32)
        d = round_to_dtype(d, self.scale_dtype)
        if codec.symmetric:
            return d, np.zeros_like(d)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(d > 0, np.clip(np.rint(-lo / d), 0, top), 0).astype(np.float32)
        return d, (-d * z).astype(np.float32)


def round_to_dtype(v: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``v`` rounded (to nearest even) to ``dtype`` (``float16``, ``bfloat16``, ``float32``), as float32."""
    if dtype == "float32":
        return v.astype(np.float32)
    if dtype == "float16":
        return v.astype(np.float16).astype(np.float32)
    if dtype != "bfloat16":
        raise FormatError(f"scales cannot be stored as {dtype}; choose float16, bfloat16 or float32")
    bits = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even on the kept 16 bits
    return bits.astype(np.uint32).view(np.float32).reshape(np.shape(v))
