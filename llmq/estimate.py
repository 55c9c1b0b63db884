"""What a calibrated run will cost, said before it starts: the floating-point work of each layer's
calibration (forwards and Gram products, which no speed-up of the search or the codecs removes) and
the rate this device multiplies at, measured on the spot."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from .arch import ArchSpec
from .arch.hparams import head_dim
from .plan import TensorPlan
from .precision import CPU_MATMUL, matmul_precision

# the probe's square product per device type: a CPU reaches its steady rate at 1024 already, a GPU
# needs a larger product to be compute-bound
PROBE = {"cpu": 1024, "cuda": 4096}


def gram_flops(channels: int, tokens: int, block: int) -> float:
    """FLOPs of `InputStats.add`'s Gram sums over ``tokens`` rows of ``channels`` inputs: the upper
    block triangle in square blocks of ``block`` (each block row against itself and to its right)."""
    return 2.0 * tokens * sum(min(block, channels - a) * (channels - a) for a in range(0, channels, block))


def layer_flops(
    linears: Sequence[tuple[str, tuple[int, ...]]],
    readers: Sequence[str],
    *,
    tokens: int,
    seqlen: int,
    attn_width: int,
    forwards: int,
    last_reader: str | None,
    gram_block: int | None,
) -> float:
    """FLOPs of one decoder layer's calibration.

    Args:
        linears: (module name, weight shape ``(rows, K)``) of the layer's linears.
        readers: the modules whose inputs are recorded (`ArchSpec.capture_modules`).
        tokens: calibration tokens (this process's).
        seqlen: tokens per window (attention is quadratic in it).
        attn_width: query heads x head width.
        forwards: 1 when the capture pass steps the windows on (inputs from the float layer), 2 when a
            second pass runs the quantized layer; the capture pass then stops at ``last_reader``'s input.
        last_reader: the last recorded module, whose product the stopping capture pass skips.
        gram_block: `InputStats.BLOCK` when Gram matrices are summed, None for sums of squares only.

    Returns:
        The layer's multiply-add work, counted as 2 FLOPs each.
    """
    weights = sum(shape[0] * shape[1] for _, shape in linears)
    full = 2.0 * tokens * weights + 4.0 * tokens * seqlen * attn_width  # the linears, QK^T and AV
    total = full
    if forwards > 1:  # the capture pass without the last reader's product, then the quantized pass
        skipped = sum(2.0 * tokens * s[0] * s[1] for name, s in linears if name == last_reader)
        total = (full - skipped) + full
    if gram_block is not None:
        k = {name: shape[1] for name, shape in linears}
        total += sum(gram_flops(k[r], tokens, gram_block) for r in readers if r in k)
    return total


def matmul_rate(device: str | torch.device = "cpu") -> float:
    """FLOP/s of a float32 square product on ``device`` at the forwards' precision (best of 4, the first
    also warming the BLAS up)."""
    dev = torch.device(device)
    n = PROBE.get(dev.type, 4096)
    a = torch.randn(n, n, device=dev)
    best = float("inf")
    with torch.no_grad(), matmul_precision(CPU_MATMUL if dev.type == "cpu" else None):
        for _ in range(4):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            a @ a
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def plan_line(flops: float, rate: float, layers: int, device: str) -> str:
    """The sentence printed before a calibrated run: ``flops`` of calibration in ``layers`` layers,
    the measured ``rate`` and the floor they set."""
    floor = flops / rate
    return (
        f"calibration work: {flops / layers / 1e12:.3g} TFLOP per layer (forwards and Gram products); "
        f"this {device} multiplies at {rate / 1e9:.0f} GFLOP/s, so at least {_duration(floor / layers)} "
        f"per layer and {_duration(floor)} for {layers} layers, before the search and the encoding"
    )


def calibration_cost(
    job: Any, windows: tuple[int, int], *, gram_block: int | None, start: int = 0
) -> str | None:
    """`plan_line` of an `engine.Job`'s decoder layers from ``start`` on: their linears as planned,
    ``windows`` ``(n, seqlen)`` calibration tokens, Gram sums in blocks of ``gram_block`` (None: sums
    of squares only); None for mixture-of-experts layers (routing decides their work).

    Example:
        >>> calibration_cost(job, (128, 512), gram_block=InputStats.BLOCK)
        'calibration work: 0.813 TFLOP per layer (...); this cpu multiplies at 219 GFLOP/s, ...'
    """
    plans: Sequence[TensorPlan] = job.plans
    arch: ArchSpec = job.arch
    config = job.ckpt.config
    if arch.experts is not None:
        return None
    layers: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for p in plans:
        if p.role == "linear" and p.layer is not None and p.layer >= start and p.source is not None:
            layers.setdefault(p.layer, []).append((job.module_name(p), p.shape))
    if not layers:
        return None
    n, seqlen = windows
    flops = sum(
        layer_flops(
            linears,
            arch.capture_modules,
            tokens=n * seqlen,
            seqlen=seqlen,
            attn_width=int(config.num_attention_heads) * head_dim(config),
            forwards=2 if job.awq.inputs == "quant" else 1,
            last_reader=arch.capture_modules[-1],
            gram_block=gram_block,
        )
        for linears in layers.values()
    )
    return plan_line(flops, matmul_rate(job.device), len(layers), torch.device(job.device).type)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.2g} min"
    return f"{seconds / 3600:.2g} h"


__all__ = ["calibration_cost", "gram_flops", "layer_flops", "matmul_rate", "plan_line"]
