"""How a tensor is encoded: the one place that turns float weights plus hints into stored values.

A `Target` is a linear's storage (codec, group) plus the `EncoderConfig`; the engine encodes the
file's tensors through `encode_tensor`, and the searches score their candidates through
`Target.fake_quant`, so a candidate is judged by exactly the encoder that stores the result.
Hints a method or the calibration provides: ``importance`` (mean x^2 per input column: llama.cpp's
importance-weighted encoders) and ``gram`` (the input's second moment: error-feedback rounding).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import overload

import numpy as np
import torch

from .codecs import REGISTRY, Codec, GroupCodec, IntegerGrid, ggml, quants_math
from .gptq import encode_feedback, feedback_factor
from .plan import TensorPlan


@dataclass(frozen=True)
class EncoderConfig:
    """Options of the encoder, usable by every search method that has the statistics they need.

    Attributes:
        weighted: encode with the importance a method or an imatrix provides (llama.cpp's
            importance-weighted encoders); False rounds to nearest.
        refine: after llama.cpp's importance-weighted K-quant encoder, search each sub-block's
            neighbouring scale (and min) codes for a lower weighted error (`llmq.codecs.krefine`;
            Q4_K, Q5_K, Q6_K). The bytes are then no longer llama.cpp's, never worse.
        feedback: error-feedback rounding (GPTQ; `llmq.gptq`): the encoder's scales and mins, the
            codes re-chosen column by column against the layer input's second moment (types with
            an integer grid: Q4_0…Q8_0, Q4_K…Q6_K). Needs calibration statistics.
        grid: group-wise types store their groups on this integer-zero-point grid (set when a
            safetensors output is written, so every output of a run holds the same values).
    """

    weighted: bool = True
    refine: bool = False
    feedback: bool = False
    grid: IntegerGrid | None = None

    @property
    def needs_statistics(self) -> bool:
        return self.feedback


@dataclass(frozen=True)
class Target:
    """How one linear is stored: codec, group size, encoder options (from its `TensorPlan`)."""

    codec: str
    group: int
    encoder: EncoderConfig = EncoderConfig()

    def codec_class(self) -> type[Codec]:
        return REGISTRY[self.codec]

    @property
    def symmetric(self) -> bool:
        return bool(self.codec_class().symmetric)

    @property
    def is_float(self) -> bool:
        return bool(self.codec_class().is_float)

    @property
    def grouped(self) -> bool:
        """Whether groups span blocks, or values sit on the integer-zero grid (`GroupCodec.encode_grouped`)."""
        codec = self.codec_class()
        return issubclass(codec, GroupCodec) and (
            self.group != codec.block_size or self.encoder.grid is not None
        )

    def uses_feedback(self) -> bool:
        """Whether this linear is stored with error-feedback rounding (its type has a grid, ungrouped)."""
        return self.encoder.feedback and self.codec_class().supports_grid and not self.grouped

    def encode(
        self, w: np.ndarray, importance: np.ndarray | None, factor: np.ndarray | torch.Tensor | None = None
    ) -> np.ndarray:
        """The bytes of ``w`` ``(rows, K)``: the one dispatch over the encoder's paths.

        ``importance`` is used when the encoder is ``weighted``; ``factor`` (`feedback_factor` of the
        input's second moment) selects error-feedback rounding when `uses_feedback`.
        """
        codec = self.codec_class()
        enc = self.encoder
        w = np.ascontiguousarray(w, dtype=np.float32)
        imp = importance if enc.weighted else None
        if self.grouped:
            return codec.encode_grouped(w, self.group, imp, grid=enc.grid)  # type: ignore[attr-defined]
        if not self.uses_libggml(imp is not None):
            data = codec.encode(w, imp, refine=enc.refine)
        else:  # the same bytes at C speed, then the NumPy refinement
            flat = ggml.encode(
                int(codec.qtype), w, codec.nbytes(w.shape), imp if codec.supports_importance else None
            )
            data = flat.reshape(codec.byte_shape(w.shape))
            if enc.refine:
                data = codec.refine(w, imp, data).reshape(codec.byte_shape(w.shape))
        if factor is not None and self.uses_feedback():  # the codes re-chosen, the scales kept
            return encode_feedback(codec, w, factor, imp, refine=enc.refine, data=data)
        return data

    def scorer(self, exact: bool = True) -> Target:
        """The target a search ranks its candidates with: this one when ``exact``, otherwise the same
        type without K-quant refinement (libggml's speed). Group-wise types keep their weighted
        search: ranked by min/max fits, scales chose other candidates on every SmolLM2 group tried,
        10% worse on average (BENCHMARKS.md, "Scale, stop 18")."""
        if exact:
            return self
        return replace(self, encoder=replace(self.encoder, refine=False))

    def uses_libggml(self, importance: bool = True) -> bool:
        """Whether encodes (given an importance vector, or not) go through libggml's
        `ggml_quantize_chunk`: installed, not a group-wise grid, and not `uses_compiled`."""
        codec = self.codec_class()
        fast = codec.is_float or self.grouped or self.uses_compiled(importance)
        return not fast and ggml.quantize_chunk() is not None

    def uses_compiled(self, importance: bool = True) -> bool:
        """Whether CPU encodes (given an importance vector, or not) run the NumPy encoder's compiled
        searches, where those beat libggml (`Codec.compiled_faster`)."""
        codec = self.codec_class()
        weighted = importance and self.encoder.weighted and codec.supports_importance
        return quants_math.COMPILED and not self.grouped and codec.compiled_faster[weighted]

    def fast_cpu(self, importance: bool = True) -> bool:
        """Whether CPU encodes run C or compiled code (libggml or `uses_compiled`), which releases the GIL."""
        return self.uses_libggml(importance) or self.uses_compiled(importance)

    @overload
    def fake_quant(self, w: np.ndarray, importance: np.ndarray | None) -> np.ndarray: ...
    @overload
    def fake_quant(self, w: torch.Tensor, importance: np.ndarray | None) -> torch.Tensor: ...
    def fake_quant(
        self, w: np.ndarray | torch.Tensor, importance: np.ndarray | None
    ) -> np.ndarray | torch.Tensor:
        """``w`` as it will be stored without error feedback: encoded, decoded back (float32).

        A torch tensor gives a tensor on its device: encoded there where `on_device` says so (the
        CPU's bytes), otherwise through `encode` (libggml, or NumPy) and back.
        """
        if not isinstance(w, torch.Tensor):
            return self.codec_class().decode(self.encode(w, importance), w.shape)
        if self.on_device(w.device, importance is not None):
            codec, imp = self.codec_class(), importance if self.encoder.weighted else None
            return codec.decode(codec.encode(w.float(), imp, refine=self.encoder.refine), tuple(w.shape))
        values = self.fake_quant(w.detach().float().cpu().numpy(), importance)
        return torch.from_numpy(values).to(w.device)

    def on_device(self, device: torch.device, importance: bool = True) -> bool:
        """Whether `fake_quant` encodes on ``device`` itself: a GPU, for the K-quants that have neither
        libggml nor a compiled search on the CPU. Those are faster still: the torch K encoders replay
        llama.cpp's per-sub-block loops as many small operations, 5-11 M weights/s on an H200
        (BENCHMARKS.md)."""
        codec = self.codec_class()
        return device.type != "cpu" and codec.array_api and not self.grouped and not self.fast_cpu(importance)


# Rows encoded per step: the float32 copy and the codec's temporaries stay near this many values,
# so a 128k-vocabulary embedding does not multiply into gigabytes of scratch.
CHUNK_VALUES = 1 << 21
ENCODE_THREADS = max(1, torch.get_num_threads())


_scratch = threading.local()


def _float32(rows: torch.Tensor) -> np.ndarray:
    """``rows`` as float32 NumPy: a view when they already are, else a copy into this thread's reused
    buffer (fresh pages for every slab cost the kernel more than the conversion). Valid until the
    thread's next call."""
    if rows.dtype == torch.float32 and rows.is_contiguous():
        return rows.numpy()
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < rows.numel():
        buf = _scratch.buf = torch.empty(rows.numel(), dtype=torch.float32)
    view = buf[: rows.numel()].view(rows.shape)
    view.copy_(rows)
    return view.numpy()


def encode_tensor(
    plan: TensorPlan,
    t: torch.Tensor,
    importance: np.ndarray | None = None,
    gram: np.ndarray | None = None,
    encoder: EncoderConfig = EncoderConfig(),
    factor: np.ndarray | torch.Tensor | list[np.ndarray | torch.Tensor | None] | None = None,
) -> np.ndarray:
    """The bytes of one planned tensor, encoded a slab of rows at a time.

    Rows are independent in every codec (error feedback included: it mixes columns, not rows),
    so slabs give the bytes of the whole. Only linears take the encoder's refinement, feedback and
    grid; other tensors (embeddings, output) are encoded by their type with ``importance`` alone.
    Error feedback takes the input's second moment ``gram`` or its `feedback_factor` (computed once
    for linears that read the same input); stacked experts ``(E, rows, K)`` take one per expert.
    """
    if importance is not None and importance.ndim == 2:  # stacked experts, each with its own (E, K)
        assert t.ndim == 3 and importance.shape == (t.shape[0], t.shape[-1]), (t.shape, importance.shape)
        fs = factor if isinstance(factor, list) else [factor] * t.shape[0]
        return np.stack(
            [encode_tensor(plan, t[e], importance[e], gram, encoder, fs[e]) for e in range(t.shape[0])]
        )
    assert not isinstance(factor, list), "per-expert factors need per-expert importance (E, K)"
    if plan.role != "linear":
        encoder = EncoderConfig(weighted=encoder.weighted)
    target = Target(plan.codec, plan.group, encoder)
    codec = target.codec_class()
    if not target.uses_feedback():
        factor = None
    elif factor is None and gram is not None:  # factored once for all slabs
        factor = feedback_factor(gram)
    rows = t.reshape(-1, t.shape[-1]) if t.ndim > 1 else t.reshape(1, -1)
    if isinstance(factor, torch.Tensor):  # on a GPU: the first encoding in slabs here, the rest there
        first = encode_tensor(plan, rows, importance, encoder=replace(encoder, refine=False, feedback=False))
        out = _refine_and_feed_back(target, rows, importance, factor, first)
        return out.reshape(codec.byte_shape(tuple(t.shape)))
    out = np.empty(codec.byte_shape(tuple(rows.shape)), dtype=np.uint8)
    # error feedback loops over columns in Python: bigger slabs, fewer steps. The slab size must not
    # depend on the thread count: BLAS sums a row's products in an order that depends on the rows.
    step = max(1, (CHUNK_VALUES * (4 if factor is not None else 1)) // rows.shape[1])

    def slab(start: int) -> None:
        out[start : start + step] = target.encode(_float32(rows[start : start + step]), importance, factor)

    starts = range(0, rows.shape[0], step)
    # BLAS, C and the compiled searches release the GIL
    if (factor is not None or target.fast_cpu(importance is not None)) and len(starts) > 1:
        with ThreadPoolExecutor(ENCODE_THREADS) as pool:
            list(pool.map(slab, starts))
    else:
        for start in starts:
            slab(start)
    return out.reshape(codec.byte_shape(tuple(t.shape)))


def _refine_and_feed_back(
    target: Target, rows: torch.Tensor, importance: np.ndarray | None, factor: torch.Tensor, data: np.ndarray
) -> np.ndarray:
    """`encode_tensor` with a GPU's feedback factor, after the first encoding ``data`` (libggml or
    NumPy, on the CPU): its refinement (K-quants) and the error feedback on the factor's device, whole."""
    codec, enc = target.codec_class(), target.encoder
    x = np.ascontiguousarray(rows.to(torch.float32).numpy())
    imp = importance if enc.weighted else None
    if enc.refine and codec.array_api:  # the same bytes as on the CPU (`llmq.codecs.krefine`)
        dev = factor.device
        refined = codec.refine(torch.from_numpy(x).to(dev), imp, torch.from_numpy(data).to(dev))
        data = refined.cpu().numpy().reshape(data.shape)
    elif enc.refine:
        data = codec.refine(x, imp, data).reshape(data.shape)
    return encode_feedback(codec, x, factor, imp, refine=enc.refine, data=data)
