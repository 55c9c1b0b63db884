"""User-facing quantization settings and their mapping onto GGUF storage types."""

from __future__ import annotations

from dataclasses import dataclass

from .codecs import REGISTRY, Codec, GroupCodec, get_codec
from .errors import FormatError
from .mixes import MIXES, Mix, parse_tensor_types

# (bits, symmetric) -> the GGUF legacy type that stores exactly that group-wise quantization
_GGUF_BY_BITS: dict[tuple[int, bool], str] = {
    (4, True): "Q4_0",
    (4, False): "Q4_1",
    (5, True): "Q5_0",
    (5, False): "Q5_1",
    (8, True): "Q8_0",
}
FLOAT_TYPES = ("F32", "F16", "BF16")
METHODS = ("awq", "rtn")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the linear weights of a model.

    Either name a GGUF type or llama.cpp mix with ``quant`` (``Q4_0``, ``Q8_0``, ``F16``, ``Q4_K``,
    ``Q4_K_M`` ...), or give a group-wise uniform scheme with ``bits``/``group_size``/``sym``; a group
    of ``g`` values is stored as ``g / 32`` GGUF blocks sharing one scale (and min), so the file holds
    exactly those values. A mix (`llmq.mixes.MIXES`) picks each tensor's type by llama-quantize's rules.

    Attributes:
        quant: GGUF type or mix name; overrides bits/group_size/sym.
        bits: 2..8 bits per weight (GGUF legacy types store 4, 5 and 8).
        group_size: values sharing a scale: a multiple of 32, or -1 for one group per output row.
        sym: symmetric (no zero-point) quantization.
        embed_type: type of the token embedding and output tensors.
        method: the search run before encoding: ``awq`` (activation-aware scales and clipping on
            calibration data, importance-weighted encoding) or ``rtn`` (none: round to nearest).
        tensor_types: ``(regex, type)`` overrides searched in each GGUF tensor name, first match
            wins (llama-quantize's ``--tensor-type``); a tensor they name keeps no mix rule.

    Example:
        >>> QuantConfig(bits=4, group_size=128).codec_name
        'Q4_1'
    """

    quant: str | None = None
    bits: int = 4
    group_size: int = 32
    sym: bool = False
    embed_type: str | None = None
    method: str = "awq"
    tensor_types: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "tensor_types", parse_tensor_types([f"{p}={t}" for p, t in self.tensor_types])
        )
        if self.quant is not None:
            object.__setattr__(self, "quant", self.quant.upper())
            if self.quant not in MIXES and self.quant not in REGISTRY:
                raise FormatError(
                    f"unknown type or mix {self.quant!r}; types: {', '.join(sorted(REGISTRY))}; "
                    f"llama.cpp mixes: {', '.join(MIXES)}"
                )
            if self.group_size != 32 and self.group_size != self.codec.block_size:
                raise FormatError(
                    f"quant={self.quant} fixes the block layout; drop group_size={self.group_size}"
                )
        else:
            if not 2 <= self.bits <= 8:
                raise FormatError(f"bits={self.bits}: choose 2..8")
            if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 32):
                raise FormatError(
                    f"group_size={self.group_size}: GGUF stores blocks of 32 values, so a group must be "
                    "a multiple of 32 (32, 64, 128, 256 ...) or -1 (one group per output row)"
                )
            if self.bits == 8:  # Q8_0 is the only 8-bit type and it has no zero-point
                object.__setattr__(self, "sym", True)
            if (self.bits, self.sym) not in _GGUF_BY_BITS:
                have = ", ".join(f"{b}-bit {'sym' if s else 'asym'}" for b, s in _GGUF_BY_BITS)
                raise FormatError(
                    f"bits={self.bits}{' sym=True' if self.sym else ''} has no GGUF type that stores it exactly "
                    f"(GGUF legacy types hold: {have}); for 2, 3 or 6 bits use a K-quant (quant=Q2_K, Q3_K_M, Q6_K ...)"
                )
        if self.embed_type is not None:
            object.__setattr__(self, "embed_type", self.embed_type.upper())
            get_codec(self.embed_type)
        if self.method not in METHODS:
            raise FormatError(f"method={self.method}: choose one of {', '.join(METHODS)}")
        if self.codec.is_float:  # nothing to search: float types store the weights as they are
            object.__setattr__(self, "method", "rtn")

    @property
    def mix(self) -> Mix | None:
        """The llama.cpp mix ``quant`` names (``Q4_K_M``), if it names one."""
        return MIXES.get(self.quant) if self.quant is not None else None

    @property
    def codec_name(self) -> str:
        """The GGUF type the linear weights are stored as (a mix's default type)."""
        if self.mix is not None:
            return self.mix.default
        return self.quant if self.quant is not None else _GGUF_BY_BITS[(self.bits, self.sym)]

    @property
    def file_type_name(self) -> str:
        """What ``general.file_type`` describes: the mix name, else the linears' type."""
        return self.mix.name if self.mix is not None else self.codec_name

    @property
    def codec(self) -> type[Codec]:
        return REGISTRY[self.codec_name]

    @property
    def group(self) -> int:
        """Group size of the linears (the block size when ``quant`` names a type)."""
        return self.codec.block_size if self.quant is not None else self.group_size

    @property
    def embedding_codec_name(self) -> str:
        if self.embed_type is not None:
            return self.embed_type
        return self.codec_name if self.codec_name in FLOAT_TYPES else "Q8_0"

    @property
    def label(self) -> str:
        """Short name used in file names: ``Q4_0``, ``Q4_K_M``, ``Q4_1-g128``, ``Q4_1-gchan``."""
        if self.mix is not None:
            return self.mix.name
        codec = self.codec
        if not issubclass(codec, GroupCodec) or self.group == codec.block_size:
            return self.codec_name
        return f"{self.codec_name}-g{'chan' if self.group == -1 else self.group}"
