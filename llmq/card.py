"""The model card written beside every output (``OUT.md`` next to ``OUT.gguf``)."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from .config import QuantConfig
from .inspect import summarize_types

if TYPE_CHECKING:
    from .pipeline import ConvertResult

NO_QUALITY = (
    "Not measured yet. Measure it with llama.cpp's perplexity tool on WikiText-2 against the F16 model "
    "(see llmq's README, *Evaluate*)."
)


def _source_license(model_dir: Path) -> str:
    card = model_dir / "README.md"
    if card.is_file():
        text = card.read_text(errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                if line.strip().startswith("license:"):
                    return line.split(":", 1)[1].strip() or "other"
    cfg = model_dir / "config.json"
    license_ = json.loads(cfg.read_text()).get("license") if cfg.is_file() else None
    return license_ or "other"


def _embed_types(result: ConvertResult) -> str:
    return ", ".join(f"{p.name}: {p.codec}" for p in result.plans if p.role in ("embed", "output"))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def render_card(
    result: ConvertResult,
    *,
    model_dir: Path,
    src: str,
    cfg: QuantConfig,
    command: str | None,
    quality: str | None = None,
) -> str:
    """The card's Markdown text (YAML front matter as on the Hugging Face hub)."""
    from . import __version__

    by_type = summarize_types((p.codec, p.n_params, p.nbytes) for p in result.plans)
    rows = "\n".join(f"| {t} | {n} | {params:,} | {_human(b)} |" for t, (n, params, b) in by_type.items())
    base = src if "/" in src and not Path(src).exists() else Path(src).name
    group = cfg.group
    group_text = "per output row" if group == -1 else f"groups of {group}"
    template = Template(resources.files("llmq.model_cards").joinpath("gguf.md").read_text())
    return template.substitute(
        base_model=base,
        base_url=f"https://huggingface.co/{base}",
        license=_source_license(model_dir),
        method=cfg.method,
        label=cfg.label,
        model_name=Path(src).name,
        command=command or f"llmq.convert({src!r}, config={cfg!r})",
        codec=cfg.codec_name
        if cfg.mix is None
        else f"llama.cpp's {cfg.mix.name} mix (default {cfg.codec_name})",
        group_text=(group_text + ("" if cfg.codec.symmetric else ", asymmetric (zero-point)"))
        if cfg.mix is None
        else "per-tensor types as llama-quantize's rules (table below)",
        embed_type=_embed_types(result)
        if cfg.mix is not None or cfg.tensor_types
        else cfg.embedding_codec_name,
        version=__version__,
        file_name=result.path.name,
        file_size=_human(result.nbytes),
        source_size=_human(result.source_nbytes),
        n_params=f"{result.n_params:,}",
        bpw=f"{result.bits_per_weight:.2f}",
        type_rows=rows,
        quality=quality or NO_QUALITY,
        calibration=result.calibration.description if result.calibration is not None else "none",
        search=_search_text(result),
    )


def _search_text(result: ConvertResult) -> str:
    if not result.reports or result.calibration is None:
        return "none (round to nearest)"
    from .awq import summarize

    s = summarize(list(result.reports))
    text = (
        f"output-error ratio after/before scaling {s['scale_loss_ratio']:.3f} (mean over scale groups), "
        f"mean alpha {s['alpha_mean']:.2f}, mean clip ratio {s['clip_ratio_mean']:.3f}, "
        f"{int(s['scale_fallbacks'])} groups kept unscaled"
    )
    if result.report_path is not None:
        text += f"; per-layer report `{result.report_path.name}`"
    return text


def card_path(out: Path) -> Path:
    return out.with_suffix(".md")


def write_card(
    result: ConvertResult, *, model_dir: Path, src: str, cfg: QuantConfig, command: str | None
) -> Path:
    """Write ``<out>.md`` atomically and return its path."""
    path = card_path(result.path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(render_card(result, model_dir=model_dir, src=src, cfg=cfg, command=command))
    os.replace(tmp, path)
    return path
