"""What a search reports: ``llmq.*`` GGUF metadata, the per-layer JSON report, and their summary.

The search's figures are known only once every layer is done, after the GGUF header is written;
they are stored as fixed-size numeric keys (placeholders at first) and patched in place before
the file is renamed into place, so the file is still written in one streaming pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf

from .awq import AWQConfig, summarize
from .config import QuantConfig
from .search import LayerReport

if TYPE_CHECKING:
    from .calib import Calibration
    from .pipeline import ConvertResult
    from .writers import GGUFStreamWriter

# summary key -> GGUF value type of the placeholder patched at the end
SUMMARY_KEYS: dict[str, gguf.GGUFValueType] = {
    "llmq.awq.scale_loss_ratio": gguf.GGUFValueType.FLOAT32,
    "llmq.awq.alpha_mean": gguf.GGUFValueType.FLOAT32,
    "llmq.awq.clip_ratio_mean": gguf.GGUFValueType.FLOAT32,
    "llmq.awq.scale_fallbacks": gguf.GGUFValueType.UINT32,
    "llmq.search.seconds": gguf.GGUFValueType.FLOAT32,
}


def add_search_metadata(
    w: GGUFStreamWriter, cfg: QuantConfig, awq: AWQConfig | None, calibration: Calibration | None
) -> None:
    """``llmq.method`` always; for AWQ its settings, the calibration, and placeholders for its summary."""
    g = w.gguf
    g.add_string("llmq.method", cfg.method)
    if awq is None:
        return
    if calibration is not None:
        n, seqlen = calibration.tokens.shape
        g.add_string("llmq.calib.source", calibration.config.source)
        g.add_uint32("llmq.calib.samples", int(n))
        g.add_uint32("llmq.calib.seqlen", int(seqlen))
        g.add_uint32("llmq.calib.seed", int(calibration.config.seed))
    g.add_bool("llmq.awq.scale", awq.scale)
    g.add_bool("llmq.awq.duo_scaling", awq.duo_scaling)
    g.add_bool("llmq.awq.clip", awq.clip)
    g.add_bool("llmq.awq.weighted", awq.weighted)
    g.add_string("llmq.awq.inputs", awq.inputs)
    for key, vtype in SUMMARY_KEYS.items():
        g.add_key_value(key, 0, vtype)
        w.reserve(key)


def search_summary(reports: list[LayerReport], seconds: float) -> dict[str, float]:
    """The values of `SUMMARY_KEYS` for a finished search."""
    s = summarize(reports)
    return {
        "llmq.awq.scale_loss_ratio": s["scale_loss_ratio"],
        "llmq.awq.alpha_mean": s["alpha_mean"],
        "llmq.awq.clip_ratio_mean": s["clip_ratio_mean"],
        "llmq.awq.scale_fallbacks": int(s["scale_fallbacks"]),
        "llmq.search.seconds": seconds,
    }


def report_dict(result: ConvertResult, cfg: QuantConfig, awq: AWQConfig) -> dict[str, Any]:
    calib = result.calibration
    return {
        "file": str(result.path),
        "method": cfg.method,
        "quant": cfg.label,
        "awq": dataclasses.asdict(awq),
        "calibration": None
        if calib is None
        else {
            "source": calib.config.source,
            "samples": int(calib.tokens.shape[0]),
            "seqlen": int(calib.tokens.shape[1]),
            "seed": calib.config.seed,
            "seconds": calib.seconds,
        },
        "seconds": result.seconds,
        "summary": summarize(list(result.reports)),
        "layers": [r.to_dict() for r in result.reports],
    }


def report_path(out: Path) -> Path:
    return out.with_suffix(".search.json")


def write_search_report(result: ConvertResult, cfg: QuantConfig, awq: AWQConfig) -> Path:
    """Write ``<out>.search.json`` atomically; return its path."""
    path = report_path(result.path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(report_dict(result, cfg, awq), indent=1) + "\n")
    os.replace(tmp, path)
    return path
