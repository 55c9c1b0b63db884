"""Importance matrices (llama.cpp's ``imatrix``) computed by llmq from its calibration activations.

An entry is the mean of x^2 over the calibration tokens for each input column of a weight, keyed
by the weight's GGUF tensor name: what llama.cpp's ``llama-imatrix`` accumulates and what
``llama_model_quantize`` / llmq's weighted encoders take as ``quant_weights``.
Files in llama.cpp's formats: `llmq.imatrix_io`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .awq import AWQConfig
from .calib import CalibConfig, Calibration
from .config import QuantConfig
from .engine import calibrate, open_job, run
from .imatrix_io import write_imatrix
from .sinks import ImatrixSink


def compute_imatrix(
    src: str | os.PathLike[str],
    calib: CalibConfig | torch.Tensor | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
    allow_pickle: bool = False,
) -> dict[str, np.ndarray]:
    """Mean x^2 per input column of every decoder-layer linear, from the FP model's activations.

    The engine with an importance-matrix sink and no search: the FP layers' outputs feed the next.

    Args:
        src: model directory or hub id.
        calib: calibration settings (default ``self``), or your own ``(n, seqlen)`` token tensor.
        device: where the layer forwards run.
        progress: show a progress bar.
        allow_pickle: accept ``.bin`` checkpoints (loaded with ``weights_only=True``).

    Returns:
        GGUF tensor name (``blk.0.attn_q.weight``) -> float32 ``(in_features,)``.

    Example:
        >>> imat = compute_imatrix("SmolLM2-135M-Instruct", CalibConfig("groups_merged.txt"))
        >>> quantize_with_llama_cpp("smol.F16.gguf", "smol.Q4_0.gguf", "Q4_0", imatrix=imat)
    """
    return _imatrix(src, calib, device=device, progress=progress, allow_pickle=allow_pickle)[0]


def _imatrix(
    src: str | os.PathLike[str], calib: CalibConfig | torch.Tensor | None, **options: Any
) -> tuple[dict[str, np.ndarray], Calibration]:
    """The importance matrix and the calibration it was measured on."""
    job = open_job(src, QuantConfig(quant="F16"), awq=AWQConfig(inputs="fp"), **options)
    sink = ImatrixSink()
    calibration = calibrate(job, calib)
    run(job, [sink])
    return sink.entries, calibration


def imatrix_file(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    calib: CalibConfig | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
    legacy: bool = False,
) -> Path:
    """Compute an importance matrix and write it as llama.cpp's GGUF imatrix (``legacy``: ``.dat``).

    llama-quantize ``--imatrix`` and ``llmq convert --imatrix`` read the result.

    Example:
        >>> imatrix_file("SmolLM2-135M-Instruct", "smol.imatrix.gguf", CalibConfig("groups_merged.txt"))
    """
    entries, calibration = _imatrix(src, calib, device=device, progress=progress)
    n, seqlen = calibration.tokens.shape
    return write_imatrix(
        out,
        entries,
        n_tokens=n * seqlen,
        datasets=[calibration.config.source],
        chunk_count=n,
        chunk_size=seqlen,
        legacy=legacy,
    )
