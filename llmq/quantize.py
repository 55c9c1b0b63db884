"""`llmq.quantize`: the conversion engine for research code, returning weights instead of a file."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .arch import ScaleGroup
from .awq import AWQConfig
from .calib import CalibConfig, Calibration
from .codecs import REGISTRY
from .config import QuantConfig
from .encoding import EncoderConfig
from .engine import calibrate, needs_statistics, open_job, run
from .errors import LlmqError
from .imatrix_io import ImatrixFile
from .plan import TensorPlan
from .search import LayerReport
from .sinks import MemorySink


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
    encoder: EncoderConfig | None = None,
    scale_groups: tuple[ScaleGroup, ...] | None = None,
    tokenizer: Any = None,
    imatrix: str | os.PathLike[str] | ImatrixFile | None = None,
    device: str = "cpu",
    allow_pickle: bool = False,
    progress: bool = True,
) -> QuantizedModel:
    """Quantize a model in memory: the same engine as `convert`, with an in-memory sink.

    Args:
        model_or_path: a checkpoint directory, a hub id, or a loaded transformers model (saved to a
            temporary safetensors checkpoint first, then streamed like any other).
        config: quantization settings (default: AWQ, Q4_1).
        calib: a `CalibConfig`, or your own calibration tokens: an int64 ``(n_samples, seqlen)`` tensor.
        awq: AWQ search settings.
        encoder: encoder options (importance weighting, K-quant refinement, error feedback).
        scale_groups: replace the architecture's scale groups (which op feeds which linears) for
            this run, e.g. to drop a group or to try another loss target.
        tokenizer: with an in-memory model, its tokenizer (needed for text or ``self`` calibration).
        imatrix: an importance matrix (file or `read_imatrix`'s result) weighing round-to-nearest
            encoding, as `convert`'s ``imatrix`` (``method="rtn"`` only).
        device: where calibration forwards run.
        allow_pickle: accept ``.bin`` checkpoints (loaded with ``weights_only=True``).
        progress: show progress bars.

    Returns:
        A `QuantizedModel` with each tensor's bytes, `dequantize`, and the per-layer search report.

    Example:
        >>> qm = llmq.quantize("SmolLM2-135M-Instruct", llmq.QuantConfig(quant="Q4_0"),
        ...                    calib=torch.randint(0, 49152, (16, 256)))
        >>> w = qm.dequantize("model.layers.0.mlp.down_proj.weight")
        >>> qm.report()[0]["scales"][0]["alpha"]
    """
    kwargs = dict(config=config, calib=calib, awq=awq, encoder=encoder, scale_groups=scale_groups,
                  imatrix=imatrix, device=device, allow_pickle=allow_pickle, progress=progress)  # fmt: skip
    if isinstance(model_or_path, (str, os.PathLike)):
        return _quantize_dir(model_or_path, **kwargs)
    if not hasattr(model_or_path, "save_pretrained"):
        raise LlmqError(
            f"quantize: expected a path, a hub id or a transformers model, got {type(model_or_path).__name__}"
        )
    with tempfile.TemporaryDirectory(prefix="llmq-") as tmp:
        model_or_path.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return _quantize_dir(tmp, **kwargs)


def _quantize_dir(
    src: str | os.PathLike[str], *, config: QuantConfig | None, calib: Any, **kwargs: Any
) -> QuantizedModel:
    job = open_job(src, config, **{k: v for k, v in kwargs.items()})
    sink = MemorySink()
    if needs_statistics(job, [sink]):
        calibrate(job, calib)
    reports = run(job, [sink])
    return QuantizedModel(tuple(job.plans), sink.data, reports, job.calibration, job.seconds)
