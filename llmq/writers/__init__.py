"""Writers: stream encoded tensors into output files."""

from __future__ import annotations

from .gguf import GGUFStreamWriter, check_output

__all__ = ["GGUFStreamWriter", "check_output"]
