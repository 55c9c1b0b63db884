"""The clip search of AWQ: shrink each (row, group) range where that lowers the linear's output error.

Errors are measured with the Gram trick (see `llmq.awq`): the output error of a weight error ``E``
over the calibration tokens is ``sum((E @ G) * E)``, and each (row, group)'s share of it is the
diagonal block ``e_g G_gg e_g^T``, so a grid of ratios costs one encode of the weight per ratio.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .encoding import Target

# threads scoring grid points at once (results do not depend on it); NumPy's codecs release the GIL
THREADS = min(2, os.cpu_count() or 1)


def output_error(e: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean over tokens of ``|E x|^2`` summed over output rows: ``sum((E @ G) * E)``; a bfloat16
    ``gram`` multiplies in bfloat16 and sums in float32."""
    return float(((e.to(gram.dtype) @ gram).float() * e).sum())


def group_bounds(k: int, group: int) -> list[tuple[int, int]]:
    """Column ranges of a row's quantization groups (the last one ragged, as the codecs split it)."""
    g = k if group <= 0 else min(group, k)
    return [(a, min(a + g, k)) for a in range(0, k, g)]


def block_errors(e: torch.Tensor, gram: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """Each (row, group)'s share of the output error: ``e_g G_gg e_g^T``, shape ``(N, n_groups)``."""
    n = e.shape[0]
    g = bounds[0][1] - bounds[0][0]
    full = [ab for ab in bounds if ab[1] - ab[0] == g]
    k = len(full) * g
    # the equal-width groups as one batched product over the diagonal blocks of G
    blocks = gram[:k, :k].reshape(len(full), g, len(full), g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    eb = e[:, :k].reshape(n, len(full), g).transpose(0, 1)  # (groups, N, g)
    out = [(torch.bmm(eb, blocks) * eb).sum(-1).T]
    for a, b in bounds[len(full) :]:  # a ragged last group
        out.append(((e[:, a:b] @ gram[a:b, a:b]) * e[:, a:b]).sum(1, keepdim=True))
    return torch.cat(out, 1)


def clip_search(
    w: torch.Tensor,
    target: Target,
    gram: torch.Tensor,
    importance: np.ndarray | None,
    ratios: list[float],
    *,
    tokens: int = 1,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Shrink each (row, group) range to the ratio whose quantized group errs least on the output.

    Args:
        w: weight ``(N, K)`` float32 (already scaled).
        target: how it is stored (the group size sets the ranges searched).
        gram: ``G`` of its input ``(K, K)``, or the sum ``X^T X`` over ``tokens`` tokens (the choice
            does not depend on the scale; the reported losses are divided by ``tokens``).
        importance: per-column importance for the weighted encoder, or None.
        ratios: candidate ratios, the first 1.0.

    Returns:
        (clipped weight, info with mean ratio, fraction of groups clipped, loss before/after).
    """
    assert ratios and ratios[0] == 1.0, ratios
    w = w.to(gram.device)  # searched where the statistics are
    bounds = group_bounds(w.shape[1], target.group)
    lo = torch.stack([w[:, a:b].amin(dim=1) for a, b in bounds], 1)
    hi = torch.stack([w[:, a:b].amax(dim=1) for a, b in bounds], 1)
    if target.symmetric:
        hi = torch.maximum(hi.abs(), lo.abs())
        lo = -hi
    widths = torch.tensor([b - a for a, b in bounds], device=w.device)

    def clamp(r: torch.Tensor) -> torch.Tensor:  # r: (N, n_groups) ratios
        lo_e = torch.repeat_interleave(lo * r, widths, dim=1)
        hi_e = torch.repeat_interleave(hi * r, widths, dim=1)
        return torch.minimum(torch.maximum(w, lo_e), hi_e)

    def group_losses(wc: torch.Tensor) -> torch.Tensor:
        e = w - target.fake_quant(wc, importance)
        return block_errors(e, gram, bounds)

    n_groups = len(bounds)
    e_unclipped = w - target.fake_quant(w, importance)  # ratio 1: also the rows' error before clipping
    with ThreadPoolExecutor(max_workers=THREADS) as pool:  # independent candidates, as in the scale search
        all_losses = [block_errors(e_unclipped, gram, bounds)] + list(
            pool.map(
                lambda ratio: group_losses(clamp(torch.full((w.shape[0], n_groups), ratio, device=w.device))),
                ratios[1:],
            )
        )
    best = all_losses[0]
    best_r = torch.ones_like(best)
    for ratio, losses in zip(ratios[1:], all_losses[1:], strict=True):
        r = torch.full_like(best, ratio)
        better = losses < best
        best = torch.where(better, losses, best)
        best_r = torch.where(better, r, best_r)
    clipped = clamp(best_r)
    # The choice above scores each group on its diagonal block of G; the output error of a row also
    # has cross-group terms. Keep a row's clipping only if its full output error goes down (rows are
    # encoded independently, so this is exact).
    before_rows = row_errors(e_unclipped, gram)
    after_rows = row_errors(w - target.fake_quant(clipped, importance), gram)
    keep = after_rows < before_rows
    best_r = torch.where(keep[:, None], best_r, torch.ones_like(best_r))
    clipped = torch.where(keep[:, None], clipped, w)
    n = w.shape[0] * max(tokens, 1)
    info = {
        "mean_ratio": float(best_r.mean()),
        "clipped_fraction": float((best_r < 1).float().mean()),
        "rows_kept_unclipped": int((~keep).sum()),
        "loss_before": float(before_rows.sum()) / n,
        "loss_after": float(torch.minimum(before_rows, after_rows).sum()) / n,
    }
    return clipped, info


def row_errors(e: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Each output row's error over the calibration tokens: ``(E G E^T)_rr``."""
    return ((e @ gram) * e).sum(1)
