"""What a search reports: ``llmq.*`` GGUF metadata, the per-layer JSON report, and their summary.

An AWQ file keeps one compact string, ``llmq.awq`` (calibration, settings, summary figures); other
files keep ``llmq.method``. Every figure is in ``OUT.search.json``. The string is kept short on
purpose: with its key it is smaller than the four ``quantize.imatrix.*`` keys llama-quantize adds to
an importance-matrix quant of the same calibration file, whatever the file names (`kv_bytes`),
so an llmq AWQ file is no larger than llama.cpp's quant of the same types. The search's figures are
known only once every layer is done, after the header is written: ``llmq.awq`` is written with a
fixed-width blank tail and patched in place before the file is renamed (one streaming pass).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .awq import AWQConfig, summarize
from .config import QuantConfig
from .encoding import EncoderConfig
from .search import LayerReport

if TYPE_CHECKING:
    from .calib import Calibration
    from .writers import GGUFStreamWriter

AWQ_KEY = "llmq.awq"
# summary field -> format; the words are padded to SUMMARY_WIDTH, so the patched string keeps its length
SUMMARY_FORMATS: dict[str, str] = {
    "loss_ratio": "{:.4f}",
    "alpha_mean": "{:.3f}",
    "clip_mean": "{:.4f}",
    "fallbacks": "{:d}",
}
SUMMARY_WIDTH = 66


def awq_settings_text(awq: AWQConfig, encoder: EncoderConfig) -> str:
    """The search and encoder settings as ``key=value`` words (the head of ``llmq.awq``)."""
    scale = ("duo" if awq.duo_scaling else "act") if awq.scale else "off"
    onoff = lambda b: "on" if b else "off"  # noqa: E731
    text = f"scale={scale} clip={onoff(awq.clip)} weighted={onoff(encoder.weighted)} inputs={awq.inputs}"
    text += " refine=on" if encoder.refine else ""
    return text + (" gptq=on" if encoder.feedback else "")


def summary_text(reports: list[LayerReport]) -> str:
    """The finished search's figures as ``key=value`` words, padded to `SUMMARY_WIDTH`."""
    s = summarize(reports)
    values = {
        "loss_ratio": s["scale_loss_ratio"],
        "alpha_mean": s["alpha_mean"],
        "clip_mean": s["clip_ratio_mean"],
        "fallbacks": int(s["scale_fallbacks"]),
    }
    text = " ".join(f"{k}={SUMMARY_FORMATS[k].format(v)}" for k, v in values.items())
    # never fails at the end of a long run: the fields fit (a fallback count of 10^4 is cut, not lost:
    # the report has it)
    return text[:SUMMARY_WIDTH].ljust(SUMMARY_WIDTH)


def parse_awq_text(text: str) -> dict[str, str | float]:
    """``llmq.awq``'s words back into a dict (numbers as floats), e.g. for `llmq inspect` or tests."""
    out: dict[str, str | float] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def calibration_words(calibration: Calibration) -> str:
    """Source (a file by its name, blanks as ``_``), windows and seed, e.g.
    ``calib=groups_merged.txt samples=64x512 seed=0``; the full path is in the report and the card."""
    n, seqlen = calibration.tokens.shape
    source = calibration.config.source
    if os.path.exists(source):
        source = os.path.basename(source)
    source = "_".join(source.split()) or "_"
    return f"calib={source} samples={n}x{seqlen} seed={calibration.config.seed}"


def awq_head(awq: AWQConfig, encoder: EncoderConfig, calibration: Calibration | None) -> str:
    """``llmq.awq`` up to its summary: calibration (if any) and settings."""
    settings = awq_settings_text(awq, encoder)
    return settings if calibration is None else f"{calibration_words(calibration)} {settings}"


def kv_bytes(key: str, value: str | int) -> int:
    """Bytes one GGUF key-value pair takes: key (u64 length + UTF-8), type (u32), then a string
    (u64 length + UTF-8) or a u32. For comparing provenance keys across files."""
    head = 8 + len(key.encode()) + 4
    return head + (8 + len(value.encode()) if isinstance(value, str) else 4)


def add_search_metadata(
    w: GGUFStreamWriter,
    cfg: QuantConfig,
    awq: AWQConfig | None,
    encoder: EncoderConfig,
    calibration: Calibration | None,
) -> None:
    """AWQ: ``llmq.awq`` with a blank summary to patch; other methods: ``llmq.method``."""
    g = w.gguf
    if awq is None:
        g.add_string("llmq.method", cfg.method)
        return
    g.add_string(AWQ_KEY, f"{awq_head(awq, encoder, calibration)} {' ' * SUMMARY_WIDTH}")
    w.reserve(AWQ_KEY)


def search_summary(
    awq: AWQConfig, encoder: EncoderConfig, calibration: Calibration | None, reports: list[LayerReport]
) -> dict[str, str]:
    """The patched value of ``llmq.awq`` for a finished search (same length as the placeholder)."""
    return {AWQ_KEY: f"{awq_head(awq, encoder, calibration)} {summary_text(reports)}"}


def report_dict(
    path: Path,
    cfg: QuantConfig,
    awq: AWQConfig,
    encoder: EncoderConfig,
    calibration: Calibration | None,
    reports: list[LayerReport],
    seconds: float,
) -> dict[str, Any]:
    calib = calibration
    return {
        "file": str(path),
        "method": cfg.method,
        "quant": cfg.label,
        "awq": dataclasses.asdict(awq),
        "encoder": {k: v for k, v in dataclasses.asdict(encoder).items() if k != "grid"},
        "calibration": None
        if calib is None
        else {
            "source": calib.config.source,
            "samples": int(calib.tokens.shape[0]),
            "seqlen": int(calib.tokens.shape[1]),
            "seed": calib.config.seed,
            "seconds": calib.seconds,
        },
        "seconds": seconds,
        "summary": summarize(list(reports)),
        "layers": [r.to_dict() for r in reports],
    }


def write_search_report(path: Path, report: dict[str, Any]) -> Path:
    """Write a search report (`report_dict`) as JSON atomically; return its path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)
    return path
