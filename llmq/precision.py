"""Float precision of the forwards and products: the calibration's forward dtype and the CPU's
float32 matmul mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# the values a dtype setting takes (`CalibConfig.forward_dtype`, `AWQConfig.score_dtype`)
DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(name: str, device: torch.device) -> str:
    """A dtype setting (`CalibConfig.forward_dtype`, `AWQConfig.score_dtype`) on ``device``: ``auto``
    is ``bfloat16`` where the device multiplies it natively (a CUDA GPU that supports it, a CPU with
    AVX512-BF16 or AMX), otherwise ``float32``; other names are returned as they are."""
    if name != "auto":
        return name
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        cpu = torch.cpu
        native = device.type == "cpu" and any(
            getattr(cpu, probe, lambda: False)()
            for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return "bfloat16" if native else "float32"


# float32 products on the CPU through oneDNN's split-bf16 path: twice the speed of plain float32 on
# CPUs with bf16 instructions, relative error ~6e-7 against float64 (plain: ~3e-7); BENCHMARKS.md
CPU_MATMUL = "medium"


@contextmanager
def matmul_precision(precision: str | None) -> Iterator[None]:
    """Run a block at ``torch.set_float32_matmul_precision(precision)`` (None: leave it), then restore it."""
    old = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


__all__ = ["CPU_MATMUL", "DTYPES", "matmul_precision", "resolve_dtype"]
