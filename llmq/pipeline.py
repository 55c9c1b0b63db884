"""`convert`: checkpoint -> per-layer search -> encoders -> every requested output, from one search."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .awq import AWQConfig
from .calib import CalibConfig
from .codecs import IntegerGrid
from .config import QuantConfig
from .distributed import init_from_env, world
from .encoding import EncoderConfig
from .engine import Job, calibrate, needs_statistics, open_job, run
from .errors import FormatError, LlmqError
from .imatrix_io import ImatrixFile
from .result import ConvertResult
from .resume import WorkDir, check_work_dir, run_key, work_path
from .sinks import FORMATS, OutputOptions
from .sinks.base import SinkBase


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """``"gguf,compressed-tensors"`` -> ``["gguf", "compressed-tensors"]``, checked against `FORMATS`."""
    names = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats)]
    for f in names:
        if f not in FORMATS:
            raise FormatError(
                f"unknown output format {f!r}; choose from {', '.join(FORMATS)} (comma-separated)"
            )
    if not names or len(set(names)) != len(names):
        raise FormatError(f"output formats {formats!r}: name each of {', '.join(FORMATS)} at most once")
    return names


def output_paths(
    src: str | os.PathLike[str], out: str | os.PathLike[str] | None, cfg: QuantConfig, formats: list[str]
) -> dict[str, Path]:
    """Each format's output: ``OUT`` for the first; a GGUF ``BASE.gguf``, a checkpoint ``BASE-FORMAT/``.

    ``BASE`` is ``OUT`` without ``.gguf``, or ``<model>-<label>`` in the current directory.
    """
    if out is not None:
        first = Path(out)
        base = first.with_suffix("") if first.suffix == ".gguf" else first
    else:
        base = Path(f"{Path(str(src).rstrip('/')).name or 'model'}-{cfg.label}")
        first = base.with_name(base.name + ".gguf") if formats[0] == "gguf" else base
    paths = {formats[0]: first}
    for f in formats[1:]:
        paths[f] = base.with_name(base.name + ".gguf") if f == "gguf" else base.with_name(f"{base.name}-{f}")
    return paths


def default_output(src: str | os.PathLike[str], cfg: QuantConfig) -> Path:
    """``<model name>-<quant label>.gguf`` in the current directory."""
    return output_paths(src, None, cfg, ["gguf"])["gguf"]


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    config: QuantConfig | None = None,
    *,
    formats: str | Sequence[str] = "gguf",
    calib: CalibConfig | torch.Tensor | None = None,
    awq: AWQConfig | None = None,
    encoder: EncoderConfig | None = None,
    imatrix: str | os.PathLike[str] | ImatrixFile | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    write_card: bool = True,
    write_report: bool = True,
    command: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    resume: bool = False,
) -> ConvertResult:
    """Quantize a Hugging Face checkpoint into GGUF and/or safetensors checkpoints, from one search.

    Args:
        src: model directory or hub id (``owner/name``).
        out: the first format's output path; default ``<model>-<quant>.gguf`` (a directory
            ``<model>-<quant>`` for a checkpoint format) in the current directory; further formats
            go beside it (`output_paths`).
        config: quantization settings (default: AWQ, 4-bit asymmetric, groups of 32 = ``Q4_1``).
        formats: ``gguf``, ``compressed-tensors``, ``awq``, or several (comma-separated or a list).
        calib: calibration for ``method="awq"``: a `CalibConfig` (default: ``builtin``, the
            multi-domain text shipped with llmq) or your own int64 ``(n_samples, seqlen)`` token tensor.
        awq: AWQ search settings (default `AWQConfig()`).
        encoder: encoder options (importance weighting, K-quant refinement, error feedback).
        imatrix: an importance matrix (llama.cpp GGUF or legacy ``.dat`` file, or `read_imatrix`'s
            result) to weigh the encoders with, as llama-quantize ``--imatrix``; ``method="rtn"`` only.
        device: where calibration forwards run (``cpu``, ``cuda``); the codecs run on the CPU.
        overwrite: replace existing outputs.
        allow_pickle: accept ``.bin`` checkpoints (loaded with ``weights_only=True``).
        progress: show progress bars.
        write_card: write each output's model card.
        write_report: for a search, write its per-layer JSON report with each output.
        command: the command line recorded in the model cards.
        max_shard_bytes: largest safetensors shard of a checkpoint output.
        resume: continue the run whose work directory (``OUT.llmq-work``, kept beside the first
            output while a run is under way and after it fails) is there, if its inputs and
            settings are these; the outputs are then the bytes an uninterrupted run writes.

    Returns:
        A `ConvertResult` (outputs, per-tensor plan, timing, search reports).

    Raises:
        LlmqError: bad input or settings an output format cannot hold, before any work.

    Example:
        >>> import llmq
        >>> llmq.convert("SmolLM2-135M-Instruct", "smol-q4.gguf", llmq.QuantConfig(bits=4, group_size=64),
        ...              formats="gguf,compressed-tensors", calib=llmq.CalibConfig("groups_merged.txt"))
    """
    cfg = config or QuantConfig()
    device = init_from_env(device)  # under torchrun: join the process group, one GPU per process
    rank, size = world()
    if size > 1 and resume:
        raise LlmqError(
            "resume=True (--resume) is not available under torchrun: run a single process to resume"
        )
    names = parse_formats(formats)
    paths = output_paths(src, out, cfg, names)
    wpath = work_path(paths[names[0]])
    if rank == 0:
        check_work_dir(wpath, resume=resume, overwrite=overwrite)  # before any work
    resuming = resume and (wpath / "manifest.json").is_file()
    if resuming:  # a run killed after its rename left whole outputs: they are this run's to replace
        for p in paths.values():
            for stale in p.parent.glob(f".{p.name}.*.partial"):  # temporary outputs of the killed run
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    options = OutputOptions(overwrite or resuming, write_card, write_report, command, max_shard_bytes)
    sinks: list[SinkBase] = [FORMATS[f](paths[f], options) for f in names]
    job = open_job(src, cfg, awq=awq, encoder=encoder, imatrix=imatrix, device=device,
                   allow_pickle=allow_pickle, progress=progress and rank == 0)  # fmt: skip
    prepare(job, sinks)
    if needs_statistics(job, sinks):
        calibrate(job, calib)
    key = run_key(job.model_dir, job.cfg, job.search.name, job.awq, job.encoder, job.imatrix, job.calibration)
    work = WorkDir.open(wpath, key, resume=resume, overwrite=overwrite) if size == 1 else None
    # under torchrun process 0 writes; the others step their windows and share their statistics
    reports = run(job, sinks if rank == 0 else [], work)
    return ConvertResult(
        paths[names[0]],
        tuple(job.plans),
        job.seconds,
        job.ckpt.nbytes(),
        dict(paths),
        tuple(reports),
        job.calibration,
        job.timing,
    )


def prepare(job: Job, sinks: Sequence[SinkBase]) -> None:
    """Before any work: the integer-zero grid an output needs (the coarsest scale dtype), then each
    output's checks (settings it cannot hold, an output that exists)."""
    grids = {s.grid_dtype(job) for s in sinks} - {None}
    if grids:
        from dataclasses import replace

        dtype = "bfloat16" if "bfloat16" in grids else "float16"
        job.encoder = replace(job.encoder, grid=IntegerGrid(dtype))
    for s in sinks:
        s.check(job)
