"""`llmq inspect`: what a GGUF file holds — metadata summary, per-tensor type/shape/bytes, bits per weight."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

from .errors import SourceError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    shape: tuple[int, ...]  # numpy order (rows, row length)
    nbytes: int

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class GGUFInfo:
    """Summary of a GGUF file (see `inspect_gguf`)."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]

    @property
    def n_params(self) -> int:
        return sum(t.n_params for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(t.nbytes for t in self.tensors) / max(1, self.n_params)

    def by_type(self) -> dict[str, tuple[int, int, int]]:
        """type -> (tensors, parameters, bytes)"""
        return summarize_types((t.type, t.n_params, t.nbytes) for t in self.tensors)


def summarize_types(tensors: Iterable[tuple[str, int, int]]) -> dict[str, tuple[int, int, int]]:
    """(type, parameters, bytes) per tensor -> type -> (tensors, parameters, bytes), sorted by type."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for typ, n_params, nbytes in tensors:
        row = acc[typ]
        row[0] += 1
        row[1] += n_params
        row[2] += nbytes
    return {k: (v[0], v[1], v[2]) for k, v in sorted(acc.items())}


def _value(field: Any) -> Any:
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return f"[{len(field.data)} items]" if len(field.data) > 8 else field.contents()
    return field.contents()


def inspect_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read a GGUF file's metadata and tensor table (no tensor data is loaded).

    Example:
        >>> info = inspect_gguf("SmolLM2-135M-Instruct-Q4_0.gguf")
        >>> info.bits_per_weight
    """
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise SourceError(f"{path}: not a readable GGUF file ({e})") from e
    metadata = {k: _value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = tuple(
        TensorInfo(t.name, t.tensor_type.name, tuple(int(s) for s in reversed(t.shape)), int(t.n_bytes))
        for t in reader.tensors
    )
    return GGUFInfo(path, metadata, tensors)


def format_info(info: GGUFInfo, *, tensors: bool = True) -> str:
    lines = [f"{info.path}  ({info.path.stat().st_size / 2**20:.1f} MiB)", "", "metadata:"]
    for k, v in info.metadata.items():
        text = repr(v) if not isinstance(v, str) else v
        if k == "general.file_type" and isinstance(v, int):  # llama.cpp's enum, by name
            text = f"{v} ({_file_type_name(v)})"
        text = text.replace("\n", "\\n")
        lines.append(f"  {k:45s} {text[:100]}{'…' if len(text) > 100 else ''}")
    lines += ["", f"{'type':6s} {'tensors':>8s} {'parameters':>14s} {'MiB':>9s} {'bits/weight':>11s}"]
    for t, (n, params, nbytes) in info.by_type().items():
        lines.append(f"{t:6s} {n:8d} {params:14,d} {nbytes / 2**20:9.2f} {8 * nbytes / params:11.2f}")
    lines.append(
        f"{'total':6s} {len(info.tensors):8d} {info.n_params:14,d} "
        f"{sum(t.nbytes for t in info.tensors) / 2**20:9.2f} {info.bits_per_weight:11.2f}"
    )
    if tensors:
        lines += ["", f"{'tensor':40s} {'type':6s} {'shape':>16s} {'bytes':>12s}"]
        for t in info.tensors:
            lines.append(f"{t.name:40s} {t.type:6s} {'x'.join(map(str, t.shape)):>16s} {t.nbytes:12,d}")
    return "\n".join(lines)


def _file_type_name(value: int) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return "unknown"
