"""Find and open a Hugging Face checkpoint: local directory or hub id, single or sharded safetensors.

Tensors are read one at a time through `safetensors.safe_open` (memory-mapped), so nothing but the
tensors asked for is ever resident. Pickle `.bin` checkpoints are refused unless the caller opts in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import SourceError

# What a conversion needs from a hub repository: weights in safetensors, configs, tokenizer files.
HUB_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "tokenizer.model",
    "*.jinja",
    "*.txt",
    "README.md",
)
PICKLE_PATTERNS = ("*.bin", "*.bin.index.json")


def resolve_source(src: str | os.PathLike[str], *, allow_pickle: bool = False) -> Path:
    """Return a local directory for ``src``: the directory itself, or a hub snapshot.

    Hub ids are resolved with `huggingface_hub.snapshot_download`, which honours ``HF_HOME`` and
    ``HF_HUB_OFFLINE``; only safetensors, config and tokenizer files are fetched.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{path}: expected a model directory (config.json + *.safetensors), got a file")
    text = str(src)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise SourceError(f"{text}: no such directory, and not a Hugging Face hub id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = list(HUB_PATTERNS) + (list(PICKLE_PATTERNS) if allow_pickle else [])
    try:
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network, auth, offline cache miss: all one message for the user
        raise SourceError(
            f"{text}: no such local directory; tried then as a Hugging Face hub id, which could not be "
            f"fetched ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e


class Checkpoint:
    """A checkpoint's config and a name -> tensor reader over its weight files.

    Args:
        path: a model directory (see `resolve_source`).
        allow_pickle: accept ``pytorch_model*.bin`` (loaded with ``torch.load(weights_only=True)``).

    Example:
        >>> ckpt = Checkpoint(resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct"))
        >>> w = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.config = self._load_config()
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handles: dict[str, Any] = {}
        self.weight_map = self._weight_map(allow_pickle)
        if self._pickled is None:  # open every shard now: a truncated one fails before any work
            for file in sorted(set(self.weight_map.values())):
                self._open(file)
            self.release()

    # -- discovery -----------------------------------------------------------------------------
    def _load_config(self) -> Any:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise SourceError(f"{cfg}: missing; a Hugging Face model directory needs config.json")
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path)
        except Exception as e:
            raise SourceError(f"{cfg}: cannot be read as a transformers config ({e})") from e

    def _weight_map(self, allow_pickle: bool) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise SourceError(f"{index}: not a safetensors index ({e})") from e
            for file in sorted(set(weight_map.values())):
                if not (self.path / file).is_file():
                    raise SourceError(f"{self.path / file}: shard listed in {index.name} is missing")
            return dict(weight_map)
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if files:
            return {name: f for f in files for name in self._open(f).keys()}
        bins = sorted(p.name for p in self.path.glob("pytorch_model*.bin"))
        if bins and not allow_pickle:
            raise SourceError(
                f"{self.path}: only pickle checkpoints ({', '.join(bins)}); they can run code when loaded. "
                "Convert them to safetensors, or set allow_pickle=True if you trust the source"
            )
        if bins:
            self._pickled = {}
            for b in bins:
                self._pickled.update(
                    torch.load(self.path / b, map_location="cpu", weights_only=True, mmap=True)
                )
            return {name: "<pickle>" for name in self._pickled}
        raise SourceError(f"{self.path}: no *.safetensors weights found")

    def _open(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(self.path / file, framework="pt")
            except Exception as e:  # safetensors reports truncation as a header error
                raise SourceError(f"{self.path / file}: unreadable safetensors file ({e})") from e
            self._handles[file] = handle
        return handle

    def release(self) -> None:
        """Unmap the shards: pages read through the memory map count as resident until then."""
        self._handles.clear()

    # -- access --------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> Iterator[str]:
        return iter(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[name].shape)
        return tuple(self._handle_for(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in the checkpoint's dtype)."""
        if self._pickled is not None:
            return self._pickled[name].clone()
        try:
            return self._handle_for(name).get_tensor(name)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{self.path / self.weight_map[name]}: cannot read tensor {name} ({e})") from e

    def _handle_for(self, name: str) -> Any:
        file = self.weight_map.get(name)
        if file is None:
            raise SourceError(f"{self.path}: tensor {name} is not in the checkpoint")
        return self._open(file)

    def nbytes(self) -> int:
        """Bytes of all weights as stored."""
        total = 0
        for name in self.weight_map:
            shape = self.shape(name)
            n = 1
            for s in shape:
                n *= s
            total += n * self._itemsize(name)
        return total

    def _itemsize(self, name: str) -> int:
        if self._pickled is not None:
            return self._pickled[name].element_size()
        dtype = self._handle_for(name).get_slice(name).get_dtype()
        return {"F64": 8, "F32": 4, "I64": 8, "I32": 4}.get(
            dtype, 2 if dtype in ("F16", "BF16", "I16") else 1
        )
