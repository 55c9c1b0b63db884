"""The GGUF file sink: llama.cpp's layout, metadata and tokenizer, streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..card import write_card
from ..encoding import encode_tensor
from ..report import add_search_metadata, report_dict, search_summary, write_search_report
from ..result import report_path
from ..writers import GGUFStreamWriter, check_output
from ..writers.metadata import add_general, add_hparams
from .base import SinkBase
from .options import OutputOptions, result_of

if TYPE_CHECKING:
    from ..arch import ArchSpec
    from ..engine import Encoded, Job
    from ..plan import TensorPlan
    from ..search import LayerReport


def to_gguf_layout(plan: TensorPlan, arch: ArchSpec, config: object, t: torch.Tensor | np.ndarray):
    """Rows (of values or of encoded blocks) in llama.cpp's order; norm offsets added to float norms.

    HF keeps each rotary head's halves apart; llama.cpp wants them interleaved in pairs. Rows are
    encoded independently, so permuting encoded rows equals encoding permuted rows.
    """
    module = ""
    if plan.source is not None and plan.layer is not None:
        module = plan.source.removeprefix(arch.layer_prefix.format(i=plan.layer)).rsplit(".", 1)[0]
    heads_key = arch.rope_permute.get(module)
    if heads_key is not None:
        n_head = int(getattr(config, heads_key))
        shape = t.shape
        t = t.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    if plan.role == "norm" and arch.norm_offset:
        t = t.float() + arch.norm_offset
    return t


def gguf_bytes(job: Job, item: Encoded) -> np.ndarray:
    """One tensor's bytes as the GGUF file stores it."""
    if item.data is not None:  # encoded blocks: permute whole rows
        return np.ascontiguousarray(to_gguf_layout(item.plan, job.arch, job.ckpt.config, item.data))
    t = to_gguf_layout(item.plan, job.arch, job.ckpt.config, item.tensor.detach())
    return encode_tensor(item.plan, t, item.importance, None, item.encoder)


class GGUFSink(SinkBase):
    """A GGUF file for llama.cpp: header and metadata first, tensors as they stream, renamed at the end."""

    format = "gguf"

    def __init__(self, path: Path, options: OutputOptions) -> None:
        self.path = Path(path)
        self.options = options
        self.writer: GGUFStreamWriter | None = None

    def check(self, job: Job) -> None:
        check_output(self.path, overwrite=self.options.overwrite)

    def begin(self, job: Job) -> None:
        from ..imatrix_io import add_imatrix_metadata
        from ..writers.tokenizer import add_tokenizer

        w = self.writer = GGUFStreamWriter(
            self.path, job.arch.gguf_arch_name, overwrite=self.options.overwrite
        )
        add_general(
            w.gguf, job.model_dir, name=Path(job.src).name, n_params=sum(p.n_params for p in job.plans),
            codec_name=job.cfg.file_type_name,
        )  # fmt: skip
        add_hparams(w.gguf, job.ckpt.config, job.n_layers)
        if job.arch.metadata is not None:  # the family's own keys
            job.arch.metadata(w.gguf, job.ckpt.config)
        add_tokenizer(w.gguf, job.model_dir)
        awq = job.awq if job.search.needs_activations else None
        add_search_metadata(w, job.cfg, awq, job.encoder, job.calibration)
        if job.imatrix is not None:
            add_imatrix_metadata(w.gguf, job.imatrix)
        w.begin(job.plans)

    def write(self, job: Job, item: Encoded) -> None:
        assert self.writer is not None
        self.writer.write(item.plan, gguf_bytes(job, item))

    def commit(self, job: Job, reports: list[LayerReport]) -> Path:
        assert self.writer is not None
        if job.search.needs_activations:
            self.writer.patch(search_summary(job.awq, job.encoder, job.calibration, reports))
        self.writer.commit()
        result = result_of(job, reports, self.path)
        report_name = None
        if self.options.write_report and job.search.needs_activations:
            rpath = report_path(self.path)
            report = report_dict(
                self.path, job.cfg, job.awq, job.encoder, job.calibration, reports, job.seconds
            )
            report_name = write_search_report(rpath, report).name
        if self.options.write_card:
            write_card(
                result, self.path, self.format, model_dir=job.model_dir, src=job.src, cfg=job.cfg,
                command=self.options.command, report_name=report_name,
            )  # fmt: skip
        return self.path

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


__all__ = ["GGUFSink", "gguf_bytes", "to_gguf_layout"]
