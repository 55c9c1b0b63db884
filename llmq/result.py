"""What a conversion produced: `ConvertResult` (read by the CLI, the model cards and the reports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .calib import Calibration
from .plan import TensorPlan
from .search import LayerReport


@dataclass(frozen=True)
class ConvertResult:
    """What `llmq.convert` wrote.

    Attributes:
        path: the first output (the GGUF file, or a safetensors checkpoint directory).
        plans: every tensor's plan (GGUF names and types).
        seconds: wall time of the whole run.
        source_nbytes: bytes of the source checkpoint's weights.
        outputs: output format -> its path, for every format written by the one search.
        reports: one search report per decoder layer.
        calibration: the calibration used, if any.
        timing: seconds per layer and per phase (calibrate, search, encode, write), one line.
        fallbacks: ``(tensor, why)`` for tensors stored in another type than asked.
    """

    path: Path
    plans: tuple[TensorPlan, ...]
    seconds: float
    source_nbytes: int
    outputs: dict[str, Path] = field(default_factory=dict)
    reports: tuple[LayerReport, ...] = ()
    calibration: Calibration | None = None
    timing: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes of the first output (a directory's files added up)."""
        return output_nbytes(self.path)

    @property
    def n_params(self) -> int:
        return sum(p.n_params for p in self.plans)

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(p.nbytes for p in self.plans) / self.n_params

    @property
    def report_path(self) -> Path | None:
        """The search report written with the first output, if any."""
        path = report_path(self.path)
        return path if path.is_file() else None

    @property
    def card_path(self) -> Path | None:
        """The model card of the first output, if written."""
        path = card_path(self.path)
        return path if path.is_file() else None

    @property
    def fallbacks(self) -> list[tuple[str, str]]:
        return [(p.name, p.note) for p in self.plans if "->" in p.note]

    def summary(self) -> str:
        """One paragraph for the terminal: each output, its size, bits per weight, time, fallbacks."""
        lines = [
            f"wrote {path} ({output_nbytes(path) / 2**20:.1f} MiB, {fmt})"
            for fmt, path in self.outputs.items()
        ] or [f"wrote {self.path} ({self.nbytes / 2**20:.1f} MiB)"]
        text = (
            "\n".join(lines) + f"\n{self.bits_per_weight:.2f} bits/weight (GGUF plan) in {self.seconds:.1f} s"
        )
        if self.calibration is not None:
            text += f"; AWQ calibrated on {self.calibration.description}"
        if self.timing:
            text += f"\n{self.timing}"
        fb = self.fallbacks
        if fb:
            text += f"\n{len(fb)} tensors stored in another type than asked (rows do not split into its blocks), e.g. {fb[0][0]}: {fb[0][1]}"
        return text


def card_path(out: Path) -> Path:
    """``OUT.md`` beside a file, ``README.md`` inside a checkpoint directory."""
    return out / "README.md" if out.is_dir() else out.with_suffix(".md")


def report_path(out: Path) -> Path:
    """``OUT.search.json`` beside a file, ``search.json`` inside a checkpoint directory."""
    return out / "search.json" if out.is_dir() else out.with_suffix(".search.json")


def output_nbytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
