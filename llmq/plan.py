"""The quantization plan: every tensor of the output, its GGUF name, shape, type and group, in file order.

The plan is known before any weight is read (shapes come from the safetensors headers), so the GGUF
header can be written first and tensor data streamed after it, layer by layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .arch import ArchSpec
from .arch.hparams import head_dim, rope_parameters
from .codecs import REGISTRY, GroupCodec
from .config import QuantConfig
from .errors import SourceError
from .mixes import ModelShape, mix_type, override, plain_type
from .source import Checkpoint

log = logging.getLogger(__name__)

# A type whose blocks do not tile a row falls back to a type that stores it (llama-quantize does the
# same in `llama_tensor_get_type`): legacy types (32-value blocks) to F16, K-quants (256) to its legacy
# choices (Q2_K/Q3_K go to IQ4_NL there, which llmq does not write: Q4_0 here).
FALLBACK = {
    "Q4_0": "F16",
    "Q4_1": "F16",
    "Q5_0": "F16",
    "Q5_1": "F16",
    "Q8_0": "F16",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor.

    Attributes:
        name: GGUF tensor name (``blk.3.attn_q.weight``).
        source: checkpoint tensor name, or None for tensors llmq computes (``rope_freqs.weight``).
        shape: numpy shape ``(rows, row_length)`` (GGUF lists it reversed).
        codec: GGUF type name.
        group: values sharing one scale in a row (the block size unless group-wise).
        layer: decoder layer index, None for tensors outside the layers.
        role: ``embed``, ``output``, ``norm``, ``linear``, ``bias`` or ``rope_freqs``.
        note: why the type differs from the one asked for, if it does.
    """

    name: str
    source: str | None
    shape: tuple[int, ...]
    codec: str
    group: int
    layer: int | None
    role: str
    note: str = ""

    @property
    def nbytes(self) -> int:
        return REGISTRY[self.codec].nbytes(self.shape)

    @property
    def n_params(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _choose(shape: tuple[int, ...], want: str, group: int) -> tuple[str, int, str]:
    codec = REGISTRY[want]
    if codec.can_store(shape):
        if not issubclass(codec, GroupCodec):
            return want, codec.block_size, ""
        g = shape[-1] if group == -1 else group
        note = f"last group of each row holds {shape[-1] % g}" if shape[-1] % g else ""
        return want, g, note
    fallback = FALLBACK.get(want, "F16")
    if not REGISTRY[fallback].can_store(shape):
        fallback = "F16"
    note = f"row of {shape[-1]} is not a multiple of {codec.block_size}: {want} -> {fallback}"
    return fallback, REGISTRY[fallback].block_size, note


def _want(
    cfg: QuantConfig, name: str, role: str, layer: int | None, shape: tuple[int, ...], model: ModelShape
) -> tuple[str, int]:
    """The type (and group) asked for a 2-D tensor, before the shape fallback: ``--tensor-type``
    first, then ``--embed-type`` for embeddings/output, then the mix's rules or the plain type."""
    forced = override(name, cfg.tensor_types)
    if forced is not None:
        return forced, REGISTRY[forced].block_size
    if role != "linear" and cfg.embed_type is not None:
        return cfg.embed_type, 32
    if cfg.mix is not None:
        want = mix_type(cfg.mix, name, layer, shape, model)
        return want, REGISTRY[want].block_size
    if role != "linear":
        return cfg.embedding_codec_name, 32
    codec = REGISTRY[cfg.codec_name]
    always = plain_type(name, layer, model)  # llama-quantize's rules for every quantized file type
    if always is not None and not codec.is_float and cfg.group == codec.block_size:
        return always, REGISTRY[always].block_size
    return cfg.codec_name, cfg.group


def plan_tensors(ckpt: Checkpoint, arch: ArchSpec, cfg: QuantConfig) -> list[TensorPlan]:
    """List every output tensor in file order: embeddings, decoder layers, final norm, output.

    Raises:
        SourceError: when a tensor the architecture needs is missing from the checkpoint.
    """
    config = ckpt.config
    n_layers = int(getattr(config, arch.n_layers_key))
    tmap = arch.tensor_name_map(n_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    n_expert = arch.experts.count(config) if arch.experts is not None else 0
    model = ModelShape(n_layers=n_layers, n_gqa=n_head // max(n_kv, 1), tied=tied, n_expert=n_expert)
    for needed in (arch.embed, arch.final_norm) + (() if tied else (arch.lm_head,)):
        if needed not in ckpt:
            raise SourceError(f"{ckpt.path}: tensor {needed} is missing from the checkpoint")

    def plan(source: str, layer: int | None) -> TensorPlan | None:
        name = tmap.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            log.warning("skipping %s: no GGUF name for it in the %s architecture", source, arch.model_type)
            return None
        shape = ckpt.shape(source)
        if len(shape) == 1:
            role, want, group = ("bias" if source.endswith(".bias") else "norm"), "F32", 1
        else:
            role = "embed" if source == arch.embed else "output" if source == arch.lm_head else "linear"
            want, group = _want(cfg, name, role, layer, shape, model)
        codec, group, note = _choose(shape, want, group)
        return TensorPlan(name, source, shape, codec, group, layer, role, note)

    plans = [plan(arch.embed, None)]
    if rope_parameters(config)["rope_type"] == "llama3":  # Llama 3.1 scaling: llama.cpp reads the factors
        plans.append(
            TensorPlan("rope_freqs.weight", None, (head_dim(config) // 2,), "F32", 1, None, "rope_freqs")
        )
    for name, values in (arch.computed(config) if arch.computed is not None else {}).items():
        plans.append(TensorPlan(name, None, tuple(values.shape), "F32", 1, None, "rope_freqs"))
    for i in range(n_layers):
        prefix = arch.layer_prefix.format(i=i)
        sources = [s for s in ckpt.names() if s.startswith(prefix)]
        if not sources:
            raise SourceError(f"{ckpt.path}: decoder layer {i} ({prefix}*) has no tensors in the checkpoint")
        if arch.experts is not None:  # experts are written stacked, not one by one
            sources = [s for s in sources if not arch.experts.is_source(s.removeprefix(prefix))]
            plans += _expert_plans(ckpt, arch, cfg, i, model)
        plans += [plan(s, i) for s in sorted(sources)]
    plans.append(plan(arch.final_norm, None))
    if not tied:
        plans.append(plan(arch.lm_head, None))
    return [p for p in plans if p is not None]


def _expert_plans(
    ckpt: Checkpoint, arch: ArchSpec, cfg: QuantConfig, i: int, model: ModelShape
) -> list[TensorPlan]:
    """Layer ``i``'s MoE tensors as GGUF stacks them: the router (F32, never quantized, as
    llama-quantize leaves ``ffn_gate_inp``) and ``ffn_{gate,up,down}_exps`` ``(E, rows, K)``."""
    exp = arch.experts
    assert exp is not None
    prefix, n = arch.layer_prefix.format(i=i), exp.count(ckpt.config)
    shapes = {}
    for key, template in (("gate", exp.gate), ("up", exp.up), ("down", exp.down), ("router", exp.router)):
        name = prefix + template.format(e=0)
        if name not in ckpt:
            raise SourceError(f"{ckpt.path}: tensor {name} is missing from the checkpoint ({n} experts)")
        shapes[key] = tuple(ckpt.shape(name))
    out = []
    for suffix, source in exp.stacked().items():
        name = f"blk.{i}.{suffix}"
        if suffix == "ffn_gate_inp.weight":
            out.append(TensorPlan(name, prefix + source, shapes["router"], "F32", 1, i, "router"))
            continue
        shape = (n, *shapes[suffix.split("_")[1]])
        want, group = _want(cfg, name, "linear", i, shape, model)
        codec, group, note = _choose(shape, want, group)
        out.append(TensorPlan(name, prefix + source, shape, codec, group, i, "linear", note))
    return out
