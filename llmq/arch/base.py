"""Architecture knowledge as data: one frozen `ArchSpec` per Hugging Face `model_type`.

A spec says where a checkpoint keeps its tensors, which transformers module is a decoder layer,
how hyper-parameters map to GGUF keys, which op feeds which linears (for the AWQ search), and
quirks such as the rotary Q/K permutation or Gemma's ``1 + w`` norms. Adding an architecture is
one small file declaring an `ArchSpec` and calling `register`.
"""

from __future__ import annotations

import importlib
import math
import re
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
class Experts:
    """A sparse mixture-of-experts block: checkpoints store its experts one by one, transformers (v5)
    holds them stacked (``experts.gate_up_proj`` ``(E, 2I, H)``, ``experts.down_proj`` ``(E, H, I)``) and
    GGUF wants ``ffn_{gate,up,down}_exps`` ``(E, rows, K)`` beside the router ``ffn_gate_inp``.

    Attributes:
        module: the block in transformers' decoder layer (its ``gate`` is the router).
        gate, up, down: checkpoint names (within the layer) of expert ``{e}``'s projections.
        router: checkpoint name (within the layer) of the router weight ``(E, H)``.
        count_key, used_key, ff_key: config keys of the expert count, the experts used per token
            and an expert's intermediate size.
        norm: the norm in front of the block (AWQ folds the router's and experts' scale into it).
    """

    module: str
    gate: str
    up: str
    down: str
    router: str
    count_key: str
    used_key: str = "num_experts_per_tok"
    ff_key: str = "moe_intermediate_size"
    norm: str = "post_attention_layernorm"  # the norm in front of the block

    def count(self, config: Any) -> int:
        return int(getattr(config, self.count_key))

    def layer_params(self) -> tuple[str, str, str]:
        """transformers' stacked parameters within the layer: router weight, gate_up, down."""
        return (
            f"{self.module}.gate.weight",
            f"{self.module}.experts.gate_up_proj",
            f"{self.module}.experts.down_proj",
        )

    def stacked(self) -> dict[str, str]:
        """GGUF tensor suffix -> the layer tensor llmq encodes it from (gate/up split from gate_up)."""
        m = f"{self.module}.experts"
        return {
            "ffn_gate_inp.weight": f"{self.module}.gate.weight",
            "ffn_gate_exps.weight": f"{m}.gate_proj.weight",
            "ffn_up_exps.weight": f"{m}.up_proj.weight",
            "ffn_down_exps.weight": f"{m}.down_proj.weight",
        }

    def views(self, params: dict[str, Any]) -> dict[str, Any]:
        """The stacked gate, up and down ``(E, rows, K)`` of a layer's state dict, as `stacked` names them."""
        _, gate_up, down = self.layer_params()
        m, gu = f"{self.module}.experts", params[gate_up]
        half = gu.shape[1] // 2
        return {
            f"{m}.gate_proj.weight": gu[:, :half],
            f"{m}.up_proj.weight": gu[:, half:],
            f"{m}.down_proj.weight": params[down],
        }

    def assign(self, layer: Any, name: str, values: Any) -> bool:
        """Copy ``values`` into layer tensor ``name`` if it is one of `views`' (the stacked gate, up or
        down: views of the layer's parameters); return whether it was."""
        view = self.views({n: p.data for n, p in layer.named_parameters()}).get(f"{name}.weight")
        if view is None:
            return False
        view.copy_(values)
        return True

    def is_source(self, name: str) -> bool:
        """Whether checkpoint name ``name`` (within the layer) is an expert's or the router's."""
        pats = [self.gate, self.up, self.down]
        return name == self.router or any(
            re.fullmatch(re.escape(p).replace(r"\{e\}", r"\d+"), name) for p in pats
        )


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
    # A sparse MoE block in every layer (Mixtral, Qwen3-MoE).
    experts: Experts | None = None
    # Tensors llmq computes from the config (Phi-3's longrope factors): f(config) -> {GGUF name: F32 values}.
    computed: Callable[[Any], dict[str, Any]] | None = None
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
