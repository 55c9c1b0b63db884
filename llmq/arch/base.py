"""Architecture knowledge as data: one frozen `ArchSpec` per Hugging Face `model_type`.

A spec says where a checkpoint keeps its tensors, which transformers module is a decoder layer,
how hyper-parameters map to GGUF keys, which op feeds which linears (for the AWQ search), and
quirks such as the rotary Q/K permutation or Gemma's ``1 + w`` norms. Adding an architecture is
one small file declaring an `ArchSpec` and calling `register`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gguf

from ..errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the op whose output produces it.

    Attributes:
        prev: module (relative to the decoder layer) that produces the shared input: a norm or a linear.
        linears: the linears reading that input; AWQ scales their input channels and folds
            the inverse into ``prev``.
        loss_on: module whose output the search's loss is measured on.
        needs_same_shape: apply only when ``prev``'s output width equals the linears' input width
            (v -> o is skipped under grouped-query attention).
        prev_rows: for a fused ``prev`` (Phi-3's ``qkv_proj``, ``gate_up_proj``), the rows
            ``(start, stop)`` of its output that are the group's input, given the decoder layer.
    """

    prev: str
    linears: tuple[str, ...]
    loss_on: str
    needs_same_shape: bool = False
    prev_rows: Callable[[Any], tuple[int, int]] | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Everything llmq knows about one decoder-only architecture."""

    model_type: str
    hf_architectures: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    decoder_layer: str  # "module.path:ClassName" of transformers' decoder layer
    rotary: str = ""  # "module.path:ClassName" of the model-level rotary embedding, if any
    n_layers_key: str = "num_hidden_layers"
    layer_prefix: str = "model.layers.{i}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # Linears whose rows are un-permuted for llama.cpp's rotary layout: suffix -> config key of head count.
    rope_permute: Mapping[str, str] = field(default_factory=dict)
    # Added to every norm weight when written (Gemma stores w and computes x * (1 + w)).
    norm_offset: float = 0.0
    # The model multiplies its embeddings by sqrt(hidden) (Gemma): calibration inputs are scaled too.
    embed_scale: bool = False
    # Family-specific GGUF keys beyond the Llama-style ones: f(gguf.GGUFWriter, transformers config).
    metadata: Callable[[Any, Any], None] | None = None
    scale_groups: tuple[ScaleGroup, ...] = ()
    # Linears the clip search skips (rotary Q/K, as the AWQ reference implementation does).
    no_clip: tuple[str, ...] = ()

    @property
    def gguf_arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def layer_class(self) -> type:
        return _import(self.decoder_layer)

    def rotary_class(self) -> type | None:
        return _import(self.rotary) if self.rotary else None

    def embed_multiplier(self, config: Any) -> float:
        """What the model multiplies its token embeddings by before the first layer."""
        return math.sqrt(config.hidden_size) if self.embed_scale else 1.0

    @property
    def capture_modules(self) -> list[str]:
        """The linears whose inputs calibration records: the first reader of each scale group's input."""
        return [g.linears[0] for g in self.scale_groups]

    def reader_of(self, linear: str) -> str | None:
        """The captured module whose input ``linear`` reads too (None for a linear in no scale group)."""
        return next((g.linears[0] for g in self.scale_groups if linear in g.linears), None)

    def tensor_name_map(self, n_layers: int) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, n_layers)


def _import(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    assert spec.model_type not in _REGISTRY, spec.model_type
    _REGISTRY[spec.model_type] = spec
    return spec


def registered() -> dict[str, ArchSpec]:
    return dict(_REGISTRY)


def get_arch(config: Any, *, source: str = "config.json") -> ArchSpec:
    """Find the spec for a transformers config (by ``architectures``, then ``model_type``).

    Raises:
        UnsupportedArchitectureError: naming the architecture and the supported ones.
    """
    archs = tuple(getattr(config, "architectures", None) or ())
    for spec in _REGISTRY.values():
        if any(a in spec.hf_architectures for a in archs):
            return spec
    spec = _REGISTRY.get(getattr(config, "model_type", ""))
    if spec is not None and not archs:
        return spec
    supported = ", ".join(a for s in _REGISTRY.values() for a in s.hf_architectures)
    got = ", ".join(archs) or getattr(config, "model_type", "?")
    raise UnsupportedArchitectureError(f"{source}: unsupported architecture {got}; supported: {supported}")
