"""Sinks: where the engine's tensors go. Output formats register by name in `FORMATS`.

Example:
    >>> from llmq.sinks import FORMATS
    >>> sorted(FORMATS)            # the --format choices
    ['awq', 'compressed-tensors', 'gguf']
"""

from __future__ import annotations

from .base import FORMATS, SinkBase
from .checkpoint import AutoAWQSink, CompressedTensorsSink, GroupValues, pack_int32
from .gguf import GGUFSink, gguf_bytes, to_gguf_layout
from .memory import ImatrixSink, MemorySink
from .options import OutputOptions

__all__ = [
    "FORMATS", "AutoAWQSink", "CompressedTensorsSink", "GGUFSink", "GroupValues", "ImatrixSink", "MemorySink",
    "OutputOptions", "SinkBase", "gguf_bytes", "pack_int32", "to_gguf_layout",
]  # fmt: skip
