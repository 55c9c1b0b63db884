"""AWQ for a sparse mixture-of-experts block (`llmq.arch.Experts`): statistics per expert, two kinds of group.

- The block's norm feeds the router and every expert's gate and up. One scale is searched for all of
  them on the block's input statistics (every token), scoring a seeded row sample of the stacked
  gate/up rows through their encoder; the router's columns take the scale too and stay unquantized.
- Each expert's up -> down is its own group, searched on the inputs of that expert's down projection
  over the tokens routed to it. An expert that saw fewer than `MIN_TOKENS` tokens keeps its weights
  unscaled and is encoded with the importance of what it saw (or the block's, if nothing), logged.

The encoders weigh each expert by its own routed tokens' mean x^2 (importance ``(E, K)``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

InputStats = Any  # `llmq.activations.InputStats` (built by the caller's factory: no import cycle)

if TYPE_CHECKING:
    from .arch import ArchSpec
    from .arch.base import Experts
    from .encoding import Target

log = logging.getLogger(__name__)

MIN_TOKENS = 16  # an expert routed fewer tokens than this is not scaled (its statistics are noise)


def stats_names(experts: Experts, n: int) -> tuple[str, list[str], list[str]]:
    """Keys of a layer's MoE statistics: the block input, each expert's input, each expert's down input."""
    m = f"{experts.module}.experts"
    return experts.module, [f"{m}.{e}" for e in range(n)], [f"{m}.{e}.down" for e in range(n)]


def linear_names(experts: Experts) -> tuple[str, str, str]:
    """The stacked gate, up and down linears' names within the layer (as `Experts.views` keys them)."""
    m = f"{experts.module}.experts"
    return f"{m}.gate_proj", f"{m}.up_proj", f"{m}.down_proj"


def expert_readers(experts: Experts | None, config: Any, linear: str) -> list[str] | None:
    """The per-expert statistics keys a stacked expert linear reads (None: not one): each expert's
    input for its gate and up, its down input for its down projection."""
    if experts is None:
        return None
    gate, up, down = linear_names(experts)
    _, inputs, downs = stats_names(experts, experts.count(config))
    return {gate: inputs, up: inputs, down: downs}.get(linear)


def capture_hooks(
    layer: nn.Module, experts: Experts, device: torch.device, new_stats: Callable[..., InputStats]
) -> tuple[dict[str, InputStats], list[Any]]:
    """Statistics (made empty here, filled as the layer runs) and the hooks that fill them."""
    block, ex = layer.get_submodule(experts.module), layer.get_submodule(f"{experts.module}.experts")
    n, inter, hidden = ex.down_proj.shape[0], ex.down_proj.shape[2], ex.down_proj.shape[1]
    block_name, inputs, downs = stats_names(experts, n)
    stats = {block_name: new_stats(hidden, device)}
    stats.update({name: new_stats(hidden, device) for name in inputs})
    stats.update({name: new_stats(inter, device) for name in downs})

    def on_experts(module: nn.Module, args: tuple[Any, ...]) -> None:
        x, top_k_index = args[0], args[1]
        for e in range(n):
            tokens = (top_k_index == e).any(-1).nonzero()[:, 0]
            if tokens.numel() == 0:
                continue
            xe = x[tokens]
            stats[inputs[e]].add(xe)
            gate, up = nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
            stats[downs[e]].add(module.act_fn(gate) * up)

    hooks = [
        block.register_forward_pre_hook(lambda _m, args: stats[block_name].add(args[0])),
        ex.register_forward_pre_hook(on_experts),
    ]
    return stats, hooks


def search(
    layer: nn.Module,
    stats: dict[str, InputStats],
    targets: dict[str, Target],
    arch: ArchSpec,
    cfg: Any,
    best_scale: Callable[..., Any],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scale the block (norm -> router, gates, ups; each expert's up -> down) in place.

    Args:
        layer, stats, targets, arch, cfg: as `llmq.awq.AWQSearch.run` has them (``cfg``: its `AWQConfig`).
        best_scale: the scale search of one group (`llmq.awq.best_scale`).

    Returns:
        (report details: per-expert token counts and the groups' results, importance per stacked
        tensor name ``(E, K)``).
    """
    experts = arch.experts
    assert experts is not None
    ex = layer.get_submodule(f"{experts.module}.experts")
    n, inter = ex.down_proj.shape[0], ex.down_proj.shape[2]
    block_name, inputs, downs = stats_names(experts, n)
    gate_name, up_name, down_name = linear_names(experts)
    counts = [stats[name].n for name in inputs]
    details: dict[str, Any] = {"tokens": counts, "unscaled": []}

    # norm -> router + every expert's gate and up, on the block input
    st = stats[block_name]
    gu = ex.gate_up_proj.data
    ws = [gu[:, :inter].reshape(-1, gu.shape[2]), gu[:, inter:].reshape(-1, gu.shape[2])]
    ts = [targets[gate_name], targets[up_name]]
    if cfg.scale:
        choice = best_scale(ws, ts, st, cfg)
        info: dict[str, Any] = {"prev": experts.norm, "loss_before": choice.base, "alpha": None}
        if choice.s is not None:
            fold_block(layer, experts, choice.s, arch.norm_offset)
            for name in (block_name, *inputs):
                stats[name].divide(choice.s)
            info.update(alpha=choice.alpha, loss_after=choice.loss)
        else:
            info.update(loss_after=choice.base, fallback=True)
        details["norm"] = info

    # each expert's up -> down, on its routed tokens
    scaled = []
    for e in range(n):
        if not cfg.scale:
            break
        if counts[e] < MIN_TOKENS:
            details["unscaled"].append(e)
            continue
        st_e, w = stats[downs[e]], ex.down_proj.data[e]
        t = [targets[down_name]]
        choice = best_scale([w], t, st_e, cfg)
        if choice.s is not None:
            fold_expert(layer, experts, e, choice.s)
            st_e.divide(choice.s)
            scaled.append(choice.alpha)
    details["down_alpha_mean"] = float(np.mean(scaled)) if scaled else None
    if details["unscaled"]:
        log.info("experts %s saw fewer than %d tokens: not scaled", details["unscaled"], MIN_TOKENS)

    block_sq = st.mean_sq

    def per_expert(names: list[str]) -> np.ndarray:
        return np.stack([stats[nm].mean_sq if stats[nm].n else block_sq for nm in names[:n]])

    imp_in = per_expert(inputs)
    imp_down = np.stack([stats[d].mean_sq if stats[d].n else np.ones(inter, np.float32) for d in downs])
    return details, {gate_name: imp_in, up_name: imp_in, down_name: imp_down}


def fold_block(layer: nn.Module, experts: Experts, s: torch.Tensor, norm_offset: float = 0.0) -> None:
    """Fold ``s`` into the norm before the block; the router and every expert's gate/up take it."""
    norm = layer.get_submodule(experts.norm)
    ex, router = (
        layer.get_submodule(f"{experts.module}.experts"),
        layer.get_submodule(f"{experts.module}.gate"),
    )
    with torch.no_grad():
        norm.weight.copy_((norm.weight + norm_offset) / s - norm_offset)
        ex.gate_up_proj.data.mul_(s[None, None, :])
        router.weight.mul_(s[None, :])


def fold_expert(layer: nn.Module, experts: Experts, e: int, s: torch.Tensor) -> None:
    """Fold ``s`` between expert ``e``'s up rows and its down projection (SwiGLU is linear in up)."""
    ex = layer.get_submodule(f"{experts.module}.experts")
    inter = ex.down_proj.shape[2]
    with torch.no_grad():
        ex.gate_up_proj.data[e, inter:].div_(s[:, None])
        ex.down_proj.data[e].mul_(s[None, :])
