"""Settings every output sink shares, and the `ConvertResult` a sink's card describes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..result import ConvertResult

if TYPE_CHECKING:
    from ..engine import Job
    from ..search import LayerReport


@dataclass(frozen=True)
class OutputOptions:
    """How outputs are written.

    Attributes:
        overwrite: replace an existing output.
        write_card: write the model card (``OUT.md``; ``README.md`` in a checkpoint directory).
        write_report: write the search report (``OUT.search.json``; ``search.json`` in a directory).
        command: the command line, for the card.
        max_shard_bytes: largest safetensors shard of a checkpoint directory.
    """

    overwrite: bool = False
    write_card: bool = True
    write_report: bool = True
    command: str | None = None
    max_shard_bytes: int = 5 * 10**9


def result_of(job: Job, reports: list[LayerReport], path: Path) -> ConvertResult:
    return ConvertResult(
        path, tuple(job.plans), job.seconds, job.ckpt.nbytes(), {}, tuple(reports), job.calibration
    )
