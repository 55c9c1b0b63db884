"""NumPy reference kernels (installed as ``llmq.kernels``): decode and dequant-matmul for every format.

Installed under the llmq namespace on purpose: a top-level ``kernels`` module would shadow the
Hugging Face package of that name, which transformers imports. Python run from the repository root
still finds this folder first as a top-level ``kernels``; it then hands the name over to the next
``kernels`` on the path (Hugging Face's) and exposes nothing of its own (`_hand_over`).

Formats live in ``FORMATS``, keyed by name: the GGUF block types (``Q4_0``, ``Q4_1``, ``Q5_0``,
``Q5_1``, ``Q8_0``, the K-quants ``Q2_K``, ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K``, and ``F16``,
``BF16``, ``F32``) and AutoAWQ's packed int4 (``AWQ_INT4``). Adding a format is one
``KernelFormat`` subclass (``prepare``/``take_rows``/``decode_into``, or just ``decode_blocks`` for
a GGUF type); declaring it registers it, and the tests loop over ``FORMATS``.
A format may also offer a faster permuted layout for matmul (``decode_for_matmul`` with
``x_order``/``y_order``; ``decode_blocks_t`` for a GGUF type), which the tests check value for value.

Example:
    >>> from llmq.kernels import FORMATS, dequantize, matmul, pack_awq
    >>> w = dequantize(raw_bytes, "Q4_0", (n, k))              # float32 (n, k)
    >>> y = matmul(x, raw_bytes, "Q4_0", (n, k), tile_rows=256)  # == x @ w.T, w never whole
    >>> p = pack_awq(w, group_size=128); y = matmul(x, p, "AWQ_INT4", (n, k))
"""

from __future__ import annotations

import sys


def _hand_over(folder: str) -> None:
    """Replace this folder, imported as top-level ``kernels``, by the next ``kernels`` on ``sys.path``."""
    import importlib.util
    from importlib.machinery import PathFinder
    from pathlib import Path

    root = Path(folder).resolve().parent.parent
    path = [p for p in sys.path if Path(p or ".").resolve() != root]
    spec = PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds
    spec.loader.exec_module(module)


if __name__ == "kernels":  # the repository root is on sys.path: this is not the package asked for
    _hand_over(__file__)
else:
    from . import kquant_blocks  # noqa: F401  (registers the K-quant formats)
    from .activations import VEC_DOT_TYPE, round_activations
    from .awq import AWQ_ORDER, AWQInt4, AWQPacked, pack_awq
    from .base import FORMATS, KernelFormat, get_format
    from .gguf_blocks import GGUFBlockFormat
    from .ops import DEFAULT_TILE_ROWS, dequantize, matmul, row_slice

__all__ = [
    "AWQ_ORDER",
    "DEFAULT_TILE_ROWS",
    "FORMATS",
    "AWQInt4",
    "AWQPacked",
    "VEC_DOT_TYPE",
    "GGUFBlockFormat",
    "KernelFormat",
    "dequantize",
    "get_format",
    "matmul",
    "pack_awq",
    "round_activations",
    "row_slice",
]
