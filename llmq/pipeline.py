"""`convert`: checkpoint -> per-layer search -> codecs -> GGUF, one decoder layer resident at a time."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import ArchSpec, get_arch
from .arch.hparams import llama3_rope_factors
from .codecs import REGISTRY, GroupCodec
from .config import QuantConfig
from .plan import TensorPlan, plan_tensors
from .search import get_search
from .source import Checkpoint, resolve_source
from .stream import LayerStream
from .writers import GGUFStreamWriter, check_output
from .writers.metadata import add_general, add_hparams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote."""

    path: Path
    plans: tuple[TensorPlan, ...]
    seconds: float
    source_nbytes: int
    card_path: Path | None = None

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    @property
    def n_params(self) -> int:
        return sum(p.n_params for p in self.plans)

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(p.nbytes for p in self.plans) / self.n_params

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({self.nbytes / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits/weight) "
            f"in {self.seconds:.1f} s"
        )


def default_output(src: str | os.PathLike[str], cfg: QuantConfig) -> Path:
    """``<model name>-<quant label>.gguf`` in the current directory."""
    name = Path(str(src).rstrip("/")).name or "model"
    return Path(f"{name}-{cfg.label}.gguf")


# Rows encoded per step: the float32 copy and the codec's temporaries stay near this many values,
# so a 128k-vocabulary embedding does not multiply into gigabytes of scratch.
CHUNK_VALUES = 1 << 21


def to_gguf_layout(plan: TensorPlan, arch: ArchSpec, config: object, t: torch.Tensor) -> torch.Tensor:
    """The tensor in llama.cpp's layout: rotary rows un-permuted, norm offsets applied (dtype kept)."""
    module = ""
    if plan.source is not None and plan.layer is not None:
        module = plan.source.removeprefix(arch.layer_prefix.format(i=plan.layer)).rsplit(".", 1)[0]
    heads_key = arch.rope_permute.get(module)
    if heads_key is not None:
        # HF keeps each head's rotary halves apart; llama.cpp wants them interleaved in pairs
        n_head = int(getattr(config, heads_key))
        t = t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
    if plan.role == "norm" and arch.norm_offset:
        t = t.float() + arch.norm_offset
    return t.detach()


def encode(plan: TensorPlan, t: torch.Tensor) -> np.ndarray:
    """The bytes of one tensor in its planned type and grouping, encoded a slab of rows at a time."""
    codec = REGISTRY[plan.codec]
    grouped = issubclass(codec, GroupCodec) and plan.group != codec.block_size
    rows = t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(1, -1)
    out = np.empty(codec.byte_shape(tuple(rows.shape)), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        x = np.ascontiguousarray(rows[start : start + step].to(torch.float32).numpy())
        out[start : start + step] = codec.encode_grouped(x, plan.group) if grouped else codec.encode(x)
    return out


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    config: QuantConfig | None = None,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    write_card: bool = True,
    command: str | None = None,
) -> ConvertResult:
    """Quantize a Hugging Face checkpoint into a GGUF file that llama.cpp runs.

    Args:
        src: model directory or hub id (``owner/name``).
        out: output path; default ``<model>-<quant>.gguf`` in the current directory.
        config: quantization settings (default: 4-bit asymmetric, groups of 32 = ``Q4_1``).
        overwrite: replace an existing output.
        allow_pickle: accept ``.bin`` checkpoints (loaded with ``weights_only=True``).
        progress: show progress bars.
        write_card: write the model card ``<out>.md`` beside the file.
        command: the command line recorded in the model card.

    Returns:
        A `ConvertResult` (path, per-tensor plan, timing).

    Example:
        >>> import llmq
        >>> llmq.convert("SmolLM2-135M-Instruct", "smol-q4.gguf", llmq.QuantConfig(bits=4, group_size=128))
    """
    t0 = time.perf_counter()
    cfg = config or QuantConfig()
    model_dir = resolve_source(src, allow_pickle=allow_pickle)
    ckpt = Checkpoint(model_dir, allow_pickle=allow_pickle)
    arch = get_arch(ckpt.config, source=str(model_dir / "config.json"))
    plans = plan_tensors(ckpt, arch, cfg)
    out_path = Path(out) if out is not None else default_output(src, cfg)
    check_output(out_path, overwrite=overwrite)
    stream = LayerStream(ckpt, arch)
    search = get_search(cfg.method)
    for p in plans:
        if p.note:
            log.info("%s: %s", p.name, p.note)

    with GGUFStreamWriter(out_path, arch.gguf_arch_name, overwrite=overwrite) as w:
        add_general(
            w.gguf,
            model_dir,
            name=Path(str(src)).name,
            n_params=sum(p.n_params for p in plans),
            codec_name=cfg.codec_name,
        )
        add_hparams(w.gguf, ckpt.config, stream.n_layers)
        from .writers.tokenizer import add_tokenizer

        add_tokenizer(w.gguf, model_dir)
        w.begin(plans)
        bar = tqdm(
            total=stream.n_layers, desc=f"{cfg.method} {cfg.label}", unit="layer", disable=not progress
        )
        for index, group in itertools.groupby(plans, key=lambda p: p.layer):
            if index is None:  # embeddings, final norm, output: read straight from the checkpoint
                for p in group:
                    t = (
                        torch.from_numpy(llama3_rope_factors(ckpt.config))
                        if p.source is None
                        else ckpt.get(p.source)
                    )
                    w.write(p, encode(p, to_gguf_layout(p, arch, ckpt.config, t)))
                    del t
                ckpt.release()
                continue
            layer = stream.load(index)  # materialize one layer
            search.run(layer, index, None, arch, cfg)  # search (scales, clip) in place
            params = layer.state_dict()
            prefix = arch.layer_prefix.format(i=index)
            for p in group:  # quantize + write
                x = to_gguf_layout(p, arch, ckpt.config, params[p.source.removeprefix(prefix)])
                w.write(p, encode(p, x))
            del layer, params  # free before the next layer
            ckpt.release()
            bar.update(1)
        bar.close()
        w.commit()

    result = ConvertResult(out_path, tuple(plans), time.perf_counter() - t0, ckpt.nbytes())
    if write_card:
        from .card import write_card as _write_card

        card = _write_card(result, model_dir=model_dir, src=str(src), cfg=cfg, command=command)
        result = dataclasses.replace(result, card_path=card)
    return result
