"""The ``numpy`` evaluation backend: a GGUF run through llmq's reference kernels.

The GGUF's metadata becomes a transformers config; every linear (attention, MLP, output) is
replaced by `KernelLinear`, which multiplies with the tensor's packed GGUF bytes through
`llmq.kernels.matmul`; embeddings and norms are decoded once to float32. Everything else
(attention, rotary, RMSNorm, SiLU) is transformers' own torch code. Agreement with llama.cpp on
the same file then shows that our block decoder and our writer agree with llama.cpp.

Example:
    >>> backend = NumpyBackend("smollm2.Q4_0.gguf")
    >>> logits = backend.logits(backend.tokenize(text)[:512])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from .. import kernels
from ..arch import ArchSpec, registered
from ..errors import LlmqError, SourceError, UnsupportedArchitectureError


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _raw(t: gguf.ReaderTensor) -> tuple[np.ndarray, tuple[int, int]]:
    """A tensor's bytes as stored, uint8 (rows, bytes per row), and its (rows, columns) shape."""
    ne = [int(d) for d in t.shape]  # ggml order: ne[0] is the row length
    cols, rows = ne[0], int(np.prod(ne[1:], dtype=np.int64))
    return np.asarray(t.data).view(np.uint8).reshape(rows, -1), (rows, cols)


def _fmt(t: gguf.ReaderTensor, path: Path) -> str:
    fmt = t.tensor_type.name
    if fmt not in kernels.FORMATS:
        raise LlmqError(
            f"{path}: tensor {t.name} is {fmt}, which llmq.kernels cannot decode "
            f"(it decodes {', '.join(kernels.FORMATS)}); use the llama.cpp backend"
        )
    return fmt


def _decode(t: gguf.ReaderTensor, path: Path) -> np.ndarray:
    """A tensor decoded to float32, in ggml's row-major shape (rows, columns) or (columns,)."""
    packed, shape = _raw(t)
    values = kernels.dequantize(packed, _fmt(t, path), shape)
    return values.reshape(-1) if len(t.shape) == 1 else values


class KernelLinear(nn.Module):
    """`y = x @ W.T` with W kept as packed GGUF bytes, multiplied by `llmq.kernels.matmul`.

    Args:
        packed: the tensor's bytes as stored in the GGUF, uint8 (N, bytes per row).
        fmt: GGUF type name ("Q4_0", "F16", ...).
        shape: (N, K) = (output features, input features).
        rows: optional index map applied to the output features (un-permutes rotary rows).
        round_activations: round x as llama.cpp's CPU dot product does for this weight type
            (8-bit blocks for quantized types, f16 for F16; `llmq.kernels.round_activations`).
    """

    def __init__(
        self,
        packed: np.ndarray,
        fmt: str,
        shape: tuple[int, int],
        rows: np.ndarray | None = None,
        *,
        round_activations: bool = False,
    ):
        super().__init__()
        self.packed, self.fmt, self.shape = packed, fmt, shape
        self.rows = rows
        self.round_activations = round_activations
        self.in_features, self.out_features = shape[1], shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().float().contiguous().numpy()
        if self.round_activations:
            xs = kernels.round_activations(xs, self.fmt)
        y = kernels.matmul(xs, self.packed, self.fmt, self.shape)
        if self.rows is not None:
            y = y[..., self.rows]
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def rope_unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Index map from llama.cpp's rotary row order back to Hugging Face's, per output feature.

    `pipeline.to_gguf_layout` interleaves each head's two rotary halves into pairs; row r of the
    HF tensor sits at GGUF row `map[r]`, so `y_gguf[..., map]` is the HF layer's output.
    """
    half = n_rows // n_head // 2
    # GGUF row of (head h, half s, index j) is h*2*half + 2*j + s.
    return np.arange(n_rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(n_rows)


def _arch_for(reader: gguf.GGUFReader, path: Path) -> ArchSpec:
    name = _field(reader, "general.architecture")
    for spec in registered().values():
        if spec.gguf_arch_name == name and spec.model_type == "llama":
            return spec
    raise UnsupportedArchitectureError(
        f"{path}: the numpy backend runs llama-architecture GGUFs; this one is {name!r}"
    )


def config_from_gguf(reader: gguf.GGUFReader, path: Path) -> Any:
    """A transformers `LlamaConfig` from a GGUF's llama.* metadata (mirrors llama.cpp's llm_load_hparams)."""
    from transformers import LlamaConfig

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise SourceError(f"{path}: no token_embd.weight tensor")
    arch = _field(reader, "general.architecture")

    def key(name: str, default: Any = None) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None:
            raise SourceError(f"{path}: metadata key {arch}.{name} is missing")
        return value

    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", n_embd // n_head))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling not in ("none", None):
        raise LlmqError(f"{path}: rope scaling {scaling!r} is not supported by the numpy backend")
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise LlmqError(f"{path}: partial rotary embeddings are not supported by the numpy backend")
    # n_vocab is the token list's length, as llama.cpp's vocab loader counts it.
    token_list = reader.fields.get("tokenizer.ggml.tokens")
    n_embd_rows = _raw(tensors["token_embd.weight"])[1][0]
    n_vocab = len(token_list.data) if token_list is not None else n_embd_rows
    if n_vocab != n_embd_rows:
        raise SourceError(f"{path}: {n_vocab} tokens but token_embd.weight has {n_embd_rows} rows")
    return LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=n_embd,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(key("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(key("context_length")),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensors,
        attn_implementation="sdpa",
    )


def build_model(
    path: str | os.PathLike[str], *, round_activations: bool = True
) -> tuple[nn.Module, gguf.GGUFReader]:
    """A transformers `LlamaForCausalLM` whose linears compute on a GGUF's packed tensors.

    Args:
        path: a llama-architecture GGUF.
        round_activations: round each linear's input as llama.cpp's CPU backend does (see
            `KernelLinear`); False keeps float32 activations (exact arithmetic on the decoded weights).

    Returns:
        (model in eval mode, the memory-mapped reader that owns the packed bytes).

    Raises:
        SourceError: missing file or missing tensors/metadata.
        LlmqError: an architecture, tensor type or rope scheme the backend does not support.
    """
    from transformers import LlamaForCausalLM

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise SourceError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch = _arch_for(reader, path)
    config = config_from_gguf(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    names = arch.tensor_name_map(config.num_hidden_layers)
    with torch.device("meta"):  # structure only: every weight is filled below
        model = LlamaForCausalLM(config)

    used = {"rope_freqs.weight"}
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)) and not hasattr(module, "variance_epsilon"):
            continue
        hf_name = f"{module_name}.weight"
        if module_name == "lm_head" and config.tie_word_embeddings:
            gguf_name = "token_embd.weight"  # llama.cpp falls back to the embedding too
        else:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        t = tensors.get(gguf_name or "")
        if t is None:
            raise SourceError(f"{path}: no GGUF tensor for {hf_name} (expected {gguf_name})")
        used.add(t.name)
        if isinstance(module, nn.Linear):
            packed, shape = _raw(t)
            if shape != (module.out_features, module.in_features):
                raise SourceError(
                    f"{path}: {t.name} has shape {shape}, the config implies {tuple(module.weight.shape)}"
                )
            _set_module(
                model,
                module_name,
                KernelLinear(
                    packed,
                    _fmt(t, path),
                    shape,
                    _rope_rows(arch, config, module_name, shape[0]),
                    round_activations=round_activations,
                ),
            )
        else:
            values = np.array(_decode(t, path), dtype=np.float32)  # a writable copy, off the memory map
            if values.shape != tuple(module.weight.shape):
                raise SourceError(
                    f"{path}: {t.name} has shape {values.shape}, the config implies {tuple(module.weight.shape)}"
                )
            if hasattr(module, "variance_epsilon") and arch.norm_offset:
                values -= arch.norm_offset  # the writer stored 1 + w; transformers adds the 1 itself
            module.weight = nn.Parameter(torch.from_numpy(values), requires_grad=False)

    unused = sorted(set(tensors) - used)
    if unused:
        raise LlmqError(f"{path}: tensors the numpy backend has no place for: {', '.join(unused[:5])}")
    # The rotary tables were built on the meta device: rebuild them for real.
    rotary = type(model.model.rotary_emb)(config=config)
    if "rope_freqs.weight" in tensors:  # Llama 3.1 scaling: divide each frequency, as llama.cpp's rope
        rotary.inv_freq = rotary.inv_freq / torch.from_numpy(_decode(tensors["rope_freqs.weight"], path))
    model.model.rotary_emb = rotary
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise LlmqError(f"{path}: the numpy backend left {name} unfilled")
    return model.eval(), reader


def _rope_rows(arch: ArchSpec, config: Any, module_name: str, n_rows: int) -> np.ndarray | None:
    for suffix, heads_key in arch.rope_permute.items():
        if module_name.endswith(suffix):
            return rope_unpermute_rows(n_rows, int(getattr(config, heads_key)))
    return None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class NumpyBackend:
    """A GGUF through `llmq.kernels` behind the perplexity protocol; tokenized by llama.cpp.

    Args:
        path: a llama-architecture GGUF.
        n_threads: torch intra-op threads (process-wide); None leaves torch's setting.
        round_activations: round linear inputs as llama.cpp's CPU backend does (default), or keep
            them float32 (False).
    """

    name = "numpy"

    def __init__(
        self, path: str | os.PathLike[str], *, n_threads: int | None = None, round_activations: bool = True
    ) -> None:
        from ._llama import open_vocab, vocab_bos

        if n_threads:
            torch.set_num_threads(n_threads)
        self.model, self._reader = build_model(path, round_activations=round_activations)
        self._vocab = open_vocab(path)  # llama.cpp's tokenizer of the same file
        self.add_bos, self.bos_id = vocab_bos(self._vocab)
        self.n_vocab = int(self.model.config.vocab_size)

    def tokenize(self, text: str) -> np.ndarray:
        from ._llama import tokenize

        return tokenize(self._vocab, text).astype(np.int64)

    @torch.inference_mode()
    def logits(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        ids = torch.from_numpy(np.asarray(chunk, dtype=np.int64))[None]
        # lm_head runs only on positions n/2 .. n-1 (logits_to_keep); the last predicts nothing.
        out = self.model(input_ids=ids, use_cache=False, logits_to_keep=n - n // 2)
        return out.logits[0, :-1].float().numpy()

    def close(self) -> None:
        self._vocab.close()
        del self.model, self._reader
