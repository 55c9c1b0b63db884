"""Stream tensors into a GGUF file through `gguf.GGUFWriter`: header first, then data as produced.

The file is written under a temporary name beside the target and renamed into place only once
complete, so an interrupted conversion never leaves a file that looks whole.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import TracebackType

import gguf
import numpy as np

from ..background import Background
from ..codecs import REGISTRY
from ..errors import OutputExistsError
from ..plan import TensorPlan

STRING = int(gguf.GGUFValueType.STRING)


def check_output(path: Path, *, overwrite: bool) -> None:
    """Fail before any work when the output exists (or its directory does not)."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output already exists (overwrite=True replaces it)")
    if not path.parent.is_dir():
        raise OutputExistsError(f"{path.parent}: output directory does not exist")


class GGUFStreamWriter:
    """Write a GGUF file tensor by tensor, in the order of a plan.

    Args:
        path: final output path.
        arch: GGUF architecture name (``"llama"``).
        overwrite: replace an existing file at ``path``.

    Example:
        >>> with GGUFStreamWriter(out, "llama") as w:
        ...     w.gguf.add_block_count(2)            # metadata through gguf-py's writer
        ...     w.begin(plans)                       # header, metadata and tensor infos
        ...     for plan in plans:
        ...         w.write(plan, encoded_bytes)     # data, in plan order
        ...     w.commit()                           # renamed into place
        >>> # on an exception (or without commit) the temporary file is removed
    """

    def __init__(self, path: str | os.PathLike[str], arch: str, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        check_output(self.path, overwrite=overwrite)
        self.overwrite = overwrite
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.gguf = gguf.GGUFWriter(self.tmp, arch)
        self._pending: list[TensorPlan] = []
        self._reserved: set[str] = set()
        self._patches: dict[str, str] = {}
        self._began = False
        self._done = False
        self._io = Background("gguf-write")  # data written while the next tensors encode

    def begin(self, plans: list[TensorPlan]) -> None:
        """Declare every tensor, then write header, key/values and tensor infos."""
        for p in plans:
            codec = REGISTRY[p.codec]
            # element shape with a non-uint8 dtype: gguf-py then records the shape as given
            self.gguf.add_tensor_info(
                p.name, p.shape, np.dtype(np.float32), codec.nbytes(p.shape), codec.qtype
            )
        self.gguf.write_header_to_file()
        self.gguf.write_kv_data_to_file()
        self.gguf.write_ti_data_to_file()
        self._header_end = self.gguf.fout[0].tell()  # type: ignore[index]  # where tensor data starts
        self._pending = list(plans)
        self._began = True

    def write(self, plan: TensorPlan, data: np.ndarray) -> None:
        """Append one tensor's bytes; tensors must come in plan order."""
        assert self._began and self._pending, "write() before begin() or past the last tensor"
        expected = self._pending.pop(0)
        assert expected.name == plan.name, (
            f"tensor {plan.name} written out of order (expected {expected.name})"
        )
        data = np.ascontiguousarray(data).view(np.uint8)
        assert data.nbytes == plan.nbytes, (plan.name, data.nbytes, plan.nbytes)
        self._io.submit(self.gguf.write_tensor_data, data)  # ``data`` is not changed after this

    def reserve(self, key: str) -> None:
        """Mark a string key (already added with a placeholder) to be set later with `patch`."""
        assert not self._began, "reserve() after begin()"
        self._reserved.add(key)

    def patch(self, values: dict[str, str]) -> None:
        """Set reserved string keys, each to a value of its placeholder's length, in place at `commit`."""
        unknown = set(values) - self._reserved
        assert not unknown, f"patching keys never reserved: {sorted(unknown)}"
        self._patches.update(values)

    def _apply_patches(self) -> None:
        # same-size values in place: each found by its key/value entry as GGUF lays it out (key
        # length, key, type STRING, value length) in the header, read once (no parse of the file)
        with open(self.tmp, "r+b") as f:
            head = f.read(self._header_end)
            for key, value in self._patches.items():
                raw = value.encode("utf-8")
                name = key.encode("utf-8")
                entry = struct.pack("<Q", len(name)) + name + struct.pack("<IQ", STRING, len(raw))
                at = head.find(entry)
                assert at >= 0, f"{key}: no placeholder of {len(raw)} bytes in the header"
                f.seek(at + len(entry))
                f.write(raw)

    def commit(self) -> Path:
        """Close the file and move it into place."""
        assert self._began and not self._pending, f"{len(self._pending)} tensors were never written"
        self._io.drain()
        self._io.close()
        self.gguf.close()
        if self._patches:
            self._apply_patches()
        if self.path.exists() and not self.overwrite:
            raise OutputExistsError(f"{self.path}: appeared while converting; result left at {self.tmp}")
        os.replace(self.tmp, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file (nothing to do once committed or aborted)."""
        if self._done:
            return
        self._io.close()
        self.gguf.close()
        self.tmp.unlink(missing_ok=True)
        self._done = True

    def __enter__(self) -> GGUFStreamWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:  # an exception, or a caller that never committed: leave nothing behind
            self.abort()
