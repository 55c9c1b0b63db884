"""llama.cpp's importance-matrix files: the GGUF format of ``llama-imatrix`` and its legacy ``.dat``.

GGUF: ``<name>.in_sum2`` (summed x^2 per input column) and ``<name>.counts`` (tokens), both F32,
with ``general.type = imatrix`` and ``imatrix.datasets / chunk_count / chunk_size``. Legacy ``.dat``:
per entry the name, ``ncall`` and the values (mean x^2 times ``ncall``), then an optional trailer
with the chunk count and dataset name. `read_imatrix` returns what llama-quantize's `load_imatrix`
computes from either: ``in_sum2 / counts``, or the legacy values over ``ncall``.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np

from .errors import LlmqError, SourceError

if TYPE_CHECKING:
    from .config import QuantConfig
    from .plan import TensorPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImatrixFile:
    """An importance matrix read from disk: ``entries`` (GGUF tensor name -> mean x^2) and provenance."""

    path: Path
    entries: dict[str, np.ndarray]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    legacy: bool = False
    counts: dict[str, float] = field(default_factory=dict, repr=False)


def write_imatrix(
    path: str | os.PathLike[str],
    imatrix: Mapping[str, np.ndarray],
    *,
    n_tokens: int,
    datasets: Sequence[str] = (),
    chunk_count: int = 0,
    chunk_size: int = 0,
    legacy: bool = False,
) -> Path:
    """Write an importance matrix in llama.cpp's GGUF format (or its legacy ``.dat`` with ``legacy``).

    Args:
        path: output file; written under a temporary name and renamed when complete.
        imatrix: GGUF tensor name -> mean x^2 per input column (`compute_imatrix`'s result).
        n_tokens: calibration tokens behind each mean (stored as the counts; llama.cpp divides by it).
        datasets: calibration sources, recorded as ``imatrix.datasets`` (``unspecified`` if none).
        chunk_count: calibration windows (``imatrix.chunk_count``).
        chunk_size: tokens per window (``imatrix.chunk_size``).
        legacy: write the ``.dat`` format (``ncall`` = ``chunk_count``).

    Returns:
        The path written.

    Example:
        >>> write_imatrix("smol.imatrix.gguf", compute_imatrix("SmolLM2-135M-Instruct"), n_tokens=65536)
    """
    path = Path(path)
    if n_tokens <= 0:
        raise LlmqError(f"write_imatrix: n_tokens must be positive, got {n_tokens}")
    names = sorted(imatrix)  # llama-imatrix's deterministic order
    values = {}
    for name in names:
        v = np.ascontiguousarray(imatrix[name], dtype=np.float32).reshape(-1)
        if v.size == 0 or not np.isfinite(v).all() or (v < 0).any():
            raise LlmqError(f"write_imatrix: entry {name!r} is empty, negative or not finite")
        values[name] = v
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if legacy:
            ncall = max(chunk_count, 1)
            with open(tmp, "wb") as f:
                f.write(struct.pack("<i", len(names)))
                for name in names:
                    raw = name.encode("utf-8")
                    f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values[name].size))
                    f.write((values[name] * np.float32(ncall)).astype("<f4").tobytes())
                dataset = (datasets[-1] if datasets else "").encode("utf-8")
                f.write(struct.pack("<ii", chunk_count, len(dataset)) + dataset)
        else:
            w = gguf.GGUFWriter(tmp, "imatrix")
            # llama-imatrix's files carry no architecture; GGUFWriter always adds one
            w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
            w.add_type("imatrix")
            # llama-quantize needs the key; gguf-py cannot write an empty array
            w.add_array("imatrix.datasets", [str(d) for d in datasets] or ["unspecified"])
            w.add_uint32("imatrix.chunk_count", int(chunk_count))
            w.add_uint32("imatrix.chunk_size", int(chunk_size))
            count = np.array([[float(n_tokens)]], np.float32)  # ne {1, n_mat}
            for name in names:
                w.add_tensor(f"{name}.in_sum2", (values[name] * np.float32(n_tokens))[None, :])
                w.add_tensor(f"{name}.counts", count)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_imatrix(path: str | os.PathLike[str]) -> ImatrixFile:
    """Read llama.cpp's GGUF or legacy ``.dat`` importance matrix (the format is detected).

    Raises:
        SourceError: the file is missing, truncated or malformed (the message names it and the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"imatrix file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> ImatrixFile:
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on damaged files
        raise SourceError(f"{path}: not a readable GGUF imatrix ({e})") from e
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise SourceError(f"{path}: {t.name} must be F32, is {t.tensor_type.name}")
                into[t.name.removesuffix(suffix)] = np.array(t.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise SourceError(f"{path}: no <name>.in_sum2 tensors: not an imatrix GGUF")
    entries: dict[str, np.ndarray] = {}
    token_counts: dict[str, float] = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None or c.size == 0 or s.size % c.size:
            raise SourceError(
                f"{path}: {name}: in_sum2 of {s.size} values and counts of {0 if c is None else c.size} do not match"
            )
        per = s.size // c.size
        out = np.ones_like(s)  # llama-quantize: an expert never seen gets 1
        for j, n in enumerate(c):
            if n > 0:
                out[j * per : (j + 1) * per] = s[j * per : (j + 1) * per] / np.float32(n)
        entries[name] = out
        token_counts[name] = float(c.max())
    field_ = r.get_field("imatrix.datasets")
    datasets = tuple(field_.contents()) if field_ is not None else ()
    cc = r.get_field("imatrix.chunk_count")
    return ImatrixFile(
        path,
        entries,
        datasets=datasets,
        chunk_count=int(cc.contents()) if cc is not None else 0,
        counts=token_counts,
    )


def _read_dat(path: Path) -> ImatrixFile:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise SourceError(f"{path}: truncated legacy imatrix while reading {what} (offset {pos})")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1 or n_entries > 1_000_000:
        raise SourceError(f"{path}: not an imatrix (GGUF or legacy .dat): entry count {n_entries}")
    entries: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        (length,) = take("<i", f"the name length of entry {i + 1}")
        if length < 1 or pos + length > len(data):
            raise SourceError(f"{path}: bad name length {length} for entry {i + 1}")
        name = data[pos : pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = take("<ii", f"the sizes of {name}")
        if nval < 1:
            raise SourceError(f"{path}: {name}: {nval} values")
        if pos + 4 * nval > len(data):
            raise SourceError(f"{path}: truncated legacy imatrix in the values of {name}")
        v = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        entries[name] = (v / np.float32(ncall)).astype(np.float32) if ncall > 0 else v.copy()
    chunk_count, datasets = 0, ()
    if pos + 4 <= len(data):  # the optional trailer
        (chunk_count,) = take("<i", "the chunk count")
        if pos + 4 <= len(data):
            (length,) = take("<i", "the dataset name length")
            if 0 < length <= len(data) - pos:
                datasets = (data[pos : pos + length].decode("utf-8", errors="replace"),)
    return ImatrixFile(path, entries, datasets=datasets, chunk_count=chunk_count, legacy=True)


def add_imatrix_metadata(w: gguf.GGUFWriter, imat: ImatrixFile) -> None:
    """The ``quantize.imatrix.*`` keys llama-quantize writes when it used an importance matrix."""
    w.add_string("quantize.imatrix.file", str(imat.path))
    if imat.datasets:
        w.add_string("quantize.imatrix.dataset", imat.datasets[-1])
    w.add_uint32("quantize.imatrix.entries_count", len(imat.entries))  # UINT32, as llama-quantize
    w.add_uint32("quantize.imatrix.chunks_count", int(imat.chunk_count))


def check_imatrix(
    imatrix: str | os.PathLike[str] | ImatrixFile, plans: list[TensorPlan], cfg: QuantConfig
) -> ImatrixFile:
    """Read and check an importance matrix against the plan: one value per input column."""
    if cfg.method != "rtn":
        raise LlmqError(
            "an importance matrix weighs round-to-nearest encoding (method=rtn); method=awq measures its own "
            "importance from the calibration activations, adjusted for its scales"
        )
    imat = imatrix if isinstance(imatrix, ImatrixFile) else read_imatrix(imatrix)
    used = 0
    for p in plans:
        v = imat.entries.get(p.name)
        if v is None or len(p.shape) != 2:
            continue
        if v.shape != (p.shape[-1],):
            raise LlmqError(
                f"{imat.path}: imatrix entry {p.name} has {v.size} values; the tensor has "
                f"{p.shape[-1]} input columns (an imatrix of another model?)"
            )
        used += 1
    if used == 0:
        raise LlmqError(f"{imat.path}: none of its {len(imat.entries)} entries names a tensor of this model")
    missing = [p.name for p in plans if p.role == "linear" and p.name not in imat.entries]
    if missing:
        log.warning(
            "imatrix %s has no entry for %d linears (e.g. %s): round to nearest",
            imat.path,
            len(missing),
            missing[0],
        )
    return imat
