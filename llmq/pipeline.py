"""`convert`: checkpoint -> per-layer search -> codecs -> GGUF, one decoder layer resident at a time."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .activations import CalibrationFlow, InputStats
from .arch import ArchSpec, get_arch
from .arch.hparams import llama3_rope_factors
from .awq import AWQConfig, Target
from .calib import CalibConfig, Calibration, prepare_calibration
from .codecs import REGISTRY, GroupCodec
from .config import QuantConfig
from .errors import LlmqError
from .gptq import encode_feedback, feedback_factor
from .imatrix_io import ImatrixFile, add_imatrix_metadata, read_imatrix
from .plan import TensorPlan, plan_tensors
from .report import add_search_metadata, search_summary, write_search_report
from .search import LayerReport, Search, get_search
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
    reports: tuple[LayerReport, ...] = ()
    calibration: Calibration | None = None
    report_path: Path | None = None

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
        text = (
            f"wrote {self.path} ({self.nbytes / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits/weight) "
            f"in {self.seconds:.1f} s"
        )
        if self.calibration is not None:
            text += f"; AWQ calibrated on {self.calibration.description}"
        if self.report_path is not None:
            text += f"; report {self.report_path}"
        return text


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


def encode(
    plan: TensorPlan,
    t: torch.Tensor,
    importance: np.ndarray | None = None,
    *,
    refine: bool = False,
    gram: np.ndarray | None = None,
) -> np.ndarray:
    """The bytes of one tensor in its planned type and grouping, encoded a slab of rows at a time.

    ``importance`` (per column, for linears) selects llama.cpp's importance-weighted encoder;
    ``refine`` the codec's refinement past it (`llmq.codecs.krefine`); ``gram`` (the input's
    second moment) error-feedback rounding on the codec's grid (`llmq.gptq`) where it has one.
    """
    codec = REGISTRY[plan.codec]
    grouped = issubclass(codec, GroupCodec) and plan.group != codec.block_size
    factor = None if gram is None or grouped or not codec.supports_grid else feedback_factor(gram)
    rows = t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(1, -1)
    out = np.empty(codec.byte_shape(tuple(rows.shape)), dtype=np.uint8)
    step = max(1, CHUNK_VALUES // rows.shape[1])
    for start in range(0, rows.shape[0], step):
        x = np.ascontiguousarray(rows[start : start + step].to(torch.float32).numpy())
        if grouped:
            out[start : start + step] = codec.encode_grouped(x, plan.group, importance)
        elif factor is not None:  # rows are independent under error feedback: slabs are exact
            out[start : start + step] = encode_feedback(codec, x, factor, importance, refine=refine)
        else:
            out[start : start + step] = codec.encode(x, importance, refine=refine)
    return out


def module_name(plan: TensorPlan, arch: ArchSpec) -> str:
    """A layer tensor's module, relative to its decoder layer (``mlp.down_proj``)."""
    assert plan.source is not None and plan.layer is not None, plan
    return plan.source.removeprefix(arch.layer_prefix.format(i=plan.layer)).rsplit(".", 1)[0]


def layer_targets(plans: list[TensorPlan], arch: ArchSpec, *, refine: bool = False) -> dict[str, Target]:
    """How each linear of one layer will be stored, keyed by module name."""
    return {module_name(p, arch): Target(p.codec, p.group, refine) for p in plans if p.role == "linear"}


def quantized_tensors(
    ckpt: Checkpoint,
    arch: ArchSpec,
    plans: list[TensorPlan],
    search: Search,
    *,
    calibration: Calibration | None,
    reports: list[LayerReport],
    awq: AWQConfig | None = None,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "",
    imatrix: Mapping[str, np.ndarray] | None = None,
) -> Iterator[tuple[TensorPlan, np.ndarray]]:
    """Every planned tensor's bytes, in plan order, running ``search`` on each decoder layer first.

    Appends one `LayerReport` per decoder layer to ``reports``. ``imatrix`` (GGUF name -> per-column
    importance, e.g. `read_imatrix`'s entries) weighs the encoding of tensors the search leaves
    without an importance of its own, as llama-quantize ``--imatrix`` does.
    """
    imatrix = imatrix or {}
    stream = LayerStream(ckpt, arch)
    awq = awq or AWQConfig()
    inputs = awq.inputs
    flow = None
    if search.needs_activations:
        if calibration is None:
            raise LlmqError(f"--method {search.name} needs calibration data")
        if awq.holdout and len(calibration.tokens) <= calibration.config.batch_size:
            raise LlmqError(
                f"--awq-holdout needs at least two calibration mini-batches: {len(calibration.tokens)} "
                f"windows with --calib-batch {calibration.config.batch_size} make one"
            )
        if awq.skip_first >= calibration.tokens.shape[1]:
            raise LlmqError(
                f"--awq-skip-first {awq.skip_first} leaves nothing of {calibration.tokens.shape[1]}-token "
                "calibration windows"
            )
        flow = CalibrationFlow.from_checkpoint(calibration, ckpt, arch, device=device)
    new_stats = functools.partial(InputStats, halves=awq.holdout, skip_first=awq.skip_first)
    refine = awq.refine and search.needs_activations
    bar = tqdm(total=stream.n_layers, desc=desc, unit="layer", disable=not progress)
    try:
        for index, group_iter in itertools.groupby(plans, key=lambda p: p.layer):
            group = list(group_iter)
            if index is None:  # embeddings, final norm, output: read straight from the checkpoint
                for p in group:
                    t = (
                        torch.from_numpy(llama3_rope_factors(ckpt.config))
                        if p.source is None
                        else ckpt.get(p.source)
                    )
                    yield p, encode(p, to_gguf_layout(p, arch, ckpt.config, t), imatrix.get(p.name))
                    del t
                ckpt.release()
                continue
            layer = stream.load(index)  # materialize one layer
            targets = layer_targets(group, arch, refine=refine)
            stats = None
            if flow is not None:  # capture inputs (and step the FP activations on, for `fp` inputs)
                stats = flow.capture(
                    layer,
                    search.capture_modules(arch),
                    write_outputs=inputs == "fp",
                    new_stats=new_stats,
                )
            report = search.run(layer, index, stats, targets, arch)  # search scales, fold, clip
            params = layer.state_dict()
            prefix = arch.layer_prefix.format(i=index)
            for p in group:  # quantize + write
                x = to_gguf_layout(p, arch, ckpt.config, params[p.source.removeprefix(prefix)])
                imp = report.importance.get(module_name(p, arch)) if p.role == "linear" else None
                refined = refine and p.role == "linear"
                gram = report.hessians.get(module_name(p, arch)) if p.role == "linear" else None
                yield p, encode(p, x, imatrix.get(p.name) if imp is None else imp, refine=refined, gram=gram)
            if flow is not None and inputs == "quant":  # next inputs from the layer as quantized
                load_quantized(layer, targets, report)
                flow.advance(layer)
            reports.append(report)
            if report.details:
                log.info("layer %d: %s", index, _layer_line(report))
            del layer, params, stats  # free before the next layer
            ckpt.release()
            bar.update(1)
    finally:
        bar.close()
        if flow is not None:
            flow.close()


def load_quantized(layer: torch.nn.Module, targets: dict[str, Target], report: LayerReport) -> None:
    """Replace each linear's weight by its stored (quantized, decoded) values."""
    with torch.no_grad():
        for name, t in targets.items():
            module = layer.get_submodule(name)
            q = t.fake_quant(
                module.weight.data.numpy(), report.importance.get(name), report.hessians.get(name)
            )
            module.weight.copy_(torch.from_numpy(q))


def _layer_line(report: LayerReport) -> str:
    parts = []
    for g in report.details.get("scales", []):
        if "loss_before" in g:
            alpha = "none" if g.get("fallback") else f"{g['alpha']:.2f}"
            parts.append(f"{g['prev']}: loss {g['loss_before']:.4g} -> {g['loss_after']:.4g} (alpha {alpha})")
    clips = report.details.get("clip", {})
    if clips:
        ratios = [c["mean_ratio"] for c in clips.values()]
        parts.append(f"clip mean ratio {sum(ratios) / len(ratios):.3f}")
    return "; ".join(parts)


def load_imatrix(
    imatrix: str | os.PathLike[str] | ImatrixFile, plans: list[TensorPlan], cfg: QuantConfig
) -> ImatrixFile:
    """Read and check an importance matrix against the plan: one value per input column."""
    if cfg.method != "rtn":
        raise LlmqError(
            "--imatrix weighs round-to-nearest encoding (--method rtn); --method awq measures its own "
            "importance from the calibration activations, adjusted for its scales"
        )
    imat = imatrix if isinstance(imatrix, ImatrixFile) else read_imatrix(imatrix)
    used = 0
    for p in plans:
        v = imat.entries.get(p.name)
        if v is None or len(p.shape) != 2:
            continue
        if v.shape != (p.shape[-1],):
            raise LlmqError(
                f"{imat.path}: imatrix entry {p.name} has {v.size} values; the tensor has "
                f"{p.shape[-1]} input columns (an imatrix of another model?)"
            )
        used += 1
    if used == 0:
        raise LlmqError(f"{imat.path}: none of its {len(imat.entries)} entries names a tensor of this model")
    missing = [p.name for p in plans if p.role == "linear" and p.name not in imat.entries]
    if missing:
        log.warning(
            "imatrix %s has no entry for %d linears (e.g. %s): round to nearest",
            imat.path,
            len(missing),
            missing[0],
        )
    return imat


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    config: QuantConfig | None = None,
    *,
    calib: CalibConfig | torch.Tensor | None = None,
    awq: AWQConfig | None = None,
    imatrix: str | os.PathLike[str] | ImatrixFile | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    write_card: bool = True,
    write_report: bool = True,
    command: str | None = None,
) -> ConvertResult:
    """Quantize a Hugging Face checkpoint into a GGUF file that llama.cpp runs.

    Args:
        src: model directory or hub id (``owner/name``).
        out: output path; default ``<model>-<quant>.gguf`` in the current directory.
        config: quantization settings (default: AWQ, 4-bit asymmetric, groups of 32 = ``Q4_1``).
        calib: calibration for ``method="awq"``: a `CalibConfig` (default: ``self``, text sampled
            from the model) or your own int64 ``(n_samples, seqlen)`` token tensor.
        awq: AWQ search settings (default `AWQConfig()`).
        imatrix: an importance matrix (llama.cpp GGUF or legacy ``.dat`` file, or `read_imatrix`'s
            result) to weigh the encoders with, as llama-quantize ``--imatrix``; ``method="rtn"``
            only (AWQ measures its own importance, adjusted for its scales).
        device: where calibration forwards run (``cpu``, ``cuda``); the codecs run on the CPU.
        overwrite: replace an existing output.
        allow_pickle: accept ``.bin`` checkpoints (loaded with ``weights_only=True``).
        progress: show progress bars.
        write_card: write the model card ``<out>.md`` beside the file.
        write_report: for a search, write its per-layer JSON report ``<out>.search.json`` beside the file.
        command: the command line recorded in the model card.

    Returns:
        A `ConvertResult` (path, per-tensor plan, timing, search reports).

    Example:
        >>> import llmq
        >>> llmq.convert("SmolLM2-135M-Instruct", "smol-q4.gguf", llmq.QuantConfig(bits=4, group_size=128),
        ...              calib=llmq.CalibConfig("groups_merged.txt"))
    """
    t0 = time.perf_counter()
    cfg = config or QuantConfig()
    model_dir = resolve_source(src, allow_pickle=allow_pickle)
    ckpt = Checkpoint(model_dir, allow_pickle=allow_pickle)
    arch = get_arch(ckpt.config, source=str(model_dir / "config.json"))
    plans = plan_tensors(ckpt, arch, cfg)
    out_path = Path(out) if out is not None else default_output(src, cfg)
    check_output(out_path, overwrite=overwrite)
    awq = awq or AWQConfig()
    search = get_search(cfg.method, awq)
    imat = load_imatrix(imatrix, plans, cfg) if imatrix is not None else None
    for p in plans:
        if p.note:
            log.info("%s: %s", p.name, p.note)
    calibration = None
    if search.needs_activations:
        calibration = prepare_calibration(model_dir, calib, progress=progress)
        log.info("calibration: %s", calibration.description)
        if progress:  # say which source was used, also when it is the default
            print(f"llmq: calibration: {calibration.description}", file=sys.stderr)

    reports: list[LayerReport] = []
    with GGUFStreamWriter(out_path, arch.gguf_arch_name, overwrite=overwrite) as w:
        add_general(
            w.gguf,
            model_dir,
            name=Path(str(src)).name,
            n_params=sum(p.n_params for p in plans),
            codec_name=cfg.file_type_name,
        )
        add_hparams(w.gguf, ckpt.config, int(getattr(ckpt.config, arch.n_layers_key)))
        from .writers.tokenizer import add_tokenizer

        add_tokenizer(w.gguf, model_dir)
        add_search_metadata(w, cfg, awq if search.needs_activations else None, calibration)
        if imat is not None:
            add_imatrix_metadata(w.gguf, imat)
        w.begin(plans)
        for p, data in quantized_tensors(
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
        ):
            w.write(p, data)
        if search.needs_activations:
            w.patch(search_summary(awq, calibration, reports))
        w.commit()

    result = ConvertResult(
        out_path,
        tuple(plans),
        time.perf_counter() - t0,
        ckpt.nbytes(),
        reports=tuple(reports),
        calibration=calibration,
    )
    if write_report and search.needs_activations:
        result = dataclasses.replace(result, report_path=write_search_report(result, cfg, awq))
    if write_card:
        from .card import write_card as _write_card

        card = _write_card(result, model_dir=model_dir, src=str(src), cfg=cfg, command=command)
        result = dataclasses.replace(result, card_path=card)
    return result
