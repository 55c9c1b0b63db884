"""Stream tensors into sharded safetensors files: each shard's header first, data as it is produced.

`safetensors.save_file` needs every tensor of a file in memory at once; here the shapes and dtypes
of every output tensor are known from the plan before any weight is read, so each shard's header
(the format's 8-byte length, JSON, data offsets) is written first and tensors are appended in
order, one at a time. The index ``model.safetensors.index.json`` maps names to shards, as
transformers writes it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

DTYPES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a safetensors file: name, safetensors dtype (``BF16``, ``I32`` …) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype]


class ShardedSafetensorsWriter:
    """Write ``specs`` into ``directory`` as shards of at most ``max_shard_bytes`` (a tensor never splits).

    Example:
        >>> w = ShardedSafetensorsWriter(tmp_dir, specs, max_shard_bytes=5 * 10**9)
        >>> for spec in specs:
        ...     w.write(spec.name, array_bytes)   # in the order of specs
        >>> w.close()                              # index written when there are several shards
    """

    def __init__(self, directory: Path, specs: Sequence[TensorSpec], *, max_shard_bytes: int) -> None:
        self.directory = Path(directory)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        n = len(shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.shards = shards
        self.order = [(i, s) for i, shard in enumerate(shards) for s in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def _open(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[i]:
            header[spec.name] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file = open(self.directory / self.files[i], "wb")  # noqa: SIM115  (closed by the next shard or close())
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i

    def write(self, name: str, data: np.ndarray) -> None:
        """Append tensor ``name`` (its bytes, little-endian, C order); tensors come in spec order."""
        shard, spec = self.order[self._next]
        if spec.name != name:
            raise AssertionError(f"tensor {name} written out of order (expected {spec.name})")
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.size != spec.nbytes:
            raise AssertionError(
                f"{name}: {raw.size} bytes, expected {spec.nbytes} for {spec.dtype} {spec.shape}"
            )
        if shard != self._shard:
            self._open(shard)
        assert self._file is not None
        self._file.write(memoryview(raw))  # no copy: an embedding is hundreds of MB
        self._next += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index (several shards); return the files written."""
        if self._next != len(self.order):
            raise AssertionError(f"{len(self.order) - self._next} tensors were never written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.files) > 1:
            total = sum(s.nbytes for _, s in self.order)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {s.name: self.files[i] for i, s in self.order},
            }
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
