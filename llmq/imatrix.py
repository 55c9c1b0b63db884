"""Importance matrices (llama.cpp's ``imatrix``) computed by llmq from its calibration activations.

An entry is the mean of x^2 over the calibration tokens for each input column of a weight, keyed
by the weight's GGUF tensor name: what llama.cpp's ``llama-imatrix`` accumulates and what
``llama_model_quantize`` / llmq's weighted encoders take as ``quant_weights``.
Files in llama.cpp's formats: `llmq.imatrix_io`.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import CalibrationFlow
from .arch import get_arch
from .calib import CalibConfig, prepare_calibration
from .config import QuantConfig
from .imatrix_io import write_imatrix
from .plan import plan_tensors
from .source import Checkpoint, resolve_source
from .stream import LayerStream


def compute_imatrix(
    src: str | os.PathLike[str],
    calib: CalibConfig | torch.Tensor | None = None,
    *,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Mean x^2 per input column of every decoder-layer linear, from the FP model's activations.

    Args:
        src: model directory or hub id.
        calib: calibration settings (default ``self``), or your own ``(n, seqlen)`` token tensor.
        device: where the layer forwards run.
        progress: show a progress bar.

    Returns:
        GGUF tensor name (``blk.0.attn_q.weight``) -> float32 ``(in_features,)``.

    Example:
        >>> imat = compute_imatrix("SmolLM2-135M-Instruct", CalibConfig("groups_merged.txt"))
        >>> quantize_with_llama_cpp("smol.F16.gguf", "smol.Q4_0.gguf", "Q4_0", imatrix=imat)
    """
    model_dir = resolve_source(src)
    ckpt = Checkpoint(model_dir)
    arch = get_arch(ckpt.config, source=str(model_dir / "config.json"))
    plans = plan_tensors(ckpt, arch, QuantConfig(quant="F16"))
    calibration = prepare_calibration(model_dir, calib, progress=progress)
    flow = CalibrationFlow.from_checkpoint(calibration, ckpt, arch, device=device)
    stream = LayerStream(ckpt, arch)
    out: dict[str, np.ndarray] = {}
    try:
        layers = itertools.groupby((p for p in plans if p.layer is not None), key=lambda p: p.layer)
        for index, group in tqdm(layers, total=stream.n_layers, desc="imatrix", disable=not progress):
            layer = stream.load(index)
            stats = flow.capture(layer, [g.linears[0] for g in arch.scale_groups], write_outputs=True)
            by_module = {name: stats[g.linears[0]] for g in arch.scale_groups for name in g.linears}
            prefix = arch.layer_prefix.format(i=index)
            for p in group:
                module = p.source.removeprefix(prefix).rsplit(".", 1)[0] if p.source else ""
                if p.role == "linear" and module in by_module:
                    out[p.name] = by_module[module].mean_sq
            del layer, stats
            ckpt.release()
    finally:
        flow.close()
    return out


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
    model_dir = resolve_source(src)
    calibration = prepare_calibration(model_dir, calib, progress=progress)
    n, seqlen = calibration.tokens.shape
    entries = compute_imatrix(model_dir, calibration.tokens, device=device, progress=progress)
    return write_imatrix(
        out,
        entries,
        n_tokens=n * seqlen,
        datasets=[calibration.config.source],
        chunk_count=n,
        chunk_size=seqlen,
        legacy=legacy,
    )
