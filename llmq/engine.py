"""The engine: open a model once, plan it, search each decoder layer, encode, hand every tensor to the sinks.

A sink (`llmq.sinks`) receives each planned tensor as an `Encoded` record: the values in the
checkpoint's own layout (after the search) and, for quantized tensors, their encoded blocks. The
GGUF file, the safetensors checkpoints, `llmq.quantize`'s in-memory result and importance-matrix
accumulation are all sinks of the same loop, so one search feeds every output.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import moe
from .activations import CalibrationFlow, InputStats, StatsFactory
from .arch import ArchSpec, ScaleGroup, get_arch
from .arch.hparams import llama3_rope_factors
from .awq import AWQConfig
from .calib import BUILTIN, DEFAULT_SOURCE, CalibConfig, Calibration, prepare_calibration
from .codecs import REGISTRY
from .config import QuantConfig
from .distributed import all_reduce_stats, owners, share, world
from .encoding import EncoderConfig, Target, encode_tensor
from .errors import LlmqError
from .estimate import calibration_cost
from .gptq import feedback_factor
from .imatrix_io import ImatrixFile, check_imatrix
from .methods import LayerReport, Search, get_search
from .plan import TensorPlan, plan_tensors
from .precision import CPU_MATMUL, matmul_precision
from .progress import LayerProgress
from .recipes import default_awq, default_encoder
from .resume import WorkDir
from .source import Checkpoint, resolve_source
from .stream import LayerStream

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One planned tensor as the engine hands it to the sinks.

    Attributes:
        plan: the tensor's plan (GGUF name and type, checkpoint name, role, layer).
        tensor: its values in the checkpoint's layout after the search (scales folded, clipped).
        importance: per-column importance its encoding used (or would use), if any.
        data: for linears, the encoded blocks in ``plan.codec``'s layout, rows in checkpoint order;
            for other tensors None (each sink encodes them in the type it stores: `Encoded.bytes`).
    """

    plan: TensorPlan
    tensor: torch.Tensor
    importance: np.ndarray | None = None
    data: np.ndarray | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)

    def bytes(self) -> np.ndarray:
        """The tensor in ``plan.codec``'s bytes (rows in checkpoint order), encoded once."""
        if self.data is None:
            self.data = encode_tensor(self.plan, self.tensor, self.importance, None, self.encoder)
        return self.data

    def values(self) -> torch.Tensor:
        """The stored values as float32 (decoded blocks for quantized tensors)."""
        codec = REGISTRY[self.plan.codec]
        return torch.from_numpy(np.asarray(codec.decode(self.bytes(), tuple(self.tensor.shape))))


class Sink(Protocol):
    """Where the engine's tensors go. Subclasses of `llmq.sinks.base.SinkBase` implement it."""

    # whether it reads tensors at all (an importance-matrix sink reads only statistics)
    wants_tensors: bool
    # whether the engine must capture calibration statistics for it
    needs_statistics: bool

    def check(self, job: Job) -> None: ...
    def grid_dtype(self, job: Job) -> str | None: ...
    def begin(self, job: Job) -> None: ...
    def layer_stats(self, job: Job, index: int, stats: dict[str, InputStats]) -> None: ...
    def write(self, job: Job, item: Encoded) -> None: ...
    def commit(self, job: Job, reports: list[LayerReport]) -> Path | None: ...
    def abort(self) -> None: ...


@dataclass
class Job:
    """A model opened once with its plan and settings: what every step and sink of a run reads."""

    src: str
    model_dir: Path
    ckpt: Checkpoint
    arch: ArchSpec
    cfg: QuantConfig
    plans: list[TensorPlan]
    search: Search
    awq: AWQConfig
    encoder: EncoderConfig
    imatrix: ImatrixFile | None = None
    calibration: Calibration | None = None
    device: str = "cpu"
    progress: bool = True
    seconds: float = 0.0
    timing: str = ""

    @property
    def n_layers(self) -> int:
        return int(getattr(self.ckpt.config, self.arch.n_layers_key))

    def module_name(self, plan: TensorPlan) -> str:
        """A layer tensor's module, relative to its decoder layer (``mlp.down_proj``)."""
        assert plan.source is not None and plan.layer is not None, plan
        return plan.source.removeprefix(self.arch.layer_prefix.format(i=plan.layer)).rsplit(".", 1)[0]


def open_job(
    src: str | os.PathLike[str],
    cfg: QuantConfig | None = None,
    *,
    awq: AWQConfig | None = None,
    encoder: EncoderConfig | None = None,
    imatrix: str | os.PathLike[str] | ImatrixFile | None = None,
    scale_groups: Sequence[ScaleGroup] | None = None,
    device: str = "cpu",
    allow_pickle: bool = False,
    progress: bool = True,
) -> Job:
    """Open a checkpoint, find its architecture and plan every tensor, before any weight is read.

    Raises:
        LlmqError: a missing or unreadable checkpoint, an unknown architecture, a bad imatrix.
    """
    cfg = cfg or QuantConfig()
    model_dir = resolve_source(src, allow_pickle=allow_pickle)
    ckpt = Checkpoint(model_dir, allow_pickle=allow_pickle)
    arch = get_arch(ckpt.config, source=str(model_dir / "config.json"))
    if scale_groups is not None:
        from dataclasses import replace

        arch = replace(arch, scale_groups=tuple(scale_groups))
    plans = plan_tensors(ckpt, arch, cfg)
    awq = awq or default_awq(cfg)
    search = get_search(cfg.method, awq if cfg.method == "awq" else None)
    imat = check_imatrix(imatrix, plans, cfg) if imatrix is not None else None
    for p in plans:
        if p.note:
            log.info("%s: %s", p.name, p.note)
    return Job(
        str(src), model_dir, ckpt, arch, cfg, plans, search, awq, encoder or default_encoder(cfg), imat,
        device=device, progress=progress,
    )  # fmt: skip


def needs_statistics(job: Job, sinks: Sequence[Sink]) -> bool:
    return _needs_gram(job) or any(s.needs_statistics for s in sinks)


def _needs_gram(job: Job) -> bool:
    """Whether the search or the encoder reads the inputs' Gram matrices (an importance matrix does not)."""
    return job.search.needs_activations or job.encoder.needs_statistics


def calibrate(job: Job, calib: CalibConfig | torch.Tensor | None) -> Calibration:
    """Tokenize (or sample) the calibration windows once, saying which source is used."""
    if job.progress and isinstance(calib, CalibConfig | None):  # say what comes first: it can take long
        cfg = calib or CalibConfig(DEFAULT_SOURCE)
        how = (
            f"sampling {cfg.n_samples} x {cfg.seqlen} tokens from the model on {job.device} (a text file is faster)"
            if cfg.source == "self"
            else f"up to {cfg.n_samples} x {cfg.seqlen} tokens (the distinct windows of llmq's own text)"
            if cfg.source == BUILTIN
            else f"{cfg.n_samples} x {cfg.seqlen} tokens"
        )
        print(f"llmq: calibration: {cfg.source}, {how}", file=sys.stderr)
    job.calibration = prepare_calibration(job.model_dir, calib, progress=job.progress, device=job.device)
    log.info("calibration: %s", job.calibration.description)
    return job.calibration


def run(job: Job, sinks: Sequence[Sink], work: WorkDir | None = None) -> list[LayerReport]:
    """Stream the model through the search into every sink; commit them all or abort them all.

    Args:
        job: the opened model and settings.
        sinks: where the tensors go.
        work: a work directory: layers it holds are replayed, each new one is kept there, and it is
            removed once every sink committed.

    Returns:
        One `LayerReport` per decoder layer.
    """
    t0 = time.perf_counter()
    reports: list[LayerReport] = []
    flow = None
    stats_needed = needs_statistics(job, sinks)
    if stats_needed:
        if job.calibration is None:
            raise LlmqError(f"method {job.search.name} needs calibration data")
        flow = CalibrationFlow.from_checkpoint(job.calibration, job.ckpt, job.arch, device=job.device)
    tensor_sinks = [s for s in sinks if s.wants_tensors]
    # without forwards the layer keeps the checkpoint's dtype: each encoded slab is converted alone
    stream = LayerStream(job.ckpt, job.arch, dtype=torch.float32 if flow is not None else None)
    start = 0 if work is None else work.resume_point(needs_activations=flow is not None)
    if flow is not None and job.progress:  # what the calibration alone will cost, before it starts
        gram = InputStats.BLOCK if _needs_gram(job) else None
        cost = calibration_cost(job, (flow.store.n_samples, flow.store.seqlen), gram_block=gram, start=start)
        if cost:
            print(f"llmq: {cost}", file=sys.stderr)
    if start:
        log.warning("resuming: layers 0-%d are kept in %s", start - 1, work.path)  # type: ignore[union-attr]
        if flow is not None:
            flow.store.load(work.acts_file(start))  # type: ignore[union-attr]
    try:
        for s in sinks:
            s.begin(job)
        prog = LayerProgress(job.n_layers, f"{job.search.name} {job.cfg.label}", enabled=job.progress)
        try:
            for index, group in itertools.groupby(job.plans, key=lambda p: p.layer):
                plans = list(group)
                if index is None:
                    _outside_layers(job, plans, tensor_sinks, prog)
                elif index < start:  # finished by an earlier run
                    reports.append(_replay(job, work, index, plans, tensor_sinks))  # type: ignore[arg-type]
                    prog.layer_done(index, replayed=True)
                else:
                    layer = stream.load(index)  # materialize one layer
                    report, items = _layer(job, layer, index, plans, flow, sinks, tensor_sinks, prog)
                    if work is not None:  # keep it: the layer, then the next layer's inputs
                        with prog.phase(f"layer {index}", "write"):
                            work.save_layer(index, {_kept_name(i): _kept(i) for i in items}, report)
                            if flow is not None and work.activations_due():
                                work.save_activations(index + 1, flow.store)
                    reports.append(report)
                    del layer, items
                    prog.layer_done(index)
                job.ckpt.release()
        finally:
            prog.close()
        job.timing = prog.summary()
        job.seconds = time.perf_counter() - t0
        for s in sinks:
            s.commit(job, reports)
        if work is not None:
            work.remove()
    except BaseException:
        for s in sinks:
            s.abort()
        if work is not None and work.resume_point(needs_activations=flow is not None):
            log.warning("finished layers are kept in %s: the same command with --resume continues", work.path)
            work.close()
        elif work is not None:  # nothing finished: nothing worth keeping
            work.remove()
        raise
    finally:
        if flow is not None:
            flow.close()
    return reports


def _outside_layers(job: Job, plans: list[TensorPlan], sinks: Sequence[Sink], prog: LayerProgress) -> None:
    """Embeddings, final norm, output and computed tensors: read straight from the checkpoint."""
    computed = job.arch.computed(job.ckpt.config) if job.arch.computed is not None else {}
    for p in plans:
        if p.source is None:  # the family's computed tensors, or llama.cpp's rope factors of Llama 3.1
            t = torch.from_numpy(
                computed[p.name] if p.name in computed else llama3_rope_factors(job.ckpt.config)
            )
        else:
            t = job.ckpt.get(p.source)
        imp = job.imatrix.entries.get(p.name) if job.imatrix is not None else None
        item = Encoded(p, t, imp, encoder=job.encoder)
        with prog.phase(p.name, "write"):  # each sink encodes it in the type it stores
            for s in sinks:
                s.write(job, item)


def _kept_name(item: Encoded) -> str:
    return item.plan.name + (".data" if item.data is not None else ".tensor")


def _kept(item: Encoded) -> torch.Tensor:
    return (
        torch.from_numpy(np.ascontiguousarray(item.data)) if item.data is not None else item.tensor.detach()
    )


def _replay(
    job: Job, work: WorkDir, index: int, plans: list[TensorPlan], sinks: Sequence[Sink]
) -> LayerReport:
    """Hand a layer an earlier run finished to the sinks, as that run did."""
    tensors, report = work.load_layer(index)
    for p in plans:
        if p.name + ".data" in tensors:
            item = Encoded(p, torch.empty(0), data=tensors[p.name + ".data"].numpy(), encoder=job.encoder)
        else:
            item = Encoded(p, tensors[p.name + ".tensor"], encoder=job.encoder)
        for s in sinks:
            s.write(job, item)
    return report


def _layer(
    job: Job,
    layer: torch.nn.Module,
    index: int,
    plans: list[TensorPlan],
    flow: CalibrationFlow | None,
    sinks: Sequence[Sink],
    tensor_sinks: Sequence[Sink],
    prog: LayerProgress,
) -> tuple[LayerReport, list[Encoded]]:
    """One decoder layer: capture inputs -> search -> encode -> sinks -> next inputs -> free."""
    arch, search, what = job.arch, job.search, f"layer {index}"
    targets = {job.module_name(p): Target(p.codec, p.group, job.encoder) for p in plans if p.role == "linear"}
    stats = None
    if flow is not None:  # capture inputs (and step the FP activations on, for `fp` inputs)
        with prog.phase(what, "calibrate"):
            stats = flow.capture(
                layer,
                arch.capture_modules,
                write_outputs=job.awq.inputs == "fp",
                new_stats=_stats_factory(job),
            )
            all_reduce_stats(stats)  # every process's windows (torchrun), the same sums in each
            for s in sinks:
                s.layer_stats(job, index, stats)
    # the candidates' Gram products at the forwards' CPU precision (relative error ~6e-7)
    cpu = torch.device(job.device).type == "cpu"
    with prog.phase(what, "search"), matmul_precision(CPU_MATMUL if cpu else None):
        report = search.run(layer, index, stats, targets, arch)  # search scales, fold, clip
    params = layer.state_dict()
    if arch.experts is not None:  # the stacked experts as GGUF holds them: gate, up, down
        params.update(arch.experts.views(params))
    prefix = arch.layer_prefix.format(i=index)
    items = [Encoded(p, params[p.source.removeprefix(prefix)].detach(), encoder=job.encoder) for p in plans]
    encoded = {job.module_name(i.plan): i for i in items if i.plan.role == "linear"}
    with prog.phase(what, "encode"):
        _encode(job, encoded, report, stats, targets)
    with prog.phase(what, "write"):  # hand to sinks
        for item in items:
            for s in tensor_sinks:
                s.write(job, item)
    if flow is not None and job.awq.inputs == "quant":  # next inputs from the layer as quantized
        with torch.no_grad(), prog.phase(what, "calibrate"):
            for name, item in encoded.items():
                if arch.experts is None or not arch.experts.assign(layer, name, item.values()):
                    layer.get_submodule(name).weight.copy_(item.values())
            flow.advance(layer)
    if report.details:
        log.info("layer %d: %s", index, report.line())
    del params, stats, encoded  # free before the next layer
    return report, items


def _stats_factory(job: Job) -> StatsFactory:
    """Input statistics with Gram matrices where `_needs_gram`; otherwise (an importance matrix alone)
    per-channel sums of squares: no Gram products, ``C`` floats each."""
    return InputStats if _needs_gram(job) else partial(InputStats, gram=False)


def _encode(
    job: Job,
    encoded: dict[str, Encoded],
    report: LayerReport,
    stats: dict[str, InputStats] | None,
    targets: dict[str, Target],
) -> None:
    """Encode a layer's linears (by module name) in place: under torchrun each process its share
    (`distributed.owners`), then every process gets every linear's bytes (`distributed.share`)."""
    owner = owners({name: item.plan.nbytes for name, item in encoded.items()})
    rank, size = world()
    factors: dict[str, np.ndarray | torch.Tensor] = {}
    for name, item in encoded.items():
        item.importance = report.importance.get(name)
        if item.importance is None and job.imatrix is not None:
            item.importance = job.imatrix.entries.get(item.plan.name)
        if owner[name] == rank:
            factor = _factor(job, stats, factors, name, targets[name])
            item.data = encode_tensor(
                item.plan, item.tensor, item.importance, encoder=job.encoder, factor=factor
            )
    if size > 1:
        data = {name: item.data for name, item in encoded.items()}
        shapes = {n: REGISTRY[i.plan.codec].byte_shape(tuple(i.tensor.shape)) for n, i in encoded.items()}
        share(data, owner, shapes)
        for name, item in encoded.items():
            item.data = data[name]


def _factor(
    job: Job,
    stats: dict[str, InputStats] | None,
    factors: dict[str, np.ndarray | torch.Tensor],
    name: str,
    target: Target,
) -> np.ndarray | torch.Tensor | list[np.ndarray | torch.Tensor | None] | None:
    """The error-feedback factor of linear ``name``'s input, factored once per input and layer; for
    stacked experts one per expert, of its routed tokens (None where it saw fewer than `moe.MIN_TOKENS`)."""
    if not target.uses_feedback() or stats is None:
        return None
    experts = moe.expert_readers(job.arch.experts, job.ckpt.config, name)
    if experts is not None:
        return [_factor_of(stats, factors, r) if stats[r].n >= moe.MIN_TOKENS else None for r in experts]
    reader = job.arch.reader_of(name)
    return _factor_of(stats, factors, reader) if reader in stats else None


def _factor_of(
    stats: dict[str, InputStats], factors: dict[str, np.ndarray | torch.Tensor], reader: str
) -> np.ndarray | torch.Tensor:
    if reader not in factors:
        # the statistics after the search's folded scales (their sum: feedback is scale-free)
        st = stats[reader]
        gram, st.gram = st.gram, None  # type: ignore[assignment]  # its last use: factored in its memory
        factors[reader] = feedback_factor(gram, overwrite=True, on_device=True)  # a GPU's stays there
    return factors[reader]
