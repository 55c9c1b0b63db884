"""A run's work directory: finished layers kept beside the output, so a killed run continues.

``OUT.llmq-work/`` holds ``manifest.json`` (what the run depends on: checkpoint files, settings,
calibration tokens), one ``layer-NNNNN.safetensors`` per finished decoder layer (each linear's
encoded blocks, the other tensors' values after the search, the layer's search report) and
``acts-NNNNN.bin``, the calibration activations entering layer N (kept every `ACTS_INTERVAL`
seconds, the latest only). Each file is written (layers in the background, while the next layer
computes) to a temporary name and renamed, every layer file before the activations that follow it,
so after a kill at any point the directory describes a consistent prefix of the run;
``--resume`` replays the layers before the kept activations into fresh outputs and computes the
rest, giving the bytes of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .background import Background
from .errors import LlmqError, OutputExistsError
from .search import LayerReport

if TYPE_CHECKING:
    from .activations import ActivationStore
    from .awq import AWQConfig
    from .calib import Calibration
    from .config import QuantConfig
    from .encoding import EncoderConfig
    from .imatrix_io import ImatrixFile

log = logging.getLogger(__name__)

SUFFIX = ".llmq-work"
# Seconds between copies of the calibration activations (a mini-batch file per window set, ~1 GB
# for an 8B model's 128 x 512 windows): a killed run redoes at most this much plus one layer, and
# short layers (SmolLM2's ~4 s) do not each pay for a copy.
ACTS_INTERVAL = 60.0
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "config.json")


def work_path(out: Path) -> Path:
    """The work directory of a run whose first output is ``out``."""
    return out.with_name(out.name + SUFFIX)


def run_key(
    model_dir: Path,
    cfg: QuantConfig,
    search: str,
    awq: AWQConfig,
    encoder: EncoderConfig,
    imatrix: ImatrixFile | None,
    calibration: Calibration | None,
) -> dict[str, Any]:
    """What a run's results depend on: a work directory is reused only when all of it is equal."""
    from . import __version__

    files = {}
    for pattern in WEIGHT_GLOBS:
        for f in sorted(model_dir.glob(pattern)):
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    key: dict[str, Any] = {
        "llmq": __version__,
        "source": files,
        "quant": repr(cfg),
        "search": search,
        "awq": repr(awq),
        "encoder": repr(encoder),
        "imatrix": None,
        "calibration": None,
    }
    if imatrix is not None:
        h = hashlib.sha256()
        for name in sorted(imatrix.entries):
            h.update(name.encode() + np.ascontiguousarray(imatrix.entries[name], np.float32).tobytes())
        key["imatrix"] = h.hexdigest()
    if calibration is not None:
        tokens = calibration.tokens.to(torch.int64).contiguous().numpy()
        key["calibration"] = {
            "tokens": hashlib.sha256(tokens.tobytes()).hexdigest(),
            "shape": list(tokens.shape),
            "batch_size": calibration.config.batch_size,
            "forward_dtype": calibration.config.forward_dtype,
        }
    return key


def check_work_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a previous run's work directory at ``path`` unless it is resumed or discarded.

    Raises:
        OutputExistsError: it exists and neither ``resume`` nor ``overwrite`` is set.
    """
    if path.exists() and not resume and not overwrite:
        raise OutputExistsError(
            f"{path}: a previous run's work directory; continue it (resume=True) or discard it (overwrite=True)"
        )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class WorkDir:
    """The work directory of one run (see the module docstring).

    Example:
        >>> work = WorkDir.open(work_path(out), key, resume=True, overwrite=False)
        >>> start = work.resume_point(needs_activations=True)   # layers [0, start) are done
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._acts_time = time.monotonic()
        self._io = Background("work-write", max_pending=2)  # layers kept while the next one computes

    @classmethod
    def open(cls, path: Path, key: dict[str, Any], *, resume: bool, overwrite: bool) -> WorkDir:
        """Continue ``path`` (``resume``, same key) or start it empty.

        Raises:
            LlmqError: resuming a directory made by a run with other inputs or settings.
            OutputExistsError: a previous run's directory exists and neither resume nor overwrite is set.
        """
        manifest = path / "manifest.json"
        if path.exists():
            if resume and manifest.is_file():
                old = json.loads(manifest.read_text())
                if old.get("key") == key:
                    return cls(path)
                differ = sorted(
                    k for k in {*key, *old.get("key", {})} if old.get("key", {}).get(k) != key.get(k)
                )
                raise LlmqError(
                    f"{path}: made by a run with other {', '.join(differ)}; it cannot be resumed with these "
                    "inputs (delete it to start over)"
                )
            check_work_dir(path, resume=resume, overwrite=overwrite)
            shutil.rmtree(path)
        path.mkdir(parents=True)
        _write_atomic(manifest, json.dumps({"key": key}, indent=1) + "\n")
        return cls(path)

    def layer_file(self, index: int) -> Path:
        return self.path / f"layer-{index:05d}.safetensors"

    def acts_file(self, index: int) -> Path:
        return self.path / f"acts-{index:05d}.bin"

    def resume_point(self, *, needs_activations: bool) -> int:
        """How many leading layers are done (with, if the run needs them, their next inputs kept)."""
        self._io.settle()  # layers being kept finish first (a failed one is simply not kept)
        done = 0
        while self.layer_file(done).is_file():
            done += 1
        if needs_activations:
            while done > 0 and not self.acts_file(done).is_file():
                done -= 1
        return done

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], report: LayerReport) -> None:
        """Keep a finished layer's tensors (by name) and its search report, in the background: the
        tensors must not change afterwards; an error is raised by a later call."""
        meta = {"report": json.dumps({"method": report.method, "details": report.details})}
        final = self.layer_file(index)
        tmp = final.with_name(f".{final.name}.partial")
        contiguous = {k: v.contiguous() for k, v in tensors.items()}

        def save() -> None:
            save_file(contiguous, str(tmp), metadata=meta)
            os.replace(tmp, final)

        self._io.submit(save)

    def activations_due(self) -> bool:
        """Whether `ACTS_INTERVAL` has passed since the activations were last kept (or the run began)."""
        return time.monotonic() - self._acts_time >= ACTS_INTERVAL

    def save_activations(self, index: int, store: ActivationStore) -> None:
        """Keep the activations entering layer ``index``; drop those kept before."""
        self._io.drain()  # the layers before them first
        final = self.acts_file(index)
        tmp = final.with_name(f".{final.name}.partial")
        store.save(tmp)
        os.replace(tmp, final)
        for old in self.path.glob("acts-*.bin"):
            if old != final:
                old.unlink(missing_ok=True)
        self._acts_time = time.monotonic()

    def load_layer(self, index: int) -> tuple[dict[str, torch.Tensor], LayerReport]:
        """A finished layer's tensors (as `save_layer` got them) and report."""
        with safe_open(self.layer_file(index), framework="pt") as f:
            report = json.loads(f.metadata()["report"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
        return tensors, LayerReport(index, report["method"], report["details"])

    def close(self) -> None:
        """Finish the writes in flight (ignoring errors) and stop the writer thread; the files stay."""
        self._io.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["SUFFIX", "WorkDir", "check_work_dir", "run_key", "work_path"]
