"""Safetensors checkpoint directories that transformers and vLLM load: compressed-tensors and AutoAWQ.

A checkpoint is the source's architecture with its linears replaced by a packed integer layout:
``config.json`` with the format's ``quantization_config``, sharded ``model*.safetensors`` (+ index),
the tokenizer files, ``generation_config.json``, the card as ``README.md``. Embeddings, norms, biases
and ``lm_head`` keep the source's dtype; AWQ's folded scales are already in the norms and weights.
Written as the engine streams into a temporary directory renamed when complete.

Both formats store per group a float scale and an integer zero-point (``x = scale * (q - z)``);
the engine then encodes group-wise types on that grid (`llmq.codecs.IntegerGrid`), so a GGUF
written by the same run holds the same values.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..card import render_card, search_text
from ..codecs import REGISTRY
from ..errors import FormatError, OutputExistsError
from ..report import report_dict, write_search_report
from ..result import report_path
from ..writers import check_output
from ..writers.safetensors import ShardedSafetensorsWriter, TensorSpec
from .base import SinkBase
from .options import OutputOptions, result_of

if TYPE_CHECKING:
    from ..engine import Encoded, Job
    from ..plan import TensorPlan
    from ..search import LayerReport

# files of the source directory a checkpoint carries over unchanged
COPIED = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# rows handled at a time when unpacking and packing a linear
SLAB_ROWS = 1024


class GroupValues:
    """A group-wise linear's integer codes, per-group scales and zero-points, from its encoded blocks.

    Attributes:
        codes: unsigned codes ``(out, in)`` (``q + 2^(bits-1)`` for symmetric types).
        scale: ``(out, n_groups)`` float32.
        zero: ``(out, n_groups)`` unsigned integer zero-points, None for symmetric types.
        bits: code width; group: values per group.
    """

    def __init__(self, plan: TensorPlan, data: np.ndarray) -> None:
        codec = REGISTRY[plan.codec]
        rows, k = plan.shape
        self.bits, self.group = codec.bits, plan.group
        n_groups = k // plan.group
        blocks = np.ascontiguousarray(data).reshape(rows, -1)
        self.scale = np.empty((rows, n_groups), np.float32)
        self.codes = np.empty((rows, k), np.uint8)
        self.zero = None if codec.symmetric else np.empty((rows, n_groups), np.int32)
        for r0 in range(0, rows, SLAB_ROWS):  # slabs bound the per-value temporaries of a large linear
            r1 = min(rows, r0 + SLAB_ROWS)
            step, offset, codes, lo, _hi = codec.grid_blocks(blocks[r0:r1].reshape(-1, codec.type_size))
            first = slice(0, k, plan.group)
            scale = step.reshape(r1 - r0, k)[:, first]
            offset = offset.reshape(r1 - r0, k)[:, first]
            self.scale[r0:r1] = scale
            # unsigned, as the formats store them: Q8_0's int8 codes (lo = -128) shifted to 0..255
            self.codes[r0:r1] = (codes.astype(np.int16) - lo).reshape(r1 - r0, k)
            if self.zero is None:
                if lo == 0:  # Q4_0/Q5_0: codes already unsigned, x = d * (code - 2^(bits-1))
                    assert np.allclose(offset, -(1 << (self.bits - 1)) * scale), plan.name
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    self.zero[r0:r1] = np.where(scale != 0, np.rint(-offset / scale), 0)

    def dequantize(self) -> np.ndarray:
        """``scale * (q - z)`` (``scale * (q - 2^(bits-1))`` when symmetric): what the checkpoint holds, float32."""
        scale = np.repeat(self.scale, self.group, axis=1)
        zero = (1 << (self.bits - 1)) if self.zero is None else np.repeat(self.zero, self.group, axis=1)
        return (scale * (self.codes.astype(np.int32) - zero).astype(np.float32)).astype(np.float32)


def pack_int32(values: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Pack unsigned ``values`` ``(rows, n)`` along the last axis into int32 words of ``32 // bits``.

    Value ``pf * k + order[j]`` goes to bits ``bits * j`` of word ``k`` (``order`` default: in order;
    AutoAWQ's is (0, 2, 4, 6, 1, 3, 5, 7)); a ragged tail is zero-padded.
    """
    pf = 32 // bits
    rows, n = values.shape
    pad = -n % pf
    shifts = (np.arange(pf, dtype=np.uint32) * bits)[None, None, :]
    out = np.empty((rows, (n + pad) // pf), np.uint32)
    for r0 in range(0, rows, SLAB_ROWS):
        v = np.pad(values[r0 : r0 + SLAB_ROWS].astype(np.uint32), ((0, 0), (0, pad))).reshape(
            -1, out.shape[1], pf
        )
        if order is not None:
            v = v[:, :, list(order)]
        out[r0 : r0 + SLAB_ROWS] = np.bitwise_or.reduce(v << shifts, axis=2)
    return out.view(np.int32)


class CheckpointSink(SinkBase):
    """A Hugging Face model directory with quantized linears (subclasses name the layout)."""

    # what `check` allows: GGUF types of the linears and their bits
    allowed: ClassVar[dict[str, int]] = {}

    def __init__(self, path: Path, options: OutputOptions) -> None:
        self.path = Path(path)
        self.options = options
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.writer: ShardedSafetensorsWriter | None = None

    # -- what a format defines -----------------------------------------------------------------
    def linear_specs(self, plan: TensorPlan, base: str, dtype: str) -> list[TensorSpec]:
        raise NotImplementedError

    def linear_tensors(self, values: GroupValues, base: str, dtype: torch.dtype) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def quantization_config(self, job: Job) -> dict[str, Any]:
        raise NotImplementedError

    def check_linear(self, job: Job, plan: TensorPlan) -> str | None:
        """Why this format cannot hold ``plan`` (None if it can)."""
        return None

    def grid_dtype(self, job: Job) -> str | None:
        return "float16"

    # -- the sink ------------------------------------------------------------------------------
    def check(self, job: Job) -> None:
        """Refuse, before any work, settings the format cannot hold (one line saying what it holds)."""
        check_output(self.path, overwrite=self.options.overwrite)
        if job.arch.experts is not None:
            raise FormatError(
                f"format={self.format}: {job.arch.model_type} has mixture-of-experts layers, which llmq "
                "writes to GGUF only (--format gguf)"
            )
        for p in job.plans:
            if p.role != "linear":
                continue
            why = None if p.codec in self.allowed else f"is stored as {p.codec}"
            why = why or self.check_linear(job, p)
            if why is not None:
                raise FormatError(f"format={self.format}: {p.source} {why}; {self.holds}")

    holds: ClassVar[str] = ""

    def model_dtype(self, job: Job) -> torch.dtype:
        return job.ckpt.get(job.arch.embed).dtype if job.arch.embed in job.ckpt else torch.float32

    def begin(self, job: Job) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        dtype = ST_DTYPE.get(self.model_dtype(job), "F32")
        specs: list[TensorSpec] = []
        for p in job.plans:
            if p.source is None:  # llama.cpp's computed tensors (rope factors)
                continue
            if p.role == "linear":
                specs += self.linear_specs(p, p.source.removesuffix(".weight"), dtype)
            else:
                specs.append(TensorSpec(p.source, dtype, tuple(p.shape)))
        self.writer = ShardedSafetensorsWriter(self.tmp, specs, max_shard_bytes=self.options.max_shard_bytes)

    def write(self, job: Job, item: Encoded) -> None:
        p = item.plan
        if p.source is None:
            return
        assert self.writer is not None
        dtype = self.model_dtype(job)
        if p.role == "linear":
            base = p.source.removesuffix(".weight")
            for name, arr in self.linear_tensors(GroupValues(p, item.bytes()), base, dtype).items():
                self.writer.write(name, arr)
        else:
            t = item.tensor.detach().to(dtype).contiguous()
            self.writer.write(
                p.source, t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            )

    def commit(self, job: Job, reports: list[LayerReport]) -> Path:
        assert self.writer is not None
        self.writer.close()
        config = json.loads((job.model_dir / "config.json").read_text())
        config["quantization_config"] = self.quantization_config(job)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in COPIED:
            if (job.model_dir / name).is_file():
                shutil.copyfile(job.model_dir / name, self.tmp / name)
        report_name = None
        if self.options.write_report and job.search.needs_activations:
            report = report_dict(
                self.path, job.cfg, job.awq, job.encoder, job.calibration, reports, job.seconds
            )
            report_name = write_search_report(report_path(self.tmp), report).name
        if self.options.write_card:
            result = result_of(job, reports, self.tmp)
            text = render_card(
                result, self.tmp, self.format, model_dir=job.model_dir, src=job.src, cfg=job.cfg,
                command=self.options.command, search=search_text(result, report_name), name=self.path.name,
            )  # fmt: skip
            (self.tmp / "README.md").write_text(text)
        if self.path.exists():
            if not self.options.overwrite:
                raise OutputExistsError(f"{self.path}: appeared while converting; result left at {self.tmp}")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _ct_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float16")


class CompressedTensorsSink(CheckpointSink):
    """compressed-tensors ``pack-quantized`` (llm-compressor's W4A16/W8A16 layout; vLLM, transformers).

    Per linear: ``weight_packed`` int32 ``(out, in * bits / 32)`` (value ``pf*k + j`` in bits
    ``bits*j`` of word ``k``, unsigned: signed ``q + 2^(bits-1)``), ``weight_scale`` ``(out, in/G)``
    in the model dtype, ``weight_shape`` int64 ``[2]``, and asymmetric ``weight_zero_point`` int32
    ``(out*bits/32, in/G)`` packed along the output dimension.
    """

    format = "compressed-tensors"
    allowed: ClassVar[dict[str, int]] = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
    holds = "compressed-tensors holds 4-bit (sym or asym) and 8-bit (sym) groups that divide each linear's input width (bits=4|8 group_size=32|64|128|-1)"

    def check_linear(self, job: Job, plan: TensorPlan) -> str | None:
        if plan.shape[-1] % plan.group:
            return f"has {plan.shape[-1]} input columns, not a multiple of the group {plan.group}"
        return None

    def grid_dtype(self, job: Job) -> str | None:
        return "bfloat16" if self.model_dtype(job) == torch.bfloat16 else "float16"

    def linear_specs(self, plan: TensorPlan, base: str, dtype: str) -> list[TensorSpec]:
        out, k = plan.shape
        bits = REGISTRY[plan.codec].bits
        pf, ng = 32 // bits, k // plan.group
        specs = [
            TensorSpec(f"{base}.weight_packed", "I32", (out, -(-k // pf))),
            TensorSpec(f"{base}.weight_scale", dtype, (out, ng)),
            TensorSpec(f"{base}.weight_shape", "I64", (2,)),
        ]
        if not REGISTRY[plan.codec].symmetric:
            specs.append(TensorSpec(f"{base}.weight_zero_point", "I32", (-(-out // pf), ng)))
        return specs

    def linear_tensors(self, values: GroupValues, base: str, dtype: torch.dtype) -> dict[str, np.ndarray]:
        out, k = values.codes.shape
        scale = torch.from_numpy(values.scale).to(dtype)
        tensors = {
            f"{base}.weight_packed": pack_int32(values.codes, values.bits),
            f"{base}.weight_scale": scale.view(torch.uint8).numpy()
            if dtype == torch.bfloat16
            else scale.numpy(),
            f"{base}.weight_shape": np.array([out, k], np.int64),
        }
        if values.zero is not None:
            tensors[f"{base}.weight_zero_point"] = np.ascontiguousarray(
                pack_int32(values.zero.T, values.bits).T
            )
        return tensors

    def quantization_config(self, job: Job) -> dict[str, Any]:
        cfg = job.cfg
        channel = cfg.group_size == -1
        weights = {
            "num_bits": cfg.codec.bits, "type": "int", "symmetric": bool(cfg.codec.symmetric),
            "strategy": "channel" if channel else "group", "group_size": None if channel else cfg.group,
            "dynamic": False, "observer": "minmax",
        }  # fmt: skip
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head"],
            "kv_cache_scheme": None,
        }  # fmt: skip


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class AutoAWQSink(CheckpointSink):
    """AutoAWQ's GEMM layout (``quant_method: awq``, ``version: gemm``): vLLM awq/awq_marlin, transformers.

    Per linear: ``qweight`` int32 ``(in, out/8)`` packing 8 output columns per word in the order
    (0, 2, 4, 6, 1, 3, 5, 7), ``qzeros`` int32 ``(in/G, out/8)`` likewise (unsigned, no offset),
    ``scales`` fp16 ``(in/G, out)``; ``W = (q - z) * scale``.
    """

    format = "awq"
    allowed: ClassVar[dict[str, int]] = {"Q4_1": 4}
    holds = "AutoAWQ GEMM holds 4-bit asymmetric groups that divide each linear's input width, outputs a multiple of 8 (bits=4 group_size=32|64|128)"

    def check_linear(self, job: Job, plan: TensorPlan) -> str | None:
        out, k = plan.shape
        if job.cfg.group_size == -1:
            return "is quantized per channel"
        if k % plan.group:
            return f"has {k} input columns, not a multiple of the group {plan.group}"
        if out % 8:
            return f"has {out} output rows, not a multiple of 8"
        return None

    def linear_specs(self, plan: TensorPlan, base: str, dtype: str) -> list[TensorSpec]:
        out, k = plan.shape
        ng = k // plan.group
        return [
            TensorSpec(f"{base}.qweight", "I32", (k, out // 8)),
            TensorSpec(f"{base}.qzeros", "I32", (ng, out // 8)),
            TensorSpec(f"{base}.scales", "F16", (ng, out)),
        ]

    def linear_tensors(self, values: GroupValues, base: str, dtype: torch.dtype) -> dict[str, np.ndarray]:
        assert values.zero is not None
        return {
            f"{base}.qweight": pack_int32(np.ascontiguousarray(values.codes.T), 4, AWQ_ORDER),
            f"{base}.qzeros": pack_int32(np.ascontiguousarray(values.zero.T), 4, AWQ_ORDER),
            f"{base}.scales": np.ascontiguousarray(values.scale.T).astype(np.float16),
        }

    def quantization_config(self, job: Job) -> dict[str, Any]:
        return {"quant_method": "awq", "bits": 4, "group_size": job.cfg.group, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}  # fmt: skip
