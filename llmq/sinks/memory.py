"""In-memory sinks: every tensor's GGUF bytes (`llmq.quantize`), and importance-matrix accumulation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .base import SinkBase
from .gguf import gguf_bytes

if TYPE_CHECKING:
    from ..activations import InputStats
    from ..engine import Encoded, Job


class MemorySink(SinkBase):
    """Collects each tensor's bytes as the GGUF file would store them, by GGUF name."""

    def __init__(self) -> None:
        self.data: dict[str, np.ndarray] = {}

    def write(self, job: Job, item: Encoded) -> None:
        self.data[item.plan.name] = gguf_bytes(job, item)


class ImatrixSink(SinkBase):
    """llama.cpp's importance matrix: mean x^2 per input column of every linear, by GGUF name.

    Recorded from each layer's calibration statistics before its search (the FP model's
    activations when the run's inputs are ``fp``).
    """

    wants_tensors = False
    needs_statistics = True

    def __init__(self) -> None:
        self.entries: dict[str, np.ndarray] = {}

    def layer_stats(self, job: Job, index: int, stats: dict[str, InputStats]) -> None:
        for p in job.plans:
            if p.layer == index and p.role == "linear":
                reader = job.arch.reader_of(job.module_name(p))
                if reader in stats:
                    self.entries[p.name] = stats[reader].mean_sq
