"""Activation-aware weight quantization (AWQ): per-input-channel scales, then clipping, per decoder layer.

Every candidate is scored through the codec that will store the weights (importance-weighted when
``weighted``), on the calibration statistics of the linear's input: the output error of a weight
error ``E`` is ``sum((E @ G) * E)`` with ``G = X^T X / n`` (the Gram trick), so a grid point costs one
encode and one ``(N, K) x (K, K)`` product instead of a pass over the tokens.

Scales follow AutoAWQ's search (``s = mean|x|^a / mean|w|^(1-a)``, a on a grid, normalized by
``sqrt(max * min)``); they are folded into the norm or linear that produces the input (``w /= s``)
and multiplied into the reading linears' columns, so the FP model computes the same function.
The clip search then shrinks each (row, group) range over a grid, keeping the ratio with the lowest
error of that group's share of the output; ratio 1 is a candidate, so a range never widens
(`llmq.clip`).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .activations import InputStats
from .arch import ArchSpec, ScaleGroup
from .clip import THREADS, clip_search, group_bounds, output_error
from .codecs import REGISTRY, GroupCodec
from .errors import LlmqError
from .gptq import encode_feedback, feedback_factor
from .search import LayerReport

log = logging.getLogger(__name__)

INPUT_MODES = ("fp", "quant")


@dataclass(frozen=True)
class AWQConfig:
    """Settings of the AWQ search.

    Attributes:
        n_grid: points of the scale exponent grid ``a in {0, 1/n, ..., (n-1)/n}``.
        duo_scaling: ``s = mean|x|^a / mean|w|^(1-a)``; False uses the activation-only ``mean|x|^a``.
        scale: run the scale search at all (False: clip and weighting only).
        clip: run the clip search after scaling.
        clip_grid: clip ratios are ``1 - i / clip_grid``.
        max_shrink: smallest ratio tried is ``1 - max_shrink`` (exclusive).
        weighted: score candidates with, and store weights through, the importance-weighted encoder
            (importance = mean x^2 of each input column, after the folded scales).
        inputs: what the next layer's calibration inputs come from: ``quant`` (outputs of the layer
            as quantized, the default: lower perplexity and KL on SmolLM2, see BENCHMARKS.md) or
            ``fp`` (the FP layer's outputs, as AutoAWQ; one forward pass per layer fewer).
        prev_error: when the scales fold into a previous linear (``up -> down``), also score that
            linear's own quantization error with its rows divided by ``s`` (AutoAWQ scores only the
            readers, though the folded rows are quantized too).
        holdout: rank the scale candidates (built from all windows' mean |x|) on the even-numbered
            calibration mini-batches and keep the best only if it also lowers the loss on the
            odd-numbered ones (a guard against scales that fit the calibration windows only); the
            report's ``loss_*`` are then the even half's, ``heldout_*`` the odd half's. The clip
            search still uses all windows.
        skip_first: leave the first positions of every calibration window out of the statistics
            the search and the importance are built from. Position 0 is the attention sink: on
            SmolLM2 it carries 99.8% of layer 11's ffn_down input energy (massive activations),
            so the squared-error objective fits one token per window (see BENCHMARKS.md).
        refine: after llama.cpp's importance-weighted K-quant encoder, search each sub-block's
            neighbouring scale (and min) codes for a lower importance-weighted error
            (`llmq.codecs.krefine`; Q4_K, Q5_K, Q6_K), in the search's candidates and in the file.
        gptq: store each linear with error-feedback rounding (`llmq.gptq`): the encoder's scales
            and mins, the codes re-chosen column by column against the input's second moment, so
            the layer's output error falls (types with an integer grid: Q4_0…Q8_0, Q4_K…Q6_K).
            The search's candidates are scored without it; the file and the next layer's
            ``quant`` inputs use it.
    """

    n_grid: int = 20
    duo_scaling: bool = True
    scale: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    weighted: bool = True
    inputs: str = "quant"
    prev_error: bool = False
    holdout: bool = False
    skip_first: int = 0
    refine: bool = False
    gptq: bool = False

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1:
            raise LlmqError(
                f"AWQ grids must have at least one point (n_grid={self.n_grid}, clip_grid={self.clip_grid})"
            )
        if not 0.0 <= self.max_shrink < 1.0:
            raise LlmqError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.skip_first < 0:
            raise LlmqError(f"--awq-skip-first must be >= 0, got {self.skip_first}")
        if self.inputs not in INPUT_MODES:
            raise LlmqError(f"--awq-inputs {self.inputs}: choose one of {', '.join(INPUT_MODES)}")

    @property
    def clip_ratios(self) -> list[float]:
        return [1.0 - i / self.clip_grid for i in range(max(1, int(self.max_shrink * self.clip_grid)))]


@dataclass(frozen=True)
class Target:
    """How one linear will be stored: GGUF type and group size (from its `TensorPlan`)."""

    codec: str
    group: int
    refine: bool = False

    def fake_quant(
        self, w: np.ndarray, importance: np.ndarray | None, gram: np.ndarray | None = None
    ) -> np.ndarray:
        """``w`` as the file will hold it: encoded with this type (and importance), decoded back.

        ``gram`` (the input's second moment) selects error-feedback rounding where the type has a grid.
        """
        return self.codec_class().decode(self.encode(w, importance, gram), w.shape)

    def encode(
        self, w: np.ndarray, importance: np.ndarray | None, gram: np.ndarray | None = None
    ) -> np.ndarray:
        codec = self.codec_class()
        w = np.ascontiguousarray(w, dtype=np.float32)
        if issubclass(codec, GroupCodec) and self.group != codec.block_size:
            return codec.encode_grouped(w, self.group, importance)
        if gram is not None and codec.supports_grid:
            return encode_feedback(codec, w, feedback_factor(gram), importance, refine=self.refine)
        return codec.encode(w, importance, refine=self.refine)

    def codec_class(self) -> Any:
        return REGISTRY[self.codec]

    @property
    def symmetric(self) -> bool:
        return bool(self.codec_class().symmetric)

    @property
    def is_float(self) -> bool:
        return bool(self.codec_class().is_float)


def _weight_mean(ws: list[torch.Tensor], group: int) -> torch.Tensor:
    # AutoAWQ's w_mean: |w| relative to its group's max, averaged over all output rows
    w = torch.cat(ws, 0).abs()
    parts = [
        w[:, a:b] / w[:, a:b].amax(dim=1, keepdim=True).clamp(min=1e-12)
        for a, b in group_bounds(w.shape[1], group)
    ]
    return torch.cat(parts, 1).mean(0)


def _scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo: bool) -> torch.Tensor:
    s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo else x_mean.pow(alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


class AWQSearch:
    """The AWQ search step of the pipeline (`llmq.search.Search`).

    Args:
        config: the search settings.

    Example:
        >>> search = AWQSearch(AWQConfig())
        >>> report = search.run(layer, 0, stats, targets, arch)   # layer rescaled and clipped in place
        >>> report.importance["mlp.down_proj"]                    # per-column importance for encoding
    """

    name = "awq"
    needs_activations = True

    def __init__(self, config: AWQConfig | None = None) -> None:
        self.config = config or AWQConfig()

    def capture_modules(self, arch: ArchSpec) -> list[str]:
        """The linears whose inputs are recorded: the first reader of each scale group's input."""
        return [g.linears[0] for g in arch.scale_groups]

    def run(
        self,
        layer: nn.Module,
        index: int,
        stats: dict[str, InputStats] | None,
        targets: dict[str, Target],
        arch: ArchSpec,
    ) -> LayerReport:
        """Search, fold and clip one decoder layer in place; report what was done.

        Args:
            layer: the decoder layer (float32 parameters).
            index: its index.
            stats: input statistics keyed by `capture_modules` names (from `capture_inputs`).
            targets: linear name (relative to the layer) -> how it will be stored.
            arch: the architecture spec (scale groups, clip exclusions, norm offset).

        Returns:
            A `LayerReport` whose ``details`` hold per-group scale results and per-linear clip
            results, and whose ``importance`` maps each linear to the per-column importance its
            encoder uses (None when not ``weighted``).
        """
        if stats is None:
            raise LlmqError("the AWQ search needs calibration statistics")
        cfg = self.config
        report = LayerReport(index, self.name)
        groups, scale_info = [], []
        for group in arch.scale_groups:
            st = stats[group.linears[0]]
            linears = [layer.get_submodule(n) for n in group.linears]
            groups.append((group, st))
            if not cfg.scale:
                continue
            prev = layer.get_submodule(group.prev)
            if group.needs_same_shape and prev.weight.shape[0] != linears[0].weight.shape[1]:
                scale_info.append(
                    {"prev": group.prev, "skipped": "output width differs (grouped-query attention)"}
                )
                continue
            s, info = self._search_scales(
                group, linears, st, targets, self._prev_term(group, layer, stats, targets, arch)
            )
            scale_info.append(info)
            if s is not None:
                fold_scales(prev, linears, s, norm_offset=arch.norm_offset if _is_norm(prev) else 0.0)
                st.divide(s)
        report.details["scales"] = scale_info
        clip_info = {}
        for group, st in groups:
            gram = st.mean_gram
            for name in group.linears:
                t = targets[name]
                if not cfg.clip or name in arch.no_clip or t.is_float:
                    continue
                module = layer.get_submodule(name)
                imp = st.mean_sq if cfg.weighted else None
                w, info = clip_search(module.weight.data, t, gram, imp, cfg.clip_ratios)
                module.weight.data.copy_(w)
                clip_info[name] = info
        report.details["clip"] = clip_info
        report.importance = {
            name: (st.mean_sq if cfg.weighted else None) for group, st in groups for name in group.linears
        }
        if cfg.gptq:  # the readers' input second moments, after the folded scales
            report.hessians = {name: st.mean_gram.numpy() for group, st in groups for name in group.linears}
        return report

    def _prev_term(
        self,
        group: ScaleGroup,
        layer: nn.Module,
        stats: dict[str, InputStats],
        targets: dict[str, Target],
        arch: ArchSpec,
    ) -> tuple[torch.Tensor, Target, torch.Tensor, np.ndarray | None] | None:
        """With ``prev_error``: the previous linear's weight, target, input Gram and importance."""
        owner = next((g for g in arch.scale_groups if group.prev in g.linears), None)
        if not self.config.prev_error or group.prev not in targets or owner is None:
            return None
        st = stats[owner.linears[0]]  # its input, as already rescaled by its own group's fold
        imp = st.mean_sq if self.config.weighted else None
        return layer.get_submodule(group.prev).weight.data, targets[group.prev], st.mean_gram, imp

    def _search_scales(
        self,
        group: ScaleGroup,
        linears: list[nn.Module],
        st: InputStats,
        targets: dict[str, Target],
        prev: tuple[torch.Tensor, Target, torch.Tensor, np.ndarray | None] | None = None,
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        cfg = self.config
        ws = [m.weight.data for m in linears]
        ts = [targets[n] for n in group.linears]
        mean_sq = st.mean_sq
        x_mean = st.mean_abs
        n_out = sum(w.shape[0] for w in ws) + (prev[0].shape[0] if prev is not None else 0)

        # with holdout: choose on the even mini-batches' Gram, check on the odd ones'
        grams = list(st.gram_halves()) if cfg.holdout else [st.mean_gram]

        def losses(s: torch.Tensor | None) -> list[float]:
            totals = [0.0] * len(grams)
            imp = None
            if cfg.weighted:
                imp = mean_sq if s is None else mean_sq / (s.numpy() ** 2)
            for w, t in zip(ws, ts, strict=True):
                ws_ = w if s is None else w * s
                q = torch.from_numpy(t.fake_quant(ws_.numpy(), imp))
                if s is not None:
                    q = q / s
                for i, g in enumerate(grams):
                    totals[i] += output_error(w - q, g)
            if prev is not None:  # the folded rows W_prev / s, quantized, back in W_prev's units
                wp, tp, gp, impp = prev
                wps = wp if s is None else wp / s[:, None]
                qp = torch.from_numpy(tp.fake_quant(wps.numpy(), impp))
                e = output_error(wp - (qp if s is None else qp * s[:, None]), gp)
                totals = [v + e for v in totals]
            return [v / n_out for v in totals]

        base_all = losses(None)
        base = base_all[0]
        w_mean = _weight_mean(ws, ts[0].group if not ts[0].is_float else -1)
        best, best_alpha, best_s = base, None, None
        alphas = [i / cfg.n_grid for i in range(cfg.n_grid)]
        candidates = [_scales(x_mean, w_mean, a, cfg.duo_scaling) for a in alphas]
        # grid points are independent; NumPy's codecs release the GIL, so two threads use two cores
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            all_values = list(pool.map(losses, candidates))
        best_held = base_all[-1]
        for alpha, s, values in zip(alphas, candidates, all_values, strict=True):
            if values[0] < best:  # strict: the first (lowest alpha) of equal losses wins, deterministically
                best, best_alpha, best_s, best_held = values[0], alpha, s, values[-1]
        info: dict[str, Any] = {
            "prev": group.prev,
            "linears": list(group.linears),
            "loss_before": base,
            "loss_after": best,
            "alpha": best_alpha,
        }
        if cfg.holdout:
            info["heldout_before"], info["heldout_after"] = base_all[-1], best_held
            if best_s is not None and not best_held < base_all[-1]:
                log.info(
                    "%s: alpha %.2f fails on the held-out windows; keeping the weights",
                    group.prev,
                    best_alpha,
                )
                info.update(loss_after=base, alpha=None, rejected_alpha=best_alpha)
                best_s = None
        if best_s is None:
            log.info("%s: no scale beats the unscaled weights (loss %.4g); keeping them", group.prev, base)
            info["fallback"] = True
        return best_s, info


def _is_norm(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def fold_scales(
    prev: nn.Module, linears: list[nn.Module], s: torch.Tensor, *, norm_offset: float = 0.0
) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the ``linears``' input columns by it.

    ``prev`` is a norm (weight ``(C,)``, applied as ``x * (norm_offset + w)``) or a linear
    (rows ``(C, K)``, and bias). The composed function is unchanged in exact arithmetic.
    """
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.div_(s[:, None])
            if prev.bias is not None:
                prev.bias.div_(s)
        else:
            prev.weight.copy_((prev.weight + norm_offset) / s - norm_offset)
            if getattr(prev, "bias", None) is not None:
                prev.bias.div_(s)
        for m in linears:
            m.weight.mul_(s[None, :])


def summarize(reports: list[LayerReport]) -> dict[str, float]:
    """Whole-model figures of a search: mean loss ratio after/before scaling, mean alpha and clip ratio."""
    ratios, alphas, clips, fallbacks = [], [], [], 0
    for r in reports:
        for g in r.details.get("scales", []):
            if "loss_before" not in g:
                continue
            if g["loss_before"] > 0:
                ratios.append(g["loss_after"] / g["loss_before"])
            if g.get("fallback"):
                fallbacks += 1
            elif g["alpha"] is not None:
                alphas.append(g["alpha"])
        clips += [c["mean_ratio"] for c in r.details.get("clip", {}).values()]
    mean = lambda v: float(sum(v) / len(v)) if v else math.nan  # noqa: E731
    return {
        "scale_loss_ratio": mean(ratios),
        "alpha_mean": mean(alphas),
        "clip_ratio_mean": mean(clips),
        "scale_fallbacks": float(fallbacks),
    }
