"""The sink interface and the output-format registry: one small registered class per output format.

An output sink is built from the output path and `OutputOptions`; `check` runs before any work
(refusing settings the format cannot hold), `commit` writes it atomically."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ..activations import InputStats
    from ..engine import Encoded, Job
    from ..search import LayerReport

FORMATS: dict[str, type[SinkBase]] = {}


class SinkBase:
    """A place the engine's tensors go (`llmq.engine.Sink`); output formats register by ``name``.

    Subclasses override what they use: `begin` (before the first tensor), `write` (every planned
    tensor, in plan order), `layer_stats` (each decoder layer's calibration statistics, before its
    search), `commit` (everything written: make the output appear) and `abort` (leave nothing).
    """

    # the output format's name (``--format``): registered in FORMATS; "" for the other sinks
    format: ClassVar[str] = ""
    wants_tensors: ClassVar[bool] = True
    needs_statistics: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.format:
            assert cls.format not in FORMATS, cls.format
            FORMATS[cls.format] = cls

    def check(self, job: Job) -> None:
        """Refuse, before any work, settings the output cannot hold or an output that exists."""

    def grid_dtype(self, job: Job) -> str | None:
        """The scale dtype of the integer-zero-point grid group-wise values must sit on
        (`llmq.codecs.IntegerGrid`), or None when the output holds any group-wise values."""
        return None

    def begin(self, job: Job) -> None:
        pass

    def layer_stats(self, job: Job, index: int, stats: dict[str, InputStats]) -> None:
        pass

    def write(self, job: Job, item: Encoded) -> None:
        pass

    def commit(self, job: Job, reports: list[LayerReport]) -> Path | None:
        return None

    def abort(self) -> None:
        pass
