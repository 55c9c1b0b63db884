"""Materialize a model one decoder layer at a time, as transformers' own modules.

The layer skeleton is built on the meta device (`accelerate.init_empty_weights`), then its
parameters are assigned from the checkpoint; nothing of other layers is ever resident.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from accelerate import init_empty_weights
from torch import nn

from .arch import ArchSpec
from .errors import SourceError
from .source import Checkpoint

log = logging.getLogger(__name__)


class LayerStream:
    """Decoder layers of a checkpoint, built on demand.

    Args:
        ckpt: the opened checkpoint.
        arch: its architecture spec.
        dtype: dtype the layer's parameters are cast to (float32 for the forwards and the search);
            None keeps the checkpoint's (encoding alone converts each slab it reads).

    Example:
        >>> stream = LayerStream(ckpt, arch)
        >>> for i, layer in stream:      # layer i is a transformers LlamaDecoderLayer
        ...     ...                      # drop it before the next one loads
    """

    def __init__(
        self, ckpt: Checkpoint, arch: ArchSpec, *, dtype: torch.dtype | None = torch.float32
    ) -> None:
        self.ckpt = ckpt
        self.arch = arch
        self.dtype = dtype
        self.n_layers = int(getattr(ckpt.config, arch.n_layers_key))
        self._cls = arch.layer_class()
        if getattr(ckpt.config, "_attn_implementation", None) is None:
            # modules built directly need an attention backend; sdpa has no logit soft-cap (Gemma 2)
            capped = getattr(ckpt.config, "attn_logit_softcapping", None) is not None
            ckpt.config._attn_implementation = "eager" if capped else "sdpa"
        if arch.experts is not None and getattr(ckpt.config, "_experts_implementation", None) is None:
            ckpt.config._experts_implementation = "eager"  # transformers' loop over the experts

    def layer_sources(self, i: int) -> dict[str, str]:
        """Map parameter name within layer ``i`` -> checkpoint tensor name."""
        prefix = self.arch.layer_prefix.format(i=i)
        return {n[len(prefix) :]: n for n in self.ckpt.names() if n.startswith(prefix)}

    def load(self, i: int) -> nn.Module:
        """Build decoder layer ``i`` and fill it from the checkpoint."""
        with init_empty_weights():
            layer = self._cls(self.ckpt.config, layer_idx=i)
        expected = set(layer.state_dict())
        sources = self.layer_sources(i)
        stacked = self._experts(i)  # a MoE block's stacked parameters, built from its experts
        missing = sorted(expected - set(sources) - set(stacked))
        if missing:
            raise SourceError(
                f"{self.ckpt.path}: layer {i} lacks {', '.join(self.arch.layer_prefix.format(i=i) + m for m in missing)}"
            )
        for extra in sorted(set(sources) - expected):  # e.g. rotary inv_freq buffers of old checkpoints
            if self.arch.experts is None or not self.arch.experts.is_source(extra):
                log.debug("ignoring %s: not a parameter of %s", sources[extra], self._cls.__name__)
        state = {}
        for name in expected:
            t = stacked[name]() if name in stacked else self.ckpt.get(sources[name])
            want = layer.state_dict()[name].shape
            if tuple(t.shape) != tuple(want):
                raise SourceError(
                    f"{self.ckpt.path}: tensor {sources[name]} has shape {tuple(t.shape)}, "
                    f"config.json implies {tuple(want)}"
                )
            state[name] = t if self.dtype is None else t.to(self.dtype)
        layer.load_state_dict(state, assign=True, strict=True)
        return layer.eval()

    def _experts(self, i: int) -> dict[str, Callable[[], torch.Tensor]]:
        """Loaders of layer ``i``'s stacked MoE parameters (router, gate_up, down) from its experts."""
        exp = self.arch.experts
        if exp is None:
            return {}
        prefix, n = self.arch.layer_prefix.format(i=i), exp.count(self.ckpt.config)
        router, gate_up, down = exp.layer_params()

        def get(template: str, e: int) -> torch.Tensor:
            name = prefix + template.format(e=e)
            if name not in self.ckpt:
                raise SourceError(
                    f"{self.ckpt.path}: tensor {name} is missing from the checkpoint ({n} experts)"
                )
            return self.ckpt.get(name)

        return {
            router: lambda: get(exp.router, 0),
            gate_up: lambda: torch.stack([torch.cat([get(exp.gate, e), get(exp.up, e)]) for e in range(n)]),
            down: lambda: torch.stack([get(exp.down, e) for e in range(n)]),
        }

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        for i in range(self.n_layers):
            yield i, self.load(i)

    def __len__(self) -> int:
        return self.n_layers
