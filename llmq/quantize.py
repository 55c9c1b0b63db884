"""`llmq.quantize`: the conversion pipeline for research code, returning weights instead of a file."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arch import ScaleGroup, get_arch
from .awq import AWQConfig
from .calib import CalibConfig, Calibration, prepare_calibration
from .codecs import REGISTRY
from .config import QuantConfig
from .errors import LlmqError
from .imatrix_io import ImatrixFile
from .pipeline import load_imatrix, quantized_tensors
from .plan import TensorPlan, plan_tensors
from .search import LayerReport, get_search
from .source import Checkpoint, resolve_source


@dataclass
class QuantizedModel:
    """Every tensor of a quantized model as the GGUF file would store it, plus the search report.

    Attributes:
        plans: per-tensor plan in file order (GGUF name, type, group, source tensor).
        data: GGUF tensor name -> its stored bytes (uint8).
        reports: one `LayerReport` per decoder layer (scales, clip ratios, losses).
        calibration: the calibration used, if any.
        seconds: wall time of the run.
    """

    plans: tuple[TensorPlan, ...]
    data: dict[str, np.ndarray]
    reports: list[LayerReport] = field(default_factory=list)
    calibration: Calibration | None = None
    seconds: float = 0.0

    def plan(self, name: str) -> TensorPlan:
        for p in self.plans:
            if p.name == name or p.source == name:
                return p
        raise KeyError(f"no tensor {name!r} (GGUF or checkpoint name)")

    def dequantize(self, name: str) -> np.ndarray:
        """A tensor's stored values as float32, in GGUF layout (rotary Q/K rows interleaved as llama.cpp wants).

        Args:
            name: GGUF name (``blk.0.ffn_down.weight``) or checkpoint name (``model.layers.0.mlp.down_proj.weight``).
        """
        p = self.plan(name)
        return REGISTRY[p.codec].decode(self.data[p.name], p.shape)

    def report(self) -> list[dict[str, Any]]:
        """The search report, JSON-ready."""
        return [r.to_dict() for r in self.reports]


def quantize(
    model_or_path: Any,
    config: QuantConfig | None = None,
    *,
    calib: CalibConfig | torch.Tensor | None = None,
    awq: AWQConfig | None = None,
    scale_groups: tuple[ScaleGroup, ...] | None = None,
    tokenizer: Any = None,
    imatrix: str | os.PathLike[str] | ImatrixFile | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> QuantizedModel:
    """Quantize a model in memory: the same streaming pipeline as `convert`, without writing a file.

    Args:
        model_or_path: a checkpoint directory, a hub id, or a loaded transformers model (saved to a
            temporary safetensors checkpoint first, then streamed like any other).
        config: quantization settings (default: AWQ, Q4_1).
        calib: a `CalibConfig`, or your own calibration tokens: an int64 ``(n_samples, seqlen)`` tensor.
        awq: AWQ search settings.
        scale_groups: replace the architecture's scale groups (which op feeds which linears) for
            this run, e.g. to drop a group or to try another loss target.
        tokenizer: with an in-memory model, its tokenizer (needed for text or ``self`` calibration).
        imatrix: an importance matrix (file or `read_imatrix`'s result) weighing round-to-nearest
            encoding, as `convert`'s ``imatrix`` (``method="rtn"`` only).
        device: where calibration forwards run.
        progress: show progress bars.

    Returns:
        A `QuantizedModel` with each tensor's bytes, `dequantize`, and the per-layer search report.

    Example:
        >>> qm = llmq.quantize("SmolLM2-135M-Instruct", llmq.QuantConfig(quant="Q4_0"),
        ...                    calib=torch.randint(0, 49152, (16, 256)))
        >>> w = qm.dequantize("model.layers.0.mlp.down_proj.weight")
        >>> qm.report()[0]["scales"][0]["alpha"]
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        return _quantize_dir(model_or_path, config, calib, awq, scale_groups, imatrix, device, progress)
    if not hasattr(model_or_path, "save_pretrained"):
        raise LlmqError(
            f"quantize: expected a path, a hub id or a transformers model, got {type(model_or_path).__name__}"
        )
    with tempfile.TemporaryDirectory(prefix="llmq-") as tmp:
        model_or_path.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return _quantize_dir(tmp, config, calib, awq, scale_groups, imatrix, device, progress)


def _quantize_dir(
    src: str | os.PathLike[str],
    config: QuantConfig | None,
    calib: CalibConfig | torch.Tensor | None,
    awq: AWQConfig | None,
    scale_groups: tuple[ScaleGroup, ...] | None,
    imatrix: str | os.PathLike[str] | ImatrixFile | None,
    device: str,
    progress: bool,
) -> QuantizedModel:
    t0 = time.perf_counter()
    cfg = config or QuantConfig()
    model_dir = resolve_source(src)
    ckpt = Checkpoint(Path(model_dir))
    arch = get_arch(ckpt.config, source=str(Path(model_dir) / "config.json"))
    if scale_groups is not None:
        arch = dataclasses.replace(arch, scale_groups=tuple(scale_groups))
    plans = plan_tensors(ckpt, arch, cfg)
    imat = load_imatrix(imatrix, plans, cfg) if imatrix is not None else None
    search = get_search(cfg.method, awq)
    calibration = (
        prepare_calibration(Path(model_dir), calib, progress=progress) if search.needs_activations else None
    )
    reports: list[LayerReport] = []
    data = {
        p.name: b
        for p, b in quantized_tensors(
            ckpt,
            arch,
            plans,
            search,
            calibration=calibration,
            reports=reports,
            awq=awq,
            device=device,
            progress=progress,
            desc=f"{cfg.method} {cfg.label}",
            imatrix=imat.entries if imat is not None else None,
        )
    }
    return QuantizedModel(tuple(plans), data, reports, calibration, time.perf_counter() - t0)
