"""Activation-aware weight quantization (AWQ): per-input-channel scales, then clipping, per decoder layer.

Every candidate is scored through the encoder that will store the weights (`llmq.encoding`), on the
calibration statistics of the linear's input: the output error of a weight
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

import torch
from torch import nn

from . import moe
from .activations import InputStats
from .arch import ArchSpec, ScaleGroup
from .clip import THREADS, clip_search, group_bounds, output_error
from .encoding import Target
from .errors import LlmqError
from .precision import DTYPES, resolve_dtype
from .search import LayerReport, register_search

log = logging.getLogger(__name__)

INPUT_MODES = ("fp", "quant")


@dataclass(frozen=True)
class AWQConfig:
    """Settings of the AWQ search (research knobs; the CLI picks the measured defaults).

    Attributes:
        n_grid: points of the scale exponent grid ``a in {0, 1/n, ..., (n-1)/n}``.
        duo_scaling: ``s = mean|x|^a / mean|w|^(1-a)``; False uses the activation-only ``mean|x|^a``.
        scale: run the scale search at all (False: clip and weighting only).
        clip: run the clip search after scaling.
        clip_grid: clip ratios are ``1 - i / clip_grid``.
        max_shrink: smallest ratio tried is ``1 - max_shrink`` (exclusive).
        inputs: what the next layer's calibration inputs come from: ``quant`` (outputs of the layer
            as quantized, so each layer's search sees the error of the layers before it) or ``fp``
            (the FP layer's outputs, as AutoAWQ; one forward pass per layer fewer).
        sample_rows: output rows of each linear on which scale candidates are scored (a fixed,
            seeded sample; 0 scores all rows). Rows are encoded independently and the loss is a
            sum over rows, so a sample estimates it at a cost that does not grow with the layer;
            the winner is then encoded on every row. 1024 is the default: 256 lost 1.7% KL on the
            dithered SmolLM2 reference (BENCHMARKS.md, "Sampled scoring").
        exact_scoring: score candidates with the encoder that stores the weights, refinement
            included; False ranks scale candidates with `Target.scorer` (no K-quant refinement,
            libggml's speed where installed; measured a tie).
        coarse_stride: score every this-many-th exponent of the grid first, then those within a
            stride of the best (`best_scale`); 1 scores the whole grid. 4 scores 11-12 of the 21
            candidates and chose as the whole grid on all 90 SmolLM2 and 72 Qwen2.5-Coder groups
            of Q4_K_M (BENCHMARKS.md, "Scale, stop 19").
        score_dtype: precision of the candidates' ``E @ G`` products (sums stay float32): ``auto`` is
            bfloat16 where the device multiplies it natively (`precision.resolve_dtype`). bfloat16
            picked as float32 on all 90 SmolLM2 Q4_K_M groups, at half the time per candidate on
            an 8B ``ffn_down`` (BENCHMARKS.md, "bfloat16 scoring").
    """

    n_grid: int = 20
    duo_scaling: bool = True
    scale: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    inputs: str = "quant"
    sample_rows: int = 1024
    exact_scoring: bool = False
    coarse_stride: int = 4
    score_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1:
            raise LlmqError(
                f"AWQ grids must have at least one point (n_grid={self.n_grid}, clip_grid={self.clip_grid})"
            )
        if not 0.0 <= self.max_shrink < 1.0:
            raise LlmqError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.inputs not in INPUT_MODES:
            raise LlmqError(f"AWQ inputs {self.inputs!r}: choose one of {', '.join(INPUT_MODES)}")
        if self.coarse_stride < 1:
            raise LlmqError(f"AWQ coarse_stride must be >= 1 (1: the whole grid), got {self.coarse_stride}")
        if self.score_dtype not in DTYPES:
            raise LlmqError(f"AWQ score_dtype {self.score_dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.sample_rows < 0:
            raise LlmqError(f"AWQ sample_rows must be >= 0 (0: all rows), got {self.sample_rows}")

    @property
    def clip_ratios(self) -> list[float]:
        return [1.0 - i / self.clip_grid for i in range(max(1, int(self.max_shrink * self.clip_grid)))]


def _weight_mean(ws: list[torch.Tensor], group: int, rows: int = 4096) -> torch.Tensor:
    # AutoAWQ's w_mean: |w| relative to its group's max, averaged over all output rows (in slabs of
    # rows: a 70B gate+up pair is 1.9 GB in float32, its temporaries would be several times that)
    total = torch.zeros(ws[0].shape[1], dtype=torch.float64)
    for w in ws:
        for r in range(0, w.shape[0], rows):
            x = w[r : r + rows].abs()
            for a, b in group_bounds(w.shape[1], group):
                x[:, a:b] /= x[:, a:b].amax(dim=1, keepdim=True).clamp(min=1e-12)
            total += x.sum(0, dtype=torch.float64)
    return (total / sum(w.shape[0] for w in ws)).float()


def _scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo: bool) -> torch.Tensor:
    s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo else x_mean.pow(alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@register_search
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
            stats: input statistics keyed by `ArchSpec.capture_modules` names; divided in place by
                the folded scales, so they stay the statistics of what each linear reads.
            targets: linear name (relative to the layer) -> how it will be stored.
            arch: the architecture spec (scale groups, clip exclusions, norm offset).

        Returns:
            A `LayerReport` whose ``details`` hold per-group scale results and per-linear clip
            results and ``importance`` each linear's per-column importance (mean x^2 after the
            folded scales).
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
            rows = group.prev_rows(layer) if group.prev_rows is not None else None
            if skips_scaling(group, prev, linears, rows):
                scale_info.append(
                    {"prev": group.prev, "skipped": "output width differs (grouped-query attention)"}
                )
                continue
            s, info = self._search_scales(group, linears, st, targets)
            scale_info.append(info)
            if s is not None:
                offset = arch.norm_offset if _is_norm(prev) else 0.0
                fold_scales(prev, linears, s, norm_offset=offset, rows=rows)
                st.divide(s)
        report.details["scales"] = scale_info
        clip_info = {}
        for group, st in groups:
            names = [
                n for n in group.linears if cfg.clip and n not in arch.no_clip and not targets[n].is_float
            ]
            for name in names:  # on the statistics' device
                module = layer.get_submodule(name)
                w, info = clip_search(
                    module.weight.data, targets[name], st.gram, st.mean_sq, cfg.clip_ratios, tokens=st.n
                )
                module.weight.data.copy_(w)
                clip_info[name] = info
        report.details["clip"] = clip_info
        report.importance = {name: st.mean_sq for group, st in groups for name in group.linears}
        if arch.experts is not None:  # the MoE block's groups (`llmq.moe`)
            report.details["experts"], importance = moe.search(layer, stats, targets, arch, cfg, best_scale)
            report.importance.update(importance)
        return report

    def _search_scales(
        self, group: ScaleGroup, linears: list[nn.Module], st: InputStats, targets: dict[str, Target]
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        choice = best_scale(
            [m.weight.data for m in linears], [targets[n] for n in group.linears], st, self.config
        )
        info: dict[str, Any] = {
            "prev": group.prev,
            "linears": list(group.linears),
            "loss_before": choice.base,
            "loss_after": choice.loss,
            "alpha": choice.alpha,
        }
        if choice.s is None:
            log.info(
                "%s: no scale beats the unscaled weights (loss %.4g); keeping them", group.prev, choice.base
            )
            info["fallback"] = True
        return choice.s, info


@dataclass(frozen=True)
class ScaleChoice:
    """The outcome of a scale group's search: losses of the unscaled weights and of the choice, its
    exponent and scales (None: no grid point beats the unscaled weights)."""

    base: float
    loss: float
    alpha: float | None
    s: torch.Tensor | None


def best_scale(ws: list[torch.Tensor], targets: list[Target], st: InputStats, cfg: AWQConfig) -> ScaleChoice:
    """The grid point of lowest loss (`scale_losses`), scored coarse to fine.

    Every `AWQConfig.coarse_stride`-th exponent is scored with the unscaled weights, then every
    exponent within a stride of the best of them. Ties go to the lowest exponent; a point must be
    strictly better than the unscaled weights to be chosen.
    """
    alphas, cands = candidate_scales(ws, targets, st, cfg)
    losses: dict[int, float] = {}  # by grid index; -1: unscaled

    def score(indices: list[int]) -> None:
        new = [i for i in indices if i not in losses]
        values = scale_losses(
            ws,
            targets,
            st,
            [None if i < 0 else cands[i] for i in new],
            cfg.sample_rows,
            cfg.exact_scoring,
            cfg.score_dtype,
        )
        losses.update(zip(new, values, strict=True))

    def best() -> int:
        return min((i for i in losses if i >= 0), key=lambda i: (losses[i], i))

    stride = cfg.coarse_stride
    score([-1, *range(0, len(cands), stride)])
    c = best()
    score(list(range(max(0, c - stride + 1), min(len(cands), c + stride))))
    b, base = best(), losses[-1]
    if losses[b] < base:
        return ScaleChoice(base, losses[b], alphas[b], cands[b])
    return ScaleChoice(base, base, None, None)


def candidate_scales(
    ws: list[torch.Tensor], targets: list[Target], st: InputStats, cfg: AWQConfig
) -> tuple[list[float], list[torch.Tensor]]:
    """The grid of a scale group: exponents ``a`` and their per-column scales ``(K,)``."""
    w_mean = _weight_mean(ws, targets[0].group if not targets[0].is_float else -1)
    alphas = [i / cfg.n_grid for i in range(cfg.n_grid)]
    return alphas, [_scales(st.mean_abs, w_mean, a, cfg.duo_scaling) for a in alphas]


def skips_scaling(
    group: ScaleGroup, prev: nn.Module, linears: list[nn.Module], rows: tuple[int, int] | None = None
) -> bool:
    """Whether ``prev``'s outputs (its ``rows``, if fused) cannot take the group's scales (v -> o under
    grouped-query attention)."""
    width = prev.weight.shape[0] if rows is None else rows[1] - rows[0]
    return group.needs_same_shape and width != linears[0].weight.shape[1]


def scale_losses(
    ws: list[torch.Tensor],
    targets: list[Target],
    st: InputStats,
    candidates: list[torch.Tensor | None],
    sample: int = 0,
    exact: bool = True,
    dtype: str = "float32",
) -> list[float]:
    """Output error per output row of a scale group's linears for each candidate scale (None: unscaled).

    Args:
        ws: the linears' weights ``(N_i, K)`` reading one input.
        targets: how each is stored; candidates are scored through that encoder (without
            refinement when not ``exact``).
        st: the input's statistics.
        candidates: per-column scales ``(K,)`` multiplied into the weights, or None.
        sample: score on this many rows of each linear (`sample_rows`; 0: all).
        exact: see `AWQConfig.exact_scoring`.
        dtype: see `AWQConfig.score_dtype`.

    Returns:
        One loss per candidate: ``sum((E @ G) * E)`` over the scored rows divided by their number.
    """
    targets = [t.scorer(exact) for t in targets]
    # the summed Gram, not a mean copy of it (3.3 GB at 28672 inputs): losses divide by the tokens.
    # Scoring runs where the statistics are (a GPU's encoders and products, or the CPU's).
    mean_sq, gram = st.mean_sq, st.gram
    if resolve_dtype(dtype, gram.device) == "bfloat16":  # a copy for this group's candidates
        gram = gram.to(torch.bfloat16)
    ws = [sample_rows(w, sample).to(gram.device) for w in ws]
    n_out = sum(w.shape[0] for w in ws) * max(st.n, 1)

    def loss(s: torch.Tensor | None) -> float:
        total = 0.0
        imp = mean_sq if s is None else mean_sq / (s.cpu().numpy() ** 2)
        s = None if s is None else s.to(gram.device)
        for w, t in zip(ws, targets, strict=True):
            q = t.fake_quant(w if s is None else w * s, imp)
            if s is not None:
                q = q / s
            total += output_error(w - q, gram)
        return total / n_out

    # candidates are independent; the codecs release the GIL, so two threads use two cores
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(loss, candidates))


def sample_rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """A fixed sample of ``n`` rows of ``w`` (all when ``n`` is 0 or covers them), in row order.

    Seeded by the shape alone, so a layer's sample is the same in every run and on every device.
    """
    if n <= 0 or n >= w.shape[0]:
        return w
    gen = torch.Generator().manual_seed(w.shape[0] * 1_000_003 + w.shape[1])
    idx = torch.randperm(w.shape[0], generator=gen)[:n].sort().values
    return w[idx.to(w.device)].contiguous()


def _is_norm(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def fold_scales(
    prev: nn.Module,
    linears: list[nn.Module],
    s: torch.Tensor,
    *,
    norm_offset: float = 0.0,
    rows: tuple[int, int] | None = None,
) -> None:
    """Divide ``prev``'s output channels by ``s`` and multiply the ``linears``' input columns by it.

    ``prev`` is a norm (weight ``(C,)``, applied as ``x * (norm_offset + w)``) or a linear
    (rows ``(C, K)``, and bias), or the ``rows`` of a fused linear's output that the linears read.
    The composed function is unchanged in exact arithmetic.
    """
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            a, b = rows if rows is not None else (0, prev.weight.shape[0])
            prev.weight[a:b].div_(s[:, None])
            if prev.bias is not None:
                prev.bias[a:b].div_(s)
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
