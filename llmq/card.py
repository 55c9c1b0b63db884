"""The model card written with every output (``OUT.md`` beside a GGUF file, ``README.md`` in a checkpoint)."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from string import Template

from .config import QuantConfig
from .inspect import summarize_types
from .result import ConvertResult, card_path, output_nbytes

# per output format: (title, audience, library_name, how to run it)
FORMAT_TEXT = {
    "gguf": (
        "GGUF",
        "for llama.cpp and everything built on it (llama-cpp-python, Ollama, LM Studio)",
        "gguf",
        '```bash\nllama-cli -m $file_name -p "Hello"\n# Python: llama_cpp.Llama(model_path="$file_name")\n'
        "# Ollama: a Modelfile with `FROM ./$file_name`, then `ollama create`\n```",
    ),
    "compressed-tensors": (
        "compressed-tensors",
        "for vLLM and transformers (compressed-tensors `pack-quantized`)",
        "transformers",
        "```bash\nvllm serve ./$file_name\n# transformers (needs `compressed-tensors`): "
        'AutoModelForCausalLM.from_pretrained("./$file_name")\n```',
    ),
    "awq": (
        "AWQ",
        "for vLLM and transformers (AutoAWQ GEMM layout)",
        "transformers",
        "```bash\nvllm serve ./$file_name --quantization awq\n# transformers (needs `gptqmodel`): "
        'AutoModelForCausalLM.from_pretrained("./$file_name")\n```',
    ),
}


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


def hub_id(src: str, model_dir: Path) -> str | None:
    """The source's hub id (``owner/name``): the id converted, else what the checkpoint records."""
    if src.count("/") == 1 and not Path(src).exists():
        return src
    cfg = model_dir / "config.json"
    name = json.loads(cfg.read_text()).get("_name_or_path", "") if cfg.is_file() else ""
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name
    import gguf

    meta = gguf.Metadata.load(model_path=model_dir, model_name=None, total_params=0)
    for base in meta.base_models or []:
        url = base.get("repo_url", "")
        if url.startswith("https://huggingface.co/") and url.count("/") == 4:
            return url.removeprefix("https://huggingface.co/")
    return None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def render_card(
    result: ConvertResult,
    path: Path,
    fmt: str,
    *,
    model_dir: Path,
    src: str,
    cfg: QuantConfig,
    command: str | None,
    search: str,
    name: str | None = None,
) -> str:
    """The card's Markdown text (YAML front matter as on the Hugging Face hub) for the output at ``path``.

    ``name``: the output's final name when ``path`` is still its temporary directory.
    """
    from . import __version__

    title, audience, library, run = FORMAT_TEXT[fmt]
    by_type = summarize_types((p.codec, p.n_params, p.nbytes) for p in result.plans)
    rows = "\n".join(f"| {t} | {n} | {params:,} | {_human(b)} |" for t, (n, params, b) in by_type.items())
    base = hub_id(src, model_dir)
    front = [f"base_model: {base}"] if base else []
    front += [f"library_name: {library}", "quantized_by: llmq", f"license: {_source_license(model_dir)}"]
    front += ["tags:", f"- {fmt}", "- llmq", f"- {cfg.method}", f"- {cfg.label}"]
    group = cfg.group
    group_text = "per output row" if group == -1 else f"groups of {group}"
    fallbacks = result.fallbacks
    fb_text = ""
    if fallbacks:
        fb_rows = "\n".join(f"| `{name}` | {why} |" for name, why in fallbacks)
        fb_text = (
            f"\n{len(fallbacks)} tensors are stored in another type than asked, as llama-quantize does "
            f"when rows do not split into the type's blocks:\n\n| tensor | why |\n| --- | --- |\n{fb_rows}\n"
        )
    template = Template(resources.files("llmq.model_cards").joinpath("card.md").read_text())
    return template.substitute(
        front_matter="\n".join(front) + "\n",
        base_link=f"[{base}](https://huggingface.co/{base})" if base else f"`{Path(src).name}`",
        format_title=title,
        audience=audience,
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
        embed_type=(
            ", ".join(f"{p.name}: {p.codec}" for p in result.plans if p.role in ("embed", "output"))
            if fmt == "gguf"
            else "the source's dtype (unquantized)"
        ),
        norm_type="F32" if fmt == "gguf" else "the source's dtype",
        version=__version__,
        file_name=name or path.name,
        file_size=_human(output_nbytes(path)),
        source_size=_human(result.source_nbytes),
        n_params=f"{result.n_params:,}",
        bpw=f"{result.bits_per_weight:.2f}",
        fallbacks=fb_text,
        type_rows=rows,
        calibration=result.calibration.description if result.calibration is not None else "none",
        search=search,
        run=Template(run).substitute(file_name=name or path.name),
    )


def search_text(result: ConvertResult, report_name: str | None) -> str:
    if not result.reports or result.calibration is None:
        return "none (round to nearest)"
    from .awq import summarize

    s = summarize(list(result.reports))
    text = (
        f"output-error ratio after/before scaling {s['scale_loss_ratio']:.3f} (mean over scale groups), "
        f"mean alpha {s['alpha_mean']:.2f}, mean clip ratio {s['clip_ratio_mean']:.3f}, "
        f"{int(s['scale_fallbacks'])} groups kept unscaled"
    )
    return text + (f"; per-layer report `{report_name}`" if report_name else "")


def write_card(
    result: ConvertResult, path: Path, fmt: str, *, model_dir: Path, src: str, cfg: QuantConfig,
    command: str | None, report_name: str | None = None,
) -> Path:  # fmt: skip
    """Write the card of the output at ``path`` atomically and return the card's path."""
    card = card_path(path)
    tmp = card.with_name(f".{card.name}.{os.getpid()}.partial")
    search = search_text(result, report_name)
    tmp.write_text(
        render_card(result, path, fmt, model_dir=model_dir, src=src, cfg=cfg, command=command, search=search)
    )
    os.replace(tmp, card)
    return card
