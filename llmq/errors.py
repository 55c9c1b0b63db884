"""Errors raised for user mistakes and bad inputs.

Every error names what is at fault (file, tensor, shape or option) so the CLI can print it on one line.
"""

from __future__ import annotations


class LlmqError(ValueError):
    """Base class of every error llmq raises for bad input or options."""


class SourceError(LlmqError):
    """The checkpoint cannot be read: missing or truncated file, missing shard, pickle refused."""


class UnsupportedArchitectureError(LlmqError):
    """The checkpoint's architecture has no entry in the architecture registry."""


class FormatError(LlmqError):
    """The requested quantization cannot be stored in the requested format."""


class OutputExistsError(LlmqError):
    """The output path exists and overwriting was not asked for."""
