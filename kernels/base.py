"""The kernel-format base class and the registry ``FORMATS``: one storage layout = one small class.

A format knows how to validate its packed data against a weight shape ``(N, K)`` (N output rows,
K input features), cut out a range of output rows, and decode packed rows into a float32 buffer.
Everything else (whole-matrix dequantize, tiled matmul) is generic and lives in ``ops.py``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from llmq.errors import FormatError  # absolute: transformers may import this folder as `kernels`

FORMATS: dict[str, KernelFormat] = {}


def get_format(name: str) -> KernelFormat:
    """Look a format up by name (case-insensitive), e.g. ``"Q4_0"`` or ``"awq_int4"``.

    Args:
        name: a key of ``FORMATS``.

    Returns:
        The registered format instance.

    Raises:
        FormatError: if no format of that name is registered.

    Example:
        >>> get_format("q8_0").name
        'Q8_0'
    """
    fmt = FORMATS.get(str(name).upper())
    if fmt is None:
        raise FormatError(f"unknown kernel format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    return fmt


def check_shape(name: str, shape: Any) -> tuple[int, int]:
    """Return ``shape`` as a pair of positive ints ``(N, K)`` or raise FormatError naming ``name``."""
    try:
        n, k = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise FormatError(f"{name}: weight shape must be (N, K), got {shape!r}") from None
    if n <= 0 or k <= 0:
        raise FormatError(f"{name}: weight shape must be positive, got {(n, k)}")
    return n, k


class KernelFormat:
    """A packed weight layout: validation, row slicing and decode into a float32 buffer.

    Subclasses are registered in ``FORMATS`` under ``name`` when declared with ``register=True``
    (the default when they set ``name``). Formats are stateless; the registry holds one instance each.

    Decode buffers are ``(rows, K)`` (the weight's own layout) unless ``k_major`` is set, in which
    case the format decodes ``W.T`` as ``(K, rows)``: AWQ stores input features first, and writing
    its natural layout then letting BLAS read it transposed is cheaper than transposing while decoding.
    """

    name: ClassVar[str]
    # Output-row slices must start and stop on multiples of this (AWQ packs 8 output rows per int32).
    row_align: ClassVar[int] = 1
    k_major: ClassVar[bool] = False

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not register or "name" not in cls.__dict__:  # an abstract intermediate class
            return
        assert cls.name not in FORMATS, f"kernel format {cls.name} registered twice"
        FORMATS[cls.name] = cls()

    def __repr__(self) -> str:
        return f"<kernel format {self.name}>"

    # -- subclass API --------------------------------------------------------------------------
    def prepare(self, packed: Any, shape: tuple[int, int]) -> Any:
        """Validate ``packed`` for a weight of ``shape`` and return it normalized (no copy if possible).

        Raises:
            FormatError: naming the format and what does not match.
        """
        raise NotImplementedError

    def take_rows(self, packed: Any, start: int, stop: int) -> Any:
        """Return the normalized packed data of output rows ``[start, stop)`` (already validated)."""
        raise NotImplementedError

    def decode_into(self, packed: Any, out: np.ndarray) -> None:
        """Decode normalized packed rows into ``out``: float32 ``(rows, K)``, or ``(K, rows)`` if k_major."""
        raise NotImplementedError

    # -- optional: a faster layout for matmul ------------------------------------------------------
    # A dot product does not care in which order it visits the input features, and a tile's outputs
    # can be scattered back, so matmul lets a format decode in whatever column order its bits unpack
    # fastest. The defaults are the natural order.
    def x_order(self, k: int) -> np.ndarray | None:
        """Input features as ``decode_for_matmul`` lays them out (x is gathered with it), or None."""
        return None

    def y_order(self, rows: int) -> np.ndarray | None:
        """Output row (within the tile) of each ``decode_for_matmul`` output position, or None."""
        return None

    def decode_for_matmul(self, packed: Any, out: np.ndarray) -> None:
        """Decode like ``decode_into``, but with features in ``x_order`` and outputs in ``y_order``."""
        self.decode_into(packed, out)
